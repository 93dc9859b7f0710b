"""WebDataset shards of preference pairs: the deterministic writer, the manifest, indexing and atomic publishing.

A dataset folder holds ``pairs-000000.tar ...`` (samples with fields ``win.<ext>``, ``lose.<ext>``, ``txt``,
``json``), ``rejects.jsonl`` and ``manifest.json``. The manifest is written last: a folder without a manifest is not
a dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_PATTERN = "pairs-%06d.tar"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tar")  # a plain file name: no separators, cannot be "..."
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_KEYS = ("schema_version", "inputs", "rows_read", "pairs_written", "skipped", "shards", "config", "resolution")
SAMPLE_FIELDS = ("win", "lose", "txt", "json")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical serialisation (sorted keys, fixed indentation): equal manifests give equal bytes."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary sibling and ``os.replace`` (safe across threads)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``folder`` atomically; call it after every shard is complete."""
    path = Path(folder) / MANIFEST_NAME
    write_atomic(path, manifest_bytes(manifest))
    return path


def check_shard_name(name: object, where: str | Path) -> str:
    """A manifest's shard name must be a plain ``*.tar`` file name inside the dataset folder (no folders, no ``..``)."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise DataError(
            f"{where}: shard name {name!r} is not a plain file name inside the dataset folder "
            f"(letters, digits, '_', '-', '.', ending in .tar, e.g. {SHARD_PATTERN % 0})"
        )
    return name


def _check_shard_entry(entry: object, path: Path) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: a shard entry is {type(entry).__name__}, expected an object")
    name = check_shard_name(entry.get("name"), path)
    for field in ("pairs", "bytes"):
        value = entry.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{path}: shard {name}: {field} is {value!r}, expected a whole number")
    sha256 = entry.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise DataError(f"{path}: shard {name}: sha256 is {sha256!r}, expected 64 lowercase hex digits")


def _parse_manifest(folder: Path, data: bytes) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {manifest['schema_version']!r}, this sdpo reads {SCHEMA_VERSION}")
    if not isinstance(manifest["shards"], list):
        raise DataError(f"{path}: shards is {type(manifest['shards']).__name__}, expected a list")
    names: set[str] = set()
    for entry in manifest["shards"]:
        _check_shard_entry(entry, path)  # before any shard path is built from the name
        if entry["name"] in names:
            raise DataError(f"{path}: shard {entry['name']} is listed twice")
        names.add(entry["name"])
    if sum(shard["pairs"] for shard in manifest["shards"]) != manifest["pairs_written"]:
        raise DataError(f"{path}: shard pair counts do not add up to pairs_written={manifest['pairs_written']}")
    for shard in manifest["shards"]:
        shard_path = folder / shard["name"]
        if not shard_path.is_file():
            raise DataError(f"{shard_path}: listed in {MANIFEST_NAME} but missing")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"{shard_path}: size {size} differs from the manifest ({shard['bytes']} bytes)")
    return manifest


def read_manifest_and_digest(folder: str | Path) -> tuple[dict[str, Any], str]:
    """The checked manifest and the sha256 of the very bytes it was parsed from (see :func:`read_manifest`)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{folder}: no {MANIFEST_NAME}; a folder without a manifest is not a dataset (make one with `sdpo ingest`)"
        )
    data = path.read_bytes()
    return _parse_manifest(folder, data), hashlib.sha256(data).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check the manifest of a dataset folder; :class:`DataError` if it is missing or inconsistent.

    Checks the keys, the schema version, every shard entry (a plain file name inside the folder, whole-number
    counts, a sha256), that pair counts add up, and that each shard exists with the listed size. Shard contents are
    checked by :func:`sdpo.data.integrity.verify_dataset`.
    """
    return read_manifest_and_digest(folder)[0]


def list_shards(folder: str | Path) -> list[Path]:
    """Paths of the dataset's shards, in manifest order."""
    folder = Path(folder)
    return [folder / shard["name"] for shard in read_manifest(folder)["shards"]]


def dataset_digest(folder: str | Path) -> str:
    """sha256 of the manifest bytes: identifies the dataset (the manifest lists every shard's sha256)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST_NAME}; a folder without a manifest is not a dataset")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file, streamed (:func:`hashlib.file_digest`)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_shards(folder: str | Path) -> None:
    """Check every shard of a dataset now, bypassing verdict caches (:func:`sdpo.data.integrity.verify_dataset`)."""
    from sdpo.data.integrity import verify_dataset  # integrity builds on this module

    verify_dataset(folder, use_cache=False)


# --- writing ------------------------------------------------------------------------------------------------


def check_key(key: str) -> str:
    """A WebDataset key ends at the first dot and slashes make folders: both are refused."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: it must be non-empty, without dots or slashes")
    return key


class ShardWriter:
    """Write samples into ``pairs-%06d.tar`` shards of at most ``max_pairs`` samples each, byte-reproducibly.

    Tar members get fixed metadata (mtime 0, uid/gid 0, empty user and group names, mode 0444), so the same samples
    in the same order give byte-identical shards.
    """

    def __init__(self, folder: str | Path, max_pairs: int):
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        self.folder = Path(folder)
        self.max_pairs = max_pairs
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None  # webdataset.TarWriter of the open shard
        self._count = 0

    def _open_next(self) -> None:
        import webdataset as wds  # it imports torch: kept out of module import so manifest helpers stay light

        name = SHARD_PATTERN % len(self.shards)
        self._writer = wds.TarWriter(str(self.folder / name), user="", group="", mode=0o444, mtime=0, encoder=False)
        self.shards.append({"name": name, "pairs": 0})
        self._count = 0

    def _finish_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        info = self.shards[-1]
        path = self.folder / info["name"]
        info.update(pairs=self._count, bytes=path.stat().st_size, sha256=file_sha256(path))

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample; ``fields`` maps names such as ``win.png`` or ``txt`` to bytes."""
        if self._writer is not None and self._count >= self.max_pairs:
            self._finish_current()
        if self._writer is None:
            self._open_next()
        self._writer.write({"__key__": check_key(key), **fields})
        self._count += 1

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns ``[{name, pairs, bytes, sha256}, ...]``."""
        self._finish_current()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- atomic publishing --------------------------------------------------------------------------------------


def _siblings(out_dir: Path, tag: str) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.{tag}-*"))


@contextlib.contextmanager
def staged_dataset_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; on success it replaces ``out_dir`` whole, on error it goes.

    A reader sees the old dataset or the new one, never a mix. Leftovers of a killed earlier run (hidden
    ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings) are removed first, so only one ingestion per output may run at a time.
    ``out_dir`` must be absent, empty or a dataset (it has a manifest): other folders are never replaced.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise DataError(f"{out_dir}: exists, is not empty and has no {MANIFEST_NAME}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in _siblings(out_dir, "tmp") + _siblings(out_dir, "old"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- reading ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberRef:
    """Where one tar member's bytes are: shard file, byte offset and size."""

    shard: Path
    offset: int
    size: int


def _check_end(path: Path, raw: Any, end: int) -> None:
    """After the last member only zeros may follow; otherwise a header was corrupt and tarfile stopped there."""
    raw.seek(end)
    while block := raw.read(1 << 20):
        if block.count(0) != len(block):
            raise DataError(f"{path}: tar header corrupt at byte {end} (the archive stops there but data follows)")


def index_shard(
    path: str | Path, expected_pairs: int | None = None, fields: tuple[str, ...] | None = SAMPLE_FIELDS
) -> list[tuple[str, dict[str, MemberRef]]]:
    """``[(key, {field: MemberRef})]`` for the samples of one shard, in file order (reads only the headers).

    Every problem is a :class:`DataError` naming the shard: not a tar, a corrupt header (tarfile silently ends the
    archive at a bad header: the bytes after the end are checked), a member that is not a regular file or appears
    twice, a bad key, a sample without exactly one member per stem in ``fields`` (None: any), or a sample count
    other than ``expected_pairs``.
    """
    path = Path(path)
    samples: dict[str, dict[str, MemberRef]] = {}
    opened = False
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            opened = True  # the first header is valid: later failures are corrupt headers
            for member in tar:
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name!r} is not a regular file")
                key, _, field = member.name.partition(".")
                if not key or "/" in key or not field:
                    raise DataError(f"{path}: member {member.name!r} is not KEY.FIELD with a key without slashes")
                entry = samples.setdefault(key, {})
                if field in entry:
                    raise DataError(f"{path}: member {member.name!r} appears twice")
                entry[field] = MemberRef(path, member.offset_data, member.size)
            _check_end(path, raw, tar.offset)
    except tarfile.TarError as err:
        detail = " ".join(str(err).split())
        if not opened:
            raise DataError(f"{path}: not a tar file ({detail})") from None
        raise DataError(f"{path}: tar header corrupt ({detail})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: shard is missing") from None
    if fields is not None:
        for key, members in samples.items():
            stems = sorted(name.split(".", 1)[0] for name in members)
            if stems != sorted(fields):
                raise DataError(f"{path}: sample {key!r} has members {sorted(members)}, expected one each of {fields}")
    if expected_pairs is not None and len(samples) != expected_pairs:
        raise DataError(f"{path}: holds {len(samples)} samples, the manifest lists {expected_pairs}")
    return list(samples.items())
