"""Shards are verified against the manifest where they are consumed, before any sample is used; verdicts are cached."""

import io
import json
import multiprocessing
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdpo.data.integrity as integrity
from sdpo.data.loader import PairDataset, PairLoader, load_pairs_arrays, webdataset_pipeline
from sdpo.data.merge import merge_datasets
from sdpo.data.pickapic import ingest
from sdpo.data.shards import (
    MANIFEST_NAME,
    ShardWriter,
    file_sha256,
    index_shard,
    manifest_bytes,
    read_manifest,
    verify_shards,
    write_manifest,
)
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.errors import DataError

PAIRS, PER_SHARD = 30, 10
FAR_FUTURE_NS = 2**62  # a clock far ahead: every file is old enough for its verdict to be cached


@pytest.fixture(autouse=True)
def isolated_verdicts(tmp_path, monkeypatch):
    """Each test gets its own on-disk verdict folder and an empty in-process cache."""
    monkeypatch.setenv(integrity.CACHE_ENV, str(tmp_path / "verdicts"))
    integrity.forget_verdicts()
    yield
    integrity.forget_verdicts()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    source = write_parquet(make_pairs(PAIRS, seed=4), root / "pairs.parquet")
    ingest(str(source), root / "shards", shard_max_pairs=PER_SHARD)
    return root / "shards"


@pytest.fixture
def dataset_dir(pristine, tmp_path) -> Path:
    """A fresh copy of the good dataset, free to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Names of the shards hashed by verification, in call order."""
    calls: list[str] = []

    def counting(path):
        calls.append(Path(path).name)
        return file_sha256(path)

    monkeypatch.setattr(integrity, "file_sha256", counting)
    return calls


def _member(shard: Path, field: str, sample: int = 0):
    key, members = index_shard(shard)[sample]
    return key, members[next(name for name in members if name.split(".")[0] == field)]


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Change bytes in place: the size stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size


def _forge_manifest(folder: Path) -> None:
    """Re-hash the shards into the manifest, as someone covering their tracks would."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        shard.update(bytes=(folder / shard["name"]).stat().st_size, sha256=file_sha256(folder / shard["name"]))
    write_manifest(folder, manifest)


def _refusals(folder: Path, tmp_path: Path) -> list[str]:
    """The message of every consumer's refusal (each must refuse)."""
    messages = []
    for consume in (
        lambda: PairDataset(folder),
        lambda: load_pairs_arrays(folder, n=2),
        lambda: merge_datasets([folder], tmp_path / "merged"),
        lambda: webdataset_pipeline(folder, batch_size=2, seed=0, shuffle=False),
        lambda: integrity.verify_dataset(folder),
    ):
        integrity.forget_verdicts()
        with pytest.raises(DataError) as info:
            consume()
        messages.append(str(info.value))
    return messages


def _assert_one_line_naming(messages: list[str], shard: Path, problem: str) -> None:
    for message in messages:
        assert "\n" not in message and str(shard) in message and problem in message, message


# --- refusals ------------------------------------------------------------------------------------------------


def test_a_byte_flip_inside_an_image_is_refused_by_every_consumer(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000001.tar"
    _, ref = _member(shard, "win", sample=3)
    original = shard.read_bytes()[ref.offset + ref.size // 2]
    _overwrite(shard, ref.offset + ref.size // 2, bytes([original ^ 0xFF]))
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "sha256 differs")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_a_same_size_caption_edit_is_refused(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000002.tar"
    _, ref = _member(shard, "txt")
    caption = shard.read_bytes()[ref.offset : ref.offset + ref.size]
    _overwrite(shard, ref.offset, caption[::-1] if caption[::-1] != caption else b"x" * len(caption))
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "sha256 differs")


@pytest.mark.parametrize("name", ["../outside.tar", "/tmp/outside.tar", "sub/pairs-000000.tar", "..", ".hidden.tar",
                                  "pairs-000000.tar\x00", "pairs-000000.zip", 7])
def test_a_manifest_entry_outside_the_folder_is_refused_before_it_is_opened(dataset_dir, tmp_path, hashes, name):
    outside = dataset_dir.parent / "outside.tar"  # a valid shard with the right size and sha256, outside the folder
    shutil.copy(dataset_dir / "pairs-000000.tar", outside)
    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())
    manifest["shards"][0]["name"] = name
    write_manifest(dataset_dir, manifest)
    for message in _refusals(dataset_dir, tmp_path):
        assert "not a plain file name inside the dataset folder" in message and repr(name) in message
        assert "\n" not in message
    assert hashes == []  # refused from the manifest alone: nothing was read


def test_a_duplicate_shard_entry_is_refused(dataset_dir):
    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())
    manifest["shards"][1] = dict(manifest["shards"][0])
    manifest["pairs_written"] = sum(s["pairs"] for s in manifest["shards"])
    write_manifest(dataset_dir, manifest)
    with pytest.raises(DataError, match="pairs-000000.tar is listed twice"):
        integrity.verify_dataset(dataset_dir)


def test_a_zeroed_tar_header_is_refused_naming_the_shard(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000001.tar"
    _, ref = _member(shard, "win", sample=4)
    _overwrite(shard, ref.offset - 512, bytes(512))  # the member's header block
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "sha256 differs")
    _forge_manifest(dataset_dir)  # even when the manifest matches the damaged bytes, the structure gives it away
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "tar header corrupt")


def test_a_corrupt_header_checksum_is_refused_even_with_a_matching_manifest(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000000.tar"
    _, ref = _member(shard, "json", sample=5)
    _overwrite(shard, ref.offset - 512 + 10, b"\x01")  # inside the name field: the checksum no longer holds
    _forge_manifest(dataset_dir)
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "tar header corrupt")


def test_not_a_tar_is_refused(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000002.tar"
    size = shard.stat().st_size
    shard.write_bytes(np.random.default_rng(0).integers(1, 255, size, dtype=np.uint8).tobytes())
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "sha256 differs")
    _forge_manifest(dataset_dir)
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "not a tar file")


def test_missing_and_resized_shards_are_refused(dataset_dir, tmp_path):
    shard = dataset_dir / "pairs-000001.tar"
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "differs from the manifest")
    shard.unlink()
    _assert_one_line_naming(_refusals(dataset_dir, tmp_path), shard, "missing")


def test_a_sample_count_other_than_the_manifest_is_refused(dataset_dir):
    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())
    manifest["shards"][0]["pairs"] -= 1
    manifest["shards"][1]["pairs"] += 1
    write_manifest(dataset_dir, manifest)
    with pytest.raises(DataError, match=r"pairs-000000\.tar: holds 10 samples, the manifest lists 9"):
        PairDataset(dataset_dir)


def test_a_failed_verification_leaves_the_previous_merge_output_intact(pristine, dataset_dir, tmp_path):
    out = tmp_path / "merged"
    merge_datasets([pristine], out, shard_max_pairs=PER_SHARD)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = dataset_dir / "pairs-000000.tar"
    _, ref = _member(shard, "lose")
    _overwrite(shard, ref.offset, b"\0")
    with pytest.raises(DataError, match=r"pairs-000000\.tar: sha256 differs"):
        merge_datasets([pristine, dataset_dir], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(PairDataset(out)) == PAIRS  # the old dataset is still whole and verifies


# --- decode errors that verification cannot see ----------------------------------------------------------------


def _png(colour, size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _handmade(folder: Path, broken: dict[int, dict[str, bytes]], pairs: int = 8) -> Path:
    """A dataset whose manifest really matches its shards, with some samples' fields replaced by ``broken``."""
    folder.mkdir()
    with ShardWriter(folder, 4) as writer:
        for i in range(pairs):
            fields = {"win.png": _png((200, 0, 0)), "lose.png": _png((0, 0, 200)), "txt": f"pair {i}".encode(),
                      "json": json.dumps({"row": i}).encode()}
            writer.write(f"k{i:03d}", {**fields, **broken.get(i, {})})
        shards = writer.close()
    manifest = {"schema_version": 1, "inputs": [], "rows_read": pairs, "pairs_written": pairs, "skipped": {},
                "shards": shards, "config": {}, "resolution": 16}
    write_manifest(folder, manifest)
    return folder


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"win.png": b"\x89PNG\r\n\x1a\n but the rest is not"}, "the win image does not decode"),
        ({"lose.png": _png((0, 0, 200), size=20)}, "the lose image is 20x20, the manifest says 16x16"),
        ({"txt": b"\xff\xfe caption"}, "the caption is not UTF-8"),
        ({"json": b"{not json"}, "the json field is not valid JSON"),
    ],
)
def test_a_sample_that_does_not_decode_names_its_shard_and_key(tmp_path, fields, problem):
    folder = _handmade(tmp_path / "data", {5: fields})
    integrity.verify_dataset(folder)  # the bytes are what the manifest says: verification passes
    dataset = PairDataset(folder)
    assert dataset[4]["key"] == "k004"  # the samples before it are fine
    expected = f"{folder / 'pairs-000001.tar'}: sample 'k005': {problem}"
    with pytest.raises(DataError) as info:
        dataset[5]
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="sample 'k005'"):
        load_pairs_arrays(folder)
    with pytest.raises(DataError, match="sample 'k005'"):
        list(webdataset_pipeline(folder, batch_size=2, seed=0, shuffle=False))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_raises_one_clean_line_from_workers_too(tmp_path, num_workers):
    folder = _handmade(tmp_path / "data", {i: {"win.png": b"garbage"} for i in range(8)})
    loader = PairLoader(PairDataset(folder), batch_size=2, seed=0, num_workers=num_workers)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "the win image does not decode" in message
    assert str(folder / "pairs-00000") in message and "sample 'k00" in message
    assert loader.state_dict()["batch"] == 0  # the failed batch was not counted as trained on


# --- the public verify_dataset and its verdict cache ----------------------------------------------------------


def test_verify_dataset_returns_the_checked_manifest(pristine):
    manifest = integrity.verify_dataset(pristine)
    assert manifest == read_manifest(pristine) and len(manifest["shards"]) == PAIRS // PER_SHARD
    assert (pristine / MANIFEST_NAME).read_bytes() == manifest_bytes(manifest)
    verify_shards(pristine)  # the old entry point checks everything again


def test_verdicts_are_cached_in_process_and_on_disk(dataset_dir, tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)
    names = [f"pairs-00000{i}.tar" for i in range(3)]
    PairDataset(dataset_dir)
    assert sorted(hashes) == names  # first open: every shard once (hashed by parallel threads)
    PairDataset(dataset_dir)
    load_pairs_arrays(dataset_dir, n=3)
    assert sorted(hashes) == names  # same process: no shard read again
    integrity.forget_verdicts()  # as a new process would start
    PairDataset(dataset_dir)
    assert sorted(hashes) == names  # the on-disk record answered
    records = list((tmp_path / "verdicts").glob("*.json"))
    assert len(records) == 1 and records[0].name.startswith(integrity.verify_dataset_with_digest(dataset_dir)[1])
    record = json.loads(records[0].read_text())
    assert sorted(record["shards"]) == names and record["folder"] == str(dataset_dir.resolve())
    assert not [p for p in (tmp_path / "verdicts").iterdir() if ".tmp-" in p.name]  # written atomically
    integrity.verify_dataset(dataset_dir, use_cache=False)
    assert sorted(hashes) == sorted(names * 2)  # use_cache=False reads everything again


def test_a_changed_shard_is_hashed_again_and_refused(dataset_dir, hashes, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)
    shard = dataset_dir / "pairs-000001.tar"
    os.utime(shard, ns=(10**18, 10**18))
    integrity.verify_dataset(dataset_dir)
    _, ref = _member(shard, "txt")
    _overwrite(shard, ref.offset, b"#")
    os.utime(shard, ns=(10**18 + 1, 10**18 + 1))  # an mtime of its own: no dependence on the clock's resolution
    hashes.clear()
    with pytest.raises(DataError, match=r"pairs-000001\.tar: sha256 differs"):
        integrity.verify_dataset(dataset_dir)
    assert hashes == ["pairs-000001.tar"]  # only the changed shard was read


def test_a_restored_mtime_does_not_hide_an_edit(dataset_dir, hashes, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)
    integrity.verify_dataset(dataset_dir)
    shard = dataset_dir / "pairs-000000.tar"
    stat = shard.stat()
    _, ref = _member(shard, "txt")
    _overwrite(shard, ref.offset, b"#")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime are back; ctime cannot be set back
    real_stamp = integrity._stamp
    if shard.stat().st_ctime_ns == stat.st_ctime_ns:  # same coarse clock tick: show what a later edit gives
        monkeypatch.setattr(integrity, "_stamp", lambda p: {**real_stamp(p), "ctime_ns": real_stamp(p)["ctime_ns"] + 1})
    with pytest.raises(DataError, match=r"pairs-000000\.tar: sha256 differs"):
        integrity.verify_dataset(dataset_dir)


def test_a_verdict_on_a_just_written_file_is_not_cached(dataset_dir, hashes):
    """With the real clock, the copy was just made: its verdict is used once and not trusted for a later edit."""
    shard = dataset_dir / "pairs-000002.tar"
    stamp = integrity._stamp(shard)
    assert not integrity._cacheable(stamp)
    integrity.verify_dataset(dataset_dir)
    integrity.verify_dataset(dataset_dir)
    assert hashes.count("pairs-000002.tar") == 2
    assert not list((dataset_dir.parent / "verdicts").glob("*.json"))


def test_the_disk_record_can_be_turned_off(dataset_dir, tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)
    monkeypatch.setenv(integrity.CACHE_ENV, "off")
    assert integrity.verdict_cache_dir() is None
    integrity.verify_dataset(dataset_dir)
    integrity.forget_verdicts()
    integrity.verify_dataset(dataset_dir)
    assert len(hashes) == 6 and not (tmp_path / "verdicts").exists()


def test_an_unwritable_cache_only_costs_a_rehash(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(integrity.CACHE_ENV, str(blocker / "verdicts"))
    assert integrity.verify_dataset(dataset_dir)["pairs_written"] == PAIRS


def _verify_in_child(folder: str, out: str) -> None:
    integrity.forget_verdicts()
    calls = []
    real = integrity.file_sha256
    integrity.file_sha256 = lambda path: calls.append(path) or real(path)
    integrity.verify_dataset(folder)
    Path(out).write_text(str(len(calls)))


def test_concurrent_processes_read_the_data_once(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "_now_ns", lambda: FAR_FUTURE_NS)  # inherited by the forked children
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_verify_in_child, args=(str(dataset_dir), str(tmp_path / f"n{i}")))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0, 0, 0]
    counts = sorted(int((tmp_path / f"n{i}").read_text()) for i in range(3))
    assert counts == [0, 0, 3]  # the lock holder hashed every shard; the others used its record


def test_tar_members_are_plain_files_with_sample_keys(tmp_path):
    shard = tmp_path / "pairs-000000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k000")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with pytest.raises(DataError, match=r"pairs-000000\.tar: member 'k000' is not a regular file"):
        index_shard(shard)


def test_the_first_bad_shard_in_manifest_order_is_named_whatever_thread_finishes_first(dataset_dir):
    for name in ("pairs-000001.tar", "pairs-000002.tar"):
        _, ref = _member(dataset_dir / name, "win")
        _overwrite(dataset_dir / name, ref.offset, b"\0\0")
    for _ in range(3):
        integrity.forget_verdicts()
        with pytest.raises(DataError, match=r"pairs-000001\.tar: sha256 differs"):
            integrity.verify_dataset(dataset_dir, workers=3)
