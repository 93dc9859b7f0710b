"""URIs, atomic publishing and digests over one filesystem layer (fsspec; ``s3://`` through s3fs).

Every artifact of a run lives under a root that is a local folder or an object-store URI. Stages read and write
through this module only:

- :func:`local_copy` gives a local path for a URI (the path itself when it is local; a download into scratch when
  it is remote), so libraries that want files (PIL, diffusers, tarfile) work unchanged;
- :func:`publishing` yields a local staging folder and publishes it to a URI when the block succeeds, with the
  *marker* file (a manifest, ``model_index.json``...) written last: readers trust nothing without it;
- :func:`folder_digest` / :func:`file_sha256` are the one digest algorithm for files and folders, local or remote.

The object-store endpoint comes from the standard settings of boto-based clients (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``), credentials from the usual AWS chain; nothing here is project-specific.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdpo.errors import SdpoError

MARKER_NAMES = ("manifest.json", "model_index.json", "metrics.json", "COMPLETE")


class StoreError(SdpoError):
    """An object store or folder cannot be reached or does not hold what was expected; names the URI."""


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names an object store (``s3://``, ``gs://``...) rather than a local path."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def _local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    return Path(text.removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike (no normalisation beyond single slashes)."""
    text = str(base).rstrip("/")
    for part in parts:
        text = f"{text}/{part.strip('/')}"
    return text


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``uri``."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as err:
        raise StoreError(f"{uri}: cannot open this URI ({err})") from None


@contextlib.contextmanager
def _reaching(uri: str | os.PathLike) -> Iterator[None]:
    """Turn network and permission failures of an object store into one line naming the URI."""
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except (OSError, PermissionError) as err:
        raise StoreError(f"{uri}: {type(err).__name__}: {err}") from None
    except Exception as err:  # botocore raises many types (EndpointConnectionError, NoCredentialsError, ClientError)
        if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp"):
            raise StoreError(f"{uri}: {type(err).__name__}: {err}") from None
        raise


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file or folder exists at ``uri``."""
    if not is_remote(uri):
        return _local_path(uri).exists()
    fs, path = filesystem(uri)
    with _reaching(uri):
        return fs.exists(path)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The bytes of the file at ``uri``; :class:`StoreError` naming it when missing or unreachable."""
    if not is_remote(uri):
        path = _local_path(uri)
        if not path.is_file():
            raise StoreError(f"{uri}: file not found")
        return path.read_bytes()
    fs, path = filesystem(uri)
    with _reaching(uri):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"{uri}: file not found") from None


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike) -> Any:
    """Parsed JSON of the file at ``uri``; :class:`StoreError` naming it when it is not JSON."""
    try:
        return json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{uri}: not valid JSON ({err})") from None


def read_jsonl(uri: str | os.PathLike, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; empty when it does not exist and ``missing_ok``."""
    if missing_ok and not exists(uri):
        return []
    rows = []
    for number, line in enumerate(read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise StoreError(f"{uri}:{number}: not valid JSON ({err})") from None
    return rows


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: a local temporary sibling renamed into place, or one object-store PUT."""
    if not is_remote(uri):
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(uri)
    with _reaching(uri):
        fs.pipe_file(path, data)


def write_json(uri: str | os.PathLike, value: Any) -> None:
    write_bytes(uri, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def remove(uri: str | os.PathLike) -> None:
    """Remove a file or a whole folder/prefix; nothing happens when it does not exist."""
    if not is_remote(uri):
        path = _local_path(uri)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(uri)
    with _reaching(uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def list_files(uri: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file below the folder ``uri``, sorted; empty when it does not exist."""
    if not is_remote(uri):
        root = _local_path(uri)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = filesystem(uri)
    with _reaching(uri):
        if not fs.exists(path):
            return []
        found = fs.find(path)
    prefix = path.rstrip("/") + "/"
    return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))


def list_dirs(uri: str | os.PathLike) -> list[str]:
    """Names of the immediate sub-folders of ``uri``, sorted; empty when it does not exist."""
    if not is_remote(uri):
        root = _local_path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    fs, path = filesystem(uri)
    with _reaching(uri):
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True, refresh=True)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


# --- digests ------------------------------------------------------------------------------------------------


def file_sha256(uri: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, streamed (local path or URI)."""
    digest = hashlib.sha256()
    if not is_remote(uri):
        with open(_local_path(uri), "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        return digest.hexdigest()
    fs, path = filesystem(uri)
    with _reaching(uri), fs.open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(uri: str | os.PathLike) -> str:
    """``sha256:<hex>`` over every file of a folder: relative paths and contents, in sorted order.

    The one digest of models and evaluation folders everywhere (registry tags, evaluation records, caches), the same
    for a folder on local disk and its copy in an object store.
    """
    # Ours rather than a library's: dirhash and checksumdir walk local folders only (os.scandir), and the digest of
    # an s3:// copy must equal the local one without a local copy of the folder.
    files = list_files(uri)
    if not files:
        raise StoreError(f"{uri}: no files to digest (missing or empty folder)")
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        digest.update(file_sha256(join(uri, rel)).encode() + b"\n")
    return f"sha256:{digest.hexdigest()}"


# --- moving folders -----------------------------------------------------------------------------------------


def scratch_root() -> Path:
    """Where temporary working folders go: ``SDPO_SCRATCH_DIR`` if set, else the system temp folder."""
    root = Path(os.environ.get("SDPO_SCRATCH_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def scratch(prefix: str = "sdpo-") -> Iterator[Path]:
    """A temporary working folder, removed when the block ends (whatever happens)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def download(uri: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy the file or folder at ``uri`` to the local path ``local``; returns ``local``."""
    local = Path(local)
    if not is_remote(uri):
        source = _local_path(uri)
        if source.is_dir():
            shutil.copytree(source, local, dirs_exist_ok=True)
        elif source.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, local)
        else:
            raise StoreError(f"{uri}: not found")
        return local
    fs, path = filesystem(uri)
    with _reaching(uri):
        if not fs.exists(path):
            raise StoreError(f"{uri}: not found")
        if fs.isdir(path):
            local.mkdir(parents=True, exist_ok=True)
            for rel in list_files(uri):
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{path.rstrip('/')}/{rel}", str(target))
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
    return local


def require_published(uri: str | os.PathLike, marker: str) -> str:
    """The URI of ``marker`` in the folder ``uri``; a :class:`StoreError` when the folder was never published."""
    found = join(uri, marker)
    if not exists(found):
        raise StoreError(f"{uri}: no {marker}; it is not a published folder (it is missing or was never finished)")
    return found


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike, *, marker: str | None = None) -> Iterator[Path]:
    """A local path holding what ``uri`` holds: the path itself if local, else a scratch download.

    With ``marker`` the folder must contain that file (a published dataset or model): otherwise it is refused.
    """
    if marker is not None:
        require_published(uri, marker)
    if not is_remote(uri):
        yield _local_path(uri)
        return
    with scratch("sdpo-in-") as tmp:
        yield download(uri, tmp / Path(str(uri).rstrip("/")).name)


def _upload_dir(local: Path, uri: str, marker: str | None) -> None:
    fs, path = filesystem(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    with _reaching(uri):
        if marker is not None and fs.exists(f"{path}/{marker}"):
            fs.rm_file(f"{path}/{marker}")  # readers stop trusting the old content before it changes
        if fs.exists(path):
            fs.rm(path, recursive=True)
        last = [p for p in files if p.relative_to(local).as_posix() == marker]
        for file in [p for p in files if p not in last] + last:
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")


def _replace_local_dir(staging: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def publish_dir(local: str | os.PathLike, uri: str | os.PathLike, *, marker: str | None = None) -> str:
    """Publish the finished local folder ``local`` at ``uri``, replacing what was there.

    Local targets: ``local`` is copied beside the target (unless it already is its sibling) and renamed into place,
    so readers see the old folder or the new one. Object stores: the old marker goes first, then the old objects,
    then every new file with ``marker`` uploaded last. Returns ``uri``.
    """
    local = Path(local)
    if marker is not None and not (local / marker).is_file():
        raise StoreError(f"{local}: cannot publish to {uri}: {marker} is missing")
    if is_remote(uri):
        _upload_dir(local, str(uri), marker)
        return str(uri)
    target = _local_path(uri).absolute()
    if local.absolute().parent == target.parent:
        _replace_local_dir(local, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(local, staging)
            _replace_local_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(uri)


@contextlib.contextmanager
def publishing(uri: str | os.PathLike, *, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty local folder; when the block succeeds, publish it at ``uri`` (see :func:`publish_dir`).

    For a local ``uri`` the folder is a hidden sibling of the target, so publishing is a rename. When the block
    fails nothing is published and the old content stays.
    """
    if is_remote(uri):
        with scratch("sdpo-out-") as tmp:
            staging = tmp / "out"
            staging.mkdir()
            yield staging
            publish_dir(staging, uri, marker=marker)
        return
    target = _local_path(uri).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, target, marker=marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
