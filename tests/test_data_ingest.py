"""Pick-a-Pic parquet -> WebDataset shards: validation, rejects, determinism, errors and atomic publishing."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sdpo.data.pickapic as pickapic
from sdpo.cli import main
from sdpo.data.pickapic import PICKAPIC_V2_SCHEMA, ingest
from sdpo.data.shards import MANIFEST_NAME, dataset_digest, read_manifest, verify_shards
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.errors import DataError


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _rgb(size=(24, 24), colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _write(rows: dict[str, list], path: Path) -> Path:
    pq.write_table(pa.Table.from_pydict(rows, schema=PICKAPIC_V2_SCHEMA), path)
    return path


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("pairs-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                assert member.mtime == 0 and member.uid == 0 and member.gid == 0 and member.uname == ""
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def _rejects(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- one row per case -----------------------------------------------------------------------------------------

CASES = {  # row -> expected reason (None: accepted)
    0: None,  # plain synthetic pair, PNG bytes in the jpg columns
    1: "undecodable_image",  # corrupt bytes
    2: "undecodable_image",  # truncated JPEG
    3: None,  # grayscale JPEG
    4: None,  # CMYK JPEG
    5: None,  # palette PNG with transparency
    6: "image_too_small",  # 1x1
    7: "empty_caption",  # ""
    8: "empty_caption",  # None
    9: "empty_caption",  # whitespace only
    10: "tie",  # label 0.5
    11: "invalid_label",  # NaN
    12: "invalid_label",  # None
    13: "invalid_label",  # 0.3
    14: "duplicate_ranking_id",  # same ranking_id as row 0
    15: None,  # caption with slashes, dots and unicode
    16: "missing_image",  # jpg_0 is None
    17: "invalid_label",  # label_1 inconsistent with label_0
    18: None,  # label_0 = 0: jpg_1 is the winner
    19: None,  # non-square RGBA PNG, resized and centre-cropped
}
ODD_CAPTION = "  a/b\\c.d ünïcödé 猫 🐱 ../etc  "


@pytest.fixture(scope="module")
def cases_parquet(tmp_path_factory) -> Path:
    rows = make_pairs(len(CASES), seed=5).to_pydict()
    rows["label_0"] = [1.0] * len(CASES)  # jpg_0 wins unless a case says otherwise
    rows["label_1"] = [0.0] * len(CASES)
    jpeg = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    rows["jpg_0"][1] = b"definitely not an image"
    rows["jpg_1"][2] = jpeg[: len(jpeg) // 2]
    rows["jpg_0"][3] = _encode(_rgb().convert("L"), "JPEG")
    rows["jpg_1"][4] = _encode(_rgb().convert("CMYK"), "JPEG")
    palette = _rgb().convert("P")
    palette.info["transparency"] = 0
    rows["jpg_0"][5] = _encode(palette, "PNG")
    rows["jpg_1"][6] = _encode(_rgb((1, 1)), "PNG")
    rows["caption"][7], rows["caption"][8], rows["caption"][9] = "", None, " \t "
    rows["label_0"][10], rows["label_1"][10] = 0.5, 0.5
    rows["label_0"][11] = math.nan
    rows["label_0"][12] = None
    rows["label_0"][13], rows["label_1"][13] = 0.3, 0.7
    rows["ranking_id"][14] = rows["ranking_id"][0]
    rows["caption"][15] = ODD_CAPTION
    rows["jpg_0"][16] = None
    rows["label_1"][17] = 1.0
    rows["label_0"][18], rows["label_1"][18] = 0.0, 1.0
    wide = Image.new("RGBA", (60, 20), (0, 0, 255, 255))
    wide.paste((0, 255, 0, 255), (20, 0, 40, 20))  # green centre band between blue sides
    rows["jpg_0"][19] = _encode(wide, "PNG")
    path = tmp_path_factory.mktemp("cases") / "cases.parquet"
    return _write(rows, path)


def test_every_case_is_accepted_or_rejected_for_the_right_reason(cases_parquet, tmp_path):
    out = tmp_path / "shards"
    manifest = ingest(str(cases_parquet), out, shard_max_pairs=3)
    source = pq.read_table(cases_parquet).to_pylist()
    rejects = {r["row"]: r for r in _rejects(out)}
    expected_rejects = {row: reason for row, reason in CASES.items() if reason and reason != "tie"}
    assert {row: r["reason"] for row, r in rejects.items()} == expected_rejects
    assert all(r["source"] == str(cases_parquet) and r["detail"] for r in rejects.values())
    assert rejects[14]["ranking_id"] == source[0]["ranking_id"]
    assert "NaN" in rejects[11]["detail"] and "jpg_1" in rejects[6]["detail"]
    accepted = [row for row, reason in CASES.items() if reason is None]
    assert manifest["pairs_written"] == len(accepted)
    assert manifest["rows_read"] == len(CASES)
    assert manifest["skipped"]["tie"] == 1
    assert manifest["pairs_written"] + sum(manifest["skipped"].values()) == manifest["rows_read"]
    assert len(manifest["shards"]) == 3  # 7 pairs, at most 3 per shard

    samples = _samples(out)
    assert sorted(samples) == [f"0000_{row:09d}" for row in accepted]
    for key, fields in samples.items():
        assert set(fields) == {"win.png", "lose.png", "txt", "json"}
        assert "." not in key and "/" not in key
        meta = json.loads(fields["json"])
        row = int(key.split("_")[1])
        assert meta["row"] == row and meta["ranking_id"] == source[row]["ranking_id"]
        assert fields["txt"].decode() == meta["caption"] == source[row]["caption"].strip()
        assert _decode(fields["win.png"]).shape == (16, 16, 3)
    # the winner comes first: PNG 16 px synthetic images pass through unchanged
    row0, row18 = samples["0000_000000000"], samples["0000_000000018"]
    assert np.array_equal(_decode(row0["win.png"]), _decode(source[0]["jpg_0"]))
    assert np.array_equal(_decode(row18["win.png"]), _decode(source[18]["jpg_1"]))
    assert np.array_equal(_decode(row18["lose.png"]), _decode(source[18]["jpg_0"]))
    assert json.loads(row18["json"])["winner"] == "jpg_1"
    assert samples["0000_000000015"]["txt"].decode() == ODD_CAPTION.strip()
    # grayscale and CMYK become RGB; the wide image is centre-cropped to its green band
    assert _decode(samples["0000_000000003"]["win.png"]).std(axis=-1).max() == 0
    centre_crop = _decode(samples["0000_000000019"]["win.png"]).reshape(-1, 3)
    assert (centre_crop[:, 1] > 200).all() and (centre_crop[:, 2] < 60).all()
    verify_shards(out)


def test_keep_ties_keeps_the_tie(cases_parquet, tmp_path):
    manifest = ingest(str(cases_parquet), tmp_path / "ties", keep_ties=True)
    assert manifest["skipped"]["tie"] == 0 and manifest["config"]["keep_ties"] is True
    tie = _samples(tmp_path / "ties")["0000_000000010"]
    meta = json.loads(tie["json"])
    assert meta["label_0"] == meta["label_1"] == 0.5


def test_jpg_format_and_resolution(cases_parquet, tmp_path):
    manifest = ingest(str(cases_parquet), tmp_path / "jpg", image_format="jpg", resolution=8, min_size=2)
    assert manifest["skipped"]["image_too_small"] == 1  # 1x1 is still below 2 px
    fields = next(iter(_samples(tmp_path / "jpg").values()))
    assert set(fields) == {"win.jpg", "lose.jpg", "txt", "json"}
    assert fields["win.jpg"][:2] == b"\xff\xd8" and _decode(fields["win.jpg"]).shape == (8, 8, 3)


# --- a few thousand rows --------------------------------------------------------------------------------------

MIXED_ROWS = 2400


@pytest.fixture(scope="module")
def mixed_parquet(tmp_path_factory) -> Path:
    """Every 10 rows: 4 good, 1 corrupt image, 1 empty caption, 1 NaN label, 1 duplicate id, 1 tie, 1 tiny image."""
    rows = make_pairs(MIXED_ROWS, seed=21).to_pydict()
    tiny = _encode(_rgb((1, 1)), "PNG")
    for i in range(MIXED_ROWS):
        kind = i % 10
        if kind == 1:
            rows["jpg_0"][i] = b"\x89PNG broken"
        elif kind == 2:
            rows["caption"][i] = ""
        elif kind == 3:
            rows["label_0"][i] = math.nan
        elif kind == 4:
            rows["ranking_id"][i] = rows["ranking_id"][i - 1]  # the first one (a NaN label) still claims the id
        elif kind == 5:
            rows["label_0"][i], rows["label_1"][i] = 0.5, 0.5
        elif kind == 6:
            rows["jpg_1"][i] = tiny
    return _write(rows, tmp_path_factory.mktemp("mixed") / "mixed.parquet")


def test_exact_reject_counts_and_determinism_across_workers(mixed_parquet, tmp_path):
    one = ingest(str(mixed_parquet), tmp_path / "one", shard_max_pairs=300, workers=1)
    per_kind = MIXED_ROWS // 10
    assert one["skipped"] == {
        "duplicate_ranking_id": per_kind,
        "empty_caption": per_kind,
        "image_too_small": per_kind,
        "invalid_label": per_kind,
        "invisible_caption": 0,
        "missing_image": 0,
        "tie": per_kind,
        "undecodable_image": per_kind,
    }
    assert one["pairs_written"] == 4 * per_kind and one["rows_read"] == MIXED_ROWS
    assert len(_rejects(tmp_path / "one")) == 5 * per_kind  # ties are filtered in the scan, counted only
    assert [s["pairs"] for s in one["shards"]] == [300, 300, 300, 60]
    two = ingest(str(mixed_parquet), tmp_path / "two", shard_max_pairs=300, workers=2)
    assert _listing(tmp_path / "one") == _listing(tmp_path / "two")
    assert two == one
    # a re-run into the same folder gives the same bytes (and the same digest)
    digest = dataset_digest(tmp_path / "one")
    ingest(str(mixed_parquet), tmp_path / "one", shard_max_pairs=300)
    assert dataset_digest(tmp_path / "one") == digest
    text = (tmp_path / "one" / MANIFEST_NAME).read_text()
    assert ".tmp-" not in text and "timestamp" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


# --- bad input stops before writing anything -----------------------------------------------------------------


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}*"))


def test_missing_required_column_names_the_file_and_column(tmp_path):
    table = make_pairs(4, seed=0).drop_columns(["jpg_1"])
    path = tmp_path / "nojpg.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"nojpg\.parquet.*missing required column.*jpg_1"):
        ingest(str(path), out)
    _assert_nothing_written(tmp_path, out)


def test_not_parquet_names_the_file_even_among_good_files(tmp_path):
    write_parquet(make_pairs(4, seed=0), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 this is not really parquet")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.parquet: not a parquet file"):
        ingest(str(tmp_path / "in"), out)
    _assert_nothing_written(tmp_path, out)


def test_empty_inputs_are_errors(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="matches no parquet files"):
        ingest(str(tmp_path / "empty"), out)
    with pytest.raises(DataError, match="matches no parquet files"):
        ingest(str(tmp_path / "nothing-*.parquet"), out)
    with pytest.raises(DataError, match="no such file"):
        ingest(str(tmp_path / "missing.parquet"), out)
    zero = tmp_path / "zero.parquet"
    pq.write_table(make_pairs(2, seed=0).slice(0, 0), zero)
    with pytest.raises(DataError, match=r"zero rows.*zero\.parquet"):
        ingest(str(zero), out)
    _assert_nothing_written(tmp_path, out)


def test_all_rows_rejected_publishes_nothing(tmp_path):
    rows = make_pairs(3, seed=0).to_pydict()
    rows["caption"] = ["", "", ""]
    path = _write(rows, tmp_path / "bad.parquet")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no valid pairs"):
        ingest(str(path), out)
    _assert_nothing_written(tmp_path, out)


def test_folder_glob_and_list_inputs_agree(tmp_path):
    write_parquet(make_pairs(6, seed=1), tmp_path / "in" / "part-0.parquet")
    write_parquet(make_pairs(5, seed=2), tmp_path / "in" / "nested" / "part-1.parquet")
    (tmp_path / "in" / "_SUCCESS").write_bytes(b"")
    by_folder = ingest(str(tmp_path / "in"), tmp_path / "a")
    assert [i["path"] for i in by_folder["inputs"]] == [
        str(tmp_path / "in" / "nested" / "part-1.parquet"),
        str(tmp_path / "in" / "part-0.parquet"),
    ]
    assert by_folder["pairs_written"] == 11
    assert {k.split("_")[0] for k in _samples(tmp_path / "a")} == {"0000", "0001"}
    by_list = ingest([i["path"] for i in by_folder["inputs"]], tmp_path / "b")
    by_glob = ingest(str(tmp_path / "in" / "**" / "*.parquet"), tmp_path / "c")
    assert by_list == by_folder == by_glob
    assert _listing(tmp_path / "a") == _listing(tmp_path / "b") == _listing(tmp_path / "c")


def test_uri_inputs_use_pyarrow_filesystems(tmp_path):
    """The s3:// code path, exercised offline through the same pyarrow FileSystem API with file:// URIs."""
    write_parquet(make_pairs(6, seed=1), tmp_path / "in" / "part-0.parquet")
    write_parquet(make_pairs(5, seed=2), tmp_path / "in" / "part-1.parquet")
    local = ingest(str(tmp_path / "in"), tmp_path / "local")
    by_folder = ingest(f"file://{tmp_path / 'in'}", tmp_path / "uri-folder")
    by_glob = ingest(f"file://{tmp_path / 'in'}/part-*.parquet", tmp_path / "uri-glob")
    assert [i["path"] for i in by_folder["inputs"]] == [f"file://{tmp_path / 'in'}/part-{k}.parquet" for k in (0, 1)]
    assert by_glob == by_folder
    without_source = [
        {key: {k: v for k, v in fields.items() if k != "json"} for key, fields in _samples(tmp_path / name).items()}
        for name in ("local", "uri-folder")
    ]
    assert without_source[0] == without_source[1] and len(without_source[0]) == local["pairs_written"] == 11
    with pytest.raises(DataError, match="not found"):
        ingest(f"file://{tmp_path / 'nowhere'}", tmp_path / "x")


# --- atomic publishing --------------------------------------------------------------------------------------


def test_existing_dataset_is_replaced_whole(tmp_path):
    big = write_parquet(make_pairs(40, seed=1), tmp_path / "big.parquet")
    small = write_parquet(make_pairs(5, seed=2), tmp_path / "small.parquet")
    out = tmp_path / "out"
    ingest(str(big), out, shard_max_pairs=10)
    assert len(list(out.glob("pairs-*.tar"))) == 4
    manifest = ingest(str(small), out, shard_max_pairs=10)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "pairs-000000.tar", "rejects.jsonl"]
    assert read_manifest(out) == manifest and manifest["pairs_written"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.parquet", "out", "small.parquet"]


def test_crash_mid_write_leaves_the_old_dataset_intact(tmp_path, monkeypatch):
    source = write_parquet(make_pairs(30, seed=1), tmp_path / "in.parquet")
    out = tmp_path / "out"
    ingest(str(source), out, shard_max_pairs=8)
    before = _listing(out)
    calls = {"n": 0}
    real = pickapic._sample_fields

    def crash_after_a_few(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 12:
            raise RuntimeError("simulated crash while writing shards")
        return real(*args, **kwargs)

    monkeypatch.setattr(pickapic, "_sample_fields", crash_after_a_few)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(str(source), out, shard_max_pairs=4)
    assert calls["n"] == 13
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out"]


def test_rerun_after_a_kill_cleans_leftovers_and_gives_the_same_result(tmp_path):
    source = write_parquet(make_pairs(12, seed=4), tmp_path / "in.parquet")
    out = tmp_path / "out"
    ingest(str(source), out)
    expected = _listing(out)
    leftover = tmp_path / ".out.tmp-deadbeef"  # what a SIGKILL during a second run would leave
    leftover.mkdir()
    (leftover / "pairs-000000.tar").write_bytes(b"partial")
    ingest(str(source), out)
    assert _listing(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out"]


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    source = write_parquet(make_pairs(3, seed=0), tmp_path / "in.parquet")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        ingest(str(source), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_read_manifest_requires_a_manifest(tmp_path):
    with pytest.raises(DataError, match="not a dataset"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match="not a dataset"):
        dataset_digest(tmp_path)


# --- CLI ------------------------------------------------------------------------------------------------------

REAL_DATA_EVAL = ["--set", "eval.rewards=[alignment, synthetic]", "--set", "registry.primary_reward=alignment"]


def test_cli_ingest(tmp_path, capsys):
    """`sdpo ingest` reads data.input and writes ROOT/shards/<split>; settings come from the config, not flags."""
    source = write_parquet(make_pairs(20, seed=3, tie_fraction=0.25), tmp_path / "in.parquet")
    root = tmp_path / "root"
    # real data: the embedded preference reward (trained on the synthetic world only) is not in the evaluation
    common = ["--set", f"data.root={root}", "--set", "data.shard_max_pairs=4", *REAL_DATA_EVAL]
    code = main(["ingest", "--set", f"data.input={source}", *common])
    assert code == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(root / "shards" / "train")
    assert f"wrote {manifest['pairs_written']} pairs" in printed and "tie" in printed
    assert manifest["config"]["shard_max_pairs"] == 4
    assert main(["ingest", "--set", f"data.input={tmp_path / 'none.parquet'}", *common]) == 2
    err = capsys.readouterr().err
    assert "sdpo ingest: error:" in err and "none.parquet" in err and "Traceback" not in err
    assert read_manifest(root / "shards" / "train") == manifest  # the failed run left the dataset as it was
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--split", "--config", "--set", "data.input", "data.resolution", "data.keep_ties"):
        assert option in help_text
