"""Verify a dataset's shards against its manifest where they are consumed, with a cached verdict.

:func:`verify_dataset` checks every shard listed in ``manifest.json`` before any of its samples is used: the name is a
plain file name inside the folder, the file exists, its size and sha256 match the manifest, it is a tar whose
headers are intact, and it holds the listed number of samples with the expected fields. Every failure is one
:class:`~sdpo.errors.DataError` line that names the shard and the problem.

Hashing a real dataset (hundreds of GB) on every training launch would cost minutes, so a shard's good verdict is
cached under a key made of the manifest's sha256, the shard's sha256 from the manifest, and the file's identity and
change stamps (``st_dev``, ``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``):

- **in process**, for every later open of the same dataset (the trainer, the held-out probe, evaluation);
- **on disk**, one small JSON record per (manifest digest, dataset folder) under ``$SDPO_VERIFY_CACHE`` (default
  ``$XDG_CACHE_HOME/sdpo/verified`` or ``~/.cache/sdpo/verified``; ``off`` disables it), written atomically, so a
  second run, another rank or another stage does one ``stat`` per shard instead of re-reading the data. It lives
  outside the dataset folder: DVC hashes that folder, and datasets may be read-only.

Any write to a shard changes its mtime and ctime, and ctime cannot be set back from user space, so an edited, copied
or replaced shard is hashed again. File times are coarse (a few ms), so, as git does for its index, a verdict on a
file changed less than :data:`RACY_NS` before it was checked is not cached: a same-size edit within the same clock
tick would otherwise keep the stamp. What a stat-based verdict cannot see is silent on-disk corruption (bit rot) or a
write that bypasses the file system; ``verify_dataset(folder, use_cache=False)`` (or ``SDPO_VERIFY_CACHE=off``)
re-hashes everything. Processes verifying the same dataset at once (DDP ranks on one node) take a file lock on its
record, so the data is read once and the others reuse the verdict.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sdpo.data.shards import SAMPLE_FIELDS, file_sha256, index_shard, read_manifest_and_digest, write_atomic
from sdpo.errors import DataError

CACHE_ENV = "SDPO_VERIFY_CACHE"
_DISABLED = {"", "0", "off", "false", "no", "none"}
_RECORD_VERSION = 1
RACY_NS = 2_000_000_000  # verdicts on files changed this recently are used once, never cached
_log = logging.getLogger(__name__)
_verified: set[tuple[Any, ...]] = set()  # in-process verdicts: keys of shards that passed
_verified_lock = threading.Lock()


def verdict_cache_dir() -> Path | None:
    """Folder of the on-disk verdict records, or None when ``SDPO_VERIFY_CACHE`` turns them off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _DISABLED else Path(value).expanduser()
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home folder: verify without a record
        return None
    return Path(base) / "sdpo" / "verified"


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _now_ns() -> int:
    return time.time_ns()


def _cacheable(stamp: dict[str, int]) -> bool:
    """False for a file changed within :data:`RACY_NS` of now: a later edit could leave the same stamp."""
    return _now_ns() - max(stamp["mtime_ns"], stamp["ctime_ns"]) >= RACY_NS


def _key(digest: str, folder: Path, entry: dict[str, Any], stamp: dict[str, int]) -> tuple[Any, ...]:
    return (digest, str(folder), entry["name"], entry["sha256"], *sorted(stamp.items()))


def verify_shard(folder: str | Path, entry: dict[str, Any], fields: tuple[str, ...] = SAMPLE_FIELDS) -> dict[str, int]:
    """Check one manifest shard entry against its file now; returns the file's stamp as it was when checked."""
    path = Path(folder) / entry["name"]
    try:
        before = _stamp(path)
    except FileNotFoundError:
        raise DataError(f"{path}: listed in the manifest but missing") from None
    if before["size"] != entry["bytes"]:
        raise DataError(f"{path}: size {before['size']} differs from the manifest ({entry['bytes']} bytes)")
    if file_sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: sha256 differs from the manifest (corrupted or replaced)")
    index_shard(path, expected_pairs=entry["pairs"], fields=fields)  # not a tar, corrupt headers, fields, count
    return before


# --- the on-disk record ---------------------------------------------------------------------------------------


def _record_path(cache_dir: Path, digest: str, folder: Path) -> Path:
    where = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return cache_dir / f"{digest}-{where}.json"


def _read_record(path: Path, digest: str, folder: Path) -> dict[str, dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = (isinstance(record, dict) and record.get("version") == _RECORD_VERSION
          and record.get("manifest_sha256") == digest and record.get("folder") == str(folder))
    return record["shards"] if ok and isinstance(record.get("shards"), dict) else {}


def _write_record(path: Path, digest: str, folder: Path, shards: dict[str, dict[str, Any]]) -> None:
    record = {"version": _RECORD_VERSION, "manifest_sha256": digest, "folder": str(folder), "shards": shards}
    try:
        write_atomic(path, (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("utf-8"))
    except OSError as err:  # a read-only or full cache only costs a re-hash next time
        _log.debug("verdict record %s not written: %s", path, err)


@contextlib.contextmanager
def _exclusive(lock_path: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (nothing when None or when the lock cannot be made)."""
    if lock_path is None:
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        _log.debug("no verification lock %s: %s", lock_path, err)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- verification -------------------------------------------------------------------------------------------


def _check_all(folder: Path, todo: list[dict[str, Any]], workers: int,
               fields: tuple[str, ...] = SAMPLE_FIELDS) -> Iterator[tuple[dict, dict[str, int]]]:
    """``(entry, stamp)`` for each entry in order; raises the first failure in manifest order."""
    if workers <= 1 or len(todo) <= 1:
        for entry in todo:
            yield entry, verify_shard(folder, entry, fields)
        return
    with ThreadPoolExecutor(min(workers, len(todo))) as pool:  # hashlib releases the GIL on large blocks
        futures = [pool.submit(verify_shard, folder, entry, fields) for entry in todo]
        try:
            for entry, future in zip(todo, futures, strict=True):
                yield entry, future.result()
        finally:
            for future in futures:
                future.cancel()


def verify_dataset(folder: str | Path, *, use_cache: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Verify every shard of the dataset in ``folder`` against its manifest; returns the checked manifest.

    Raises :class:`DataError` (one line naming the shard) on the first shard, in manifest order, whose name, size,
    sha256, tar structure or sample count is wrong. Good verdicts are cached in process and on disk (see the module
    docstring); ``use_cache=False`` re-checks everything. ``workers`` threads hash shards in parallel (default: up to
    4, at most the CPU count).
    """
    return verify_dataset_with_digest(folder, use_cache=use_cache, workers=workers)[0]


def verify_dataset_with_digest(
    folder: str | Path, *, use_cache: bool = True, workers: int | None = None,
    fields: tuple[str, ...] = SAMPLE_FIELDS,
) -> tuple[dict[str, Any], str]:
    """:func:`verify_dataset`, also returning the sha256 of the manifest bytes that were verified.

    ``fields``: the member stems every sample must have (a latent cache has its own, named in its manifest).
    """
    folder = Path(folder)
    real = folder.resolve()  # the cache key: the same dataset reached through another path or link
    manifest, digest = read_manifest_and_digest(folder)
    workers = workers or min(4, os.cpu_count() or 1)
    cache_dir = verdict_cache_dir() if use_cache else None
    record_path = _record_path(cache_dir, digest, real) if cache_dir else None
    entries = manifest["shards"]

    def pending(record: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        if not use_cache:
            return list(entries)
        todo = []
        for entry in entries:
            try:
                stamp = _stamp(folder / entry["name"])
            except FileNotFoundError:
                raise DataError(f"{folder / entry['name']}: listed in the manifest but missing") from None
            key = _key(digest, real, entry, stamp)
            if key in _verified:
                continue
            if record.get(entry["name"]) == {"sha256": entry["sha256"], **stamp}:
                with _verified_lock:
                    _verified.add(key)
                continue
            todo.append(entry)
        return todo

    if not pending({}):  # everything already verified in this process: no lock, no record read
        return manifest, digest
    with _exclusive(record_path.with_suffix(".lock") if record_path else None):
        record = _read_record(record_path, digest, real) if record_path else {}
        passed: dict[str, dict[str, Any]] = {}
        try:
            for entry, stamp in _check_all(folder, pending(record), workers, fields):
                try:
                    changed = _stamp(folder / entry["name"]) != stamp
                except OSError:
                    changed = True
                if changed:
                    raise DataError(f"{folder / entry['name']}: changed while it was being verified")
                if not _cacheable(stamp):
                    continue
                passed[entry["name"]] = {"sha256": entry["sha256"], **stamp}
                if use_cache:
                    with _verified_lock:
                        _verified.add(_key(digest, real, entry, stamp))
        finally:
            if record_path and passed:  # shards that passed stay verified even when a later one failed
                names = {entry["name"] for entry in entries}
                kept = {name: value for name, value in record.items() if name in names}
                _write_record(record_path, digest, real, {**kept, **passed})
    return manifest, digest


def forget_verdicts() -> None:
    """Drop this process's cached verdicts (the on-disk records stay)."""
    with _verified_lock:
        _verified.clear()
