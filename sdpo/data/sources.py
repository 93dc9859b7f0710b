"""Where ingestion reads from: local files, folders, globs and URIs (``s3://``, ``file://``) through pyarrow.

Every failure to reach or read an input (no network, a refused endpoint, missing credentials, a missing bucket, a
permission error) becomes one :class:`~sdpo.errors.DataError` line that names the URI and what failed.

S3 clients honour the standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_REGION``, credentials...). pyarrow always
installs its own retry strategy (3 attempts with back-off), so the standard ``AWS_MAX_ATTEMPTS`` is applied here:
``AWS_MAX_ATTEMPTS=1`` turns retries off.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from sdpo.data.messages import one_line
from sdpo.errors import DataError


@dataclass(frozen=True)
class InputFile:
    """One parquet file: ``path`` as recorded in the manifest, and how pyarrow reaches it."""

    path: str
    filesystem: pafs.FileSystem
    fs_path: str


@contextlib.contextmanager
def reading(uri: str, action: str) -> Iterator[None]:
    """Turn a pyarrow or OS read failure inside the block into ``DataError("{uri}: {action} failed (...)")``."""
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{uri}: {action} failed ({one_line(err)})") from None


def _max_attempts() -> int | None:
    value = os.environ.get("AWS_MAX_ATTEMPTS")
    if not value:
        return None
    try:
        attempts = int(value)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise DataError(f"AWS_MAX_ATTEMPTS={value!r}: expected a whole number of at least 1")
    return attempts


def _apply_retry_settings(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """The same S3 filesystem with ``AWS_MAX_ATTEMPTS`` attempts per request, when that variable is set."""
    attempts = _max_attempts()
    if attempts is None or not isinstance(filesystem, pafs.S3FileSystem):
        return filesystem
    _, (options,) = filesystem.__reduce__()  # the constructor's keyword arguments, as pickling rebuilds it
    options = {k: v for k, v in options.items() if k != "retry_strategy"}
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))  # _SUCCESS, .crc and similar side files of writers


def _resolve_remote(spec: str) -> list[InputFile]:
    try:
        filesystem, base = pafs.FileSystem.from_uri(spec)
    except (OSError, pa.ArrowException, ValueError) as err:
        raise DataError(f"{spec}: cannot open this URI ({one_line(err)})") from None
    filesystem = _apply_retry_settings(filesystem)
    scheme = spec.split("://", 1)[0]
    with reading(spec, "lookup"):
        if glob.has_magic(base):
            root = re.split(r"[*?\[]", base, maxsplit=1)[0].rsplit("/", 1)[0]  # the folder above the first wildcard
            infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch(i.path, base)]
        else:
            info = filesystem.get_file_info(base)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"{spec}: not found")
            if info.type == pafs.FileType.File:
                paths = [base]
            else:
                infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
                paths = [
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not _is_hidden(i.base_name)
                ]
    return [InputFile(f"{scheme}://{p}", filesystem, p) for p in sorted(paths)]


def _resolve_local(spec: str) -> list[InputFile]:
    local = pafs.LocalFileSystem()
    if glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        found = (p for p in Path(spec).rglob("*.parquet") if p.is_file())
        paths = sorted(str(p) for p in found if not any(map(_is_hidden, p.relative_to(spec).parts)))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise DataError(f"{spec}: no such file or folder")
    return [InputFile(p, local, os.path.abspath(p)) for p in paths]


def resolve_inputs(inputs: str | Iterable[str]) -> list[InputFile]:
    """Expand files, folders (``*.parquet`` inside, recursively), globs and URIs (``s3://...``) into parquet files.

    Order: the specs in the given order, each one's files sorted; duplicates dropped. :class:`DataError` when a spec
    matches nothing or cannot be reached (the message names the spec).
    """
    specs = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not specs:
        raise DataError("no input given: pass a parquet file, folder, glob or s3:// URI")
    files: list[InputFile] = []
    seen: set[str] = set()
    for spec in map(str, specs):
        found = _resolve_remote(spec) if "://" in spec else _resolve_local(spec)
        if not found:
            raise DataError(f"{spec}: matches no parquet files")
        for f in found:
            if f.path not in seen:
                seen.add(f.path)
                files.append(f)
    return files
