"""Where reward weights come from: a local path or URI, verified against an optional sha256 pin.

Nothing is ever downloaded implicitly. A remote URI (``s3://...``) is copied once through a pyarrow filesystem
into a local cache because the user configured it; everything else must already be on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from sdpo.errors import ModelError

# Files that define a model: weights, configs, tokenizers. Used for folder digests (pins and model digests).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model", ".yaml", ".yml")


def reward_config_key(name: str) -> str:
    """The params.yaml key that configures the weights of reward ``name``."""
    return f"eval.reward_paths.{name}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file's bytes (what ``sha256sum`` prints)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_digest(folder: Path, suffixes: tuple[str, ...] = MODEL_FILE_SUFFIXES) -> str:
    """sha256 over a folder's model files in sorted order: each file's relative path, then its own sha256.

    Hidden files and folders (``.cache``, ``.git``...) are skipped, so the digest only changes with the model.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in suffixes:
            continue
        digest.update(relative.as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def path_digest(path: Path) -> str:
    """sha256 of a file, or :func:`folder_digest` of a folder."""
    return folder_digest(path) if path.is_dir() else file_sha256(path)


def default_cache_dir() -> Path:
    """Local copies of remote reward weights (``$SDPO_CACHE`` or ``~/.cache/sdpo``)."""
    return Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo")) / "rewards"


def copy_remote(uri: str, cache_dir: Path) -> Path:
    """Copy a file or folder at a pyarrow-filesystem URI (s3://, gs://, file://...) into ``cache_dir`` once."""
    from pyarrow import fs

    try:
        filesystem, remote_path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(remote_path)
    except Exception as err:  # pyarrow raises several types (ArrowInvalid, OSError) for unusable URIs
        raise ModelError(f"{uri}: cannot open this URI ({err})") from err
    if info.type == fs.FileType.NotFound:
        raise ModelError(f"{uri}: not found")
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(remote_path.rstrip("/")).name
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        if partial.is_dir():  # left over from an interrupted copy
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()
        (partial if info.type == fs.FileType.Directory else partial.parent).mkdir(parents=True, exist_ok=True)
        fs.copy_files(remote_path, str(partial), source_filesystem=filesystem)
        partial.rename(target)
    return target


def resolve_weights(name: str, location: str | None, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """Local path of reward ``name``'s weights, checked to exist and to match the sha256 pin if one is given.

    ``location`` is a local path, a ``file://`` URI, or a remote URI that pyarrow can open (``s3://``).
    A folder's pin is :func:`folder_digest`; a file's pin is its plain sha256.
    """
    key = reward_config_key(name)
    if not location:
        raise ModelError(f"reward {name!r} needs weights: set {key} to a local folder or URI")
    parsed = urlparse(location)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        path = Path(parsed.path if parsed.scheme == "file" else location).expanduser()
        if not path.exists():
            raise ModelError(f"{key}: {path} does not exist")
    else:
        path = copy_remote(location, cache_dir or default_cache_dir())
    if sha256:
        actual = path_digest(path)
        if actual.lower() != sha256.strip().lower():
            raise ModelError(
                f"{path}: sha256 mismatch for reward {name!r}: eval.reward_sha256.{name} pins {sha256}, "
                f"the {'folder' if path.is_dir() else 'file'} has {actual}"
            )
    return path


def read_state_dict(path: Path, what: str) -> dict:
    """Tensors of a checkpoint file: ``weights_only`` torch.load (never unpickles code) or safetensors.

    A ``{"state_dict": {...}}`` wrapper is unwrapped; ``what`` names the checkpoint in errors.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load and safetensors raise many types for corrupt or foreign files
        raise ModelError(f"{path}: cannot read the {what} checkpoint: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state
