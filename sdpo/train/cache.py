"""The latent cache: what the VAE and the text encoders make of a dataset, computed once, in shards beside it.

A cache folder (``RunLayout.cache(split)``, written by ``sdpo encode``) holds::

    pairs-000000.tar ...        one sample per pair, same keys as the image shards, members
                                  KEY.win.npy, KEY.lose.npy    VAE posterior [F, 2, C, h, w]: F orientations
                                                               (the pair as stored, then mirrored when flips are
                                                               cached), then (mean, std) in the scaled latent space
                                  KEY.<name>.npy               each conditioning tensor of the family (SD1.5/SD2:
                                                               encoder_hidden_states; SDXL: + text_embeds, time_ids;
                                                               SD3: encoder_hidden_states, pooled_projections)
                                  KEY.txt, KEY.json            caption and metadata, as in the image shards
    empty_prompt.safetensors    the conditioning of the empty prompt, once (prompt dropout)
    reference_errors.npy        optional: float32 [pairs, epochs, 2] reference errors (r_w, r_l) of every draw
    manifest.json               written last: the image shards' manifest keys (so the shards are verified like a
                                dataset's) plus ``cache``: model folder, component digests, dtype, resolution,
                                shapes, flips; and ``reference`` when the errors are there

Storing the posterior's mean and std (not a sample) keeps training exact: the trainer samples
``mean + std * eps`` with the pair's own normals (:mod:`sdpo.train.noise`), from the cache or live alike.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdpo.data.loader import SampleFailure, placement
from sdpo.data.shards import SCHEMA_VERSION, ShardWriter, file_sha256, index_shard, write_manifest
from sdpo.errors import DataError

KIND = "sdpo-latent-cache"
CACHE_VERSION = 1
EMPTY_PROMPT = "empty_prompt.safetensors"
REFERENCE_ERRORS = "reference_errors.npy"
IMAGE_FIELDS = ("win", "lose")
_DTYPES = {"float16": np.float16, "float32": np.float32}


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` file bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{where}: not a valid .npy member ({err})") from None


def file_entry(path: Path) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of a file of the cache folder."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class CacheWriter:
    """Write cache samples in dataset order into ``pairs-%06d.tar`` shards, then the manifest (last)."""

    def __init__(self, folder: str | Path, *, dtype: str, shard_max_pairs: int) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: allowed {sorted(_DTYPES)}")
        self.folder = Path(folder)
        self.dtype = _DTYPES[dtype]
        self.dtype_name = dtype
        self._shards = ShardWriter(self.folder, shard_max_pairs)
        self.cond_names: list[str] | None = None
        self.count = 0

    def write(self, key: str, *, caption: str, meta: dict[str, Any], win: np.ndarray, lose: np.ndarray,
              cond: dict[str, np.ndarray]) -> None:
        """One pair: posteriors ``[F, 2, C, h, w]`` (orientations, then mean/std) and its conditioning tensors."""
        names = sorted(cond)
        if self.cond_names is None:
            self.cond_names = names
        elif names != self.cond_names:
            raise ValueError(f"pair {key!r}: conditioning {names}, earlier pairs had {self.cond_names}")
        fields = {"win.npy": npy_bytes(win.astype(self.dtype)), "lose.npy": npy_bytes(lose.astype(self.dtype)),
                  "txt": caption.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        fields.update({f"{name}.npy": npy_bytes(cond[name].astype(self.dtype)) for name in names})
        self._shards.write(key, fields)
        self.count += 1

    def save_empty_prompt(self, cond: dict[str, torch.Tensor]) -> None:
        """The empty prompt's conditioning (one row), for prompt dropout."""
        from safetensors.torch import save_file

        tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in cond.items()}
        save_file(tensors, str(self.folder / EMPTY_PROMPT))

    def finish(self, *, source: dict[str, Any], cache: dict[str, Any], config: dict[str, Any],
               reference: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the shards and write ``manifest.json`` (the last file); returns the manifest."""
        shards = self._shards.close()
        pairs = sum(s["pairs"] for s in shards)
        if pairs != source["pairs"]:
            raise DataError(f"{self.folder}: {pairs} pairs cached, the source has {source['pairs']}")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "cache_version": CACHE_VERSION,
            "inputs": [source],
            "rows_read": source["pairs"],
            "pairs_written": pairs,
            "skipped": {},
            "shards": shards,
            "resolution": cache["resolution"],
            "fields": sorted([*IMAGE_FIELDS, "txt", "json", *(self.cond_names or [])]),
            "config": config,
            "cache": {**cache, "dtype": self.dtype_name, "cond": self.cond_names or [],
                      "empty_prompt": file_entry(self.folder / EMPTY_PROMPT)},
            "reference": reference,
        }
        write_manifest(self.folder, manifest)
        return manifest


def read_cache_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder; :class:`DataError` if the folder is not a latent cache."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{folder}: no manifest.json; not a latent cache (write one with `sdpo encode`)")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != KIND:
        raise DataError(f"{folder}: manifest.json is not a latent cache's (kind {manifest.get('kind')!r})")
    if manifest.get("cache_version") != CACHE_VERSION:
        raise DataError(f"{folder}: cache version {manifest.get('cache_version')!r}, this sdpo reads "
                        f"{CACHE_VERSION}; re-run `sdpo encode`")
    return manifest


def _check_file(folder: Path, entry: dict[str, Any]) -> Path:
    path = folder / entry["name"]
    if not path.is_file():
        raise DataError(f"{path}: listed in the cache manifest but missing")
    if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: differs from the cache manifest (size or sha256); re-run `sdpo encode`")
    return path


class CachedPairDataset:
    """Random access to a latent cache, with the interface :class:`sdpo.data.loader.PairLoader` uses.

    Opening verifies every shard against the manifest (size, sha256, tar structure, members; verdicts cached as
    for image shards) and the extra files (empty prompt, reference errors). ``item(i, flip)`` gives the posterior
    moments of the pair's winner and loser in that orientation and its conditioning; ``collate`` stacks them into
    ``{"win_mean", "win_std", "lose_mean", "lose_std": float32 [B, C, h, w], "cond": {name: float32 [B, ...]},
    "caption", "key", "index", "epoch"}``.
    """

    def __init__(self, folder: str | Path) -> None:
        from sdpo.data.integrity import verify_dataset_with_digest

        self.root = Path(folder)
        self.manifest = read_cache_manifest(self.root)
        fields = tuple(self.manifest["fields"])
        _, self.digest = verify_dataset_with_digest(self.root, fields=fields)
        self.info: dict[str, Any] = self.manifest["cache"]
        self.resolution: int = int(self.manifest["resolution"])
        self.flips: bool = bool(self.info["flips"])
        self.cond_names: list[str] = list(self.info["cond"])
        self.shard_paths = [self.root / shard["name"] for shard in self.manifest["shards"]]
        self._members = [*IMAGE_FIELDS, "txt", "json", *self.cond_names]
        keys: list[str] = []
        table: list[np.ndarray] = []
        shard_ids: list[np.ndarray] = []
        for shard_id, (path, shard) in enumerate(zip(self.shard_paths, self.manifest["shards"], strict=True)):
            entries = index_shard(path, expected_pairs=shard["pairs"], fields=fields)
            rows = np.zeros((len(entries), len(self._members), 2), dtype=np.int64)
            for row, (key, members) in enumerate(entries):
                by_stem = {name.split(".", 1)[0]: ref for name, ref in members.items()}
                for col, stem in enumerate(self._members):
                    rows[row, col] = (by_stem[stem].offset, by_stem[stem].size)
                keys.append(key)
            table.append(rows)
            shard_ids.append(np.full(len(entries), shard_id, dtype=np.int32))
        self.keys = keys
        self._table = np.concatenate(table) if table else np.zeros((0, len(self._members), 2), np.int64)
        self._shard_ids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._fds: dict[int, int] = {}
        self._fd_pid = os.getpid()
        self._empty: dict[str, torch.Tensor] | None = None
        _check_file(self.root, self.info["empty_prompt"])
        self.reference = self.manifest.get("reference")
        if self.reference:
            _check_file(self.root, self.reference["file"])

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def _fd(self, shard_id: int) -> int:
        if self._fd_pid != os.getpid():
            self._fds, self._fd_pid = {}, os.getpid()
        if shard_id not in self._fds:
            self._fds[shard_id] = os.open(self.shard_paths[shard_id], os.O_RDONLY)
        return self._fds[shard_id]

    def describe(self, i: int) -> str:
        return f"{self.shard_paths[int(self._shard_ids[i])]}: sample {self.keys[i]!r}"

    def _read(self, i: int) -> dict[str, bytes]:
        fd = self._fd(int(self._shard_ids[i]))
        return {stem: os.pread(fd, int(self._table[i, col, 1]), int(self._table[i, col, 0]))
                for col, stem in enumerate(self._members)}

    def item(self, i: int, flip: bool) -> dict[str, Any]:
        """Pair ``i`` in orientation ``flip``: posterior moments (float32), conditioning, caption and key."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        raw, where = self._read(i), self.describe(i)
        side = 1 if flip else 0
        out: dict[str, Any] = {"key": self.keys[i], "caption": raw["txt"].decode("utf-8")}
        for stem in IMAGE_FIELDS:
            moments = _load_npy(raw[stem], where)
            if side >= moments.shape[0]:
                raise DataError(f"{where}: no mirrored latents in this cache (encoded with flips off)")
            out[f"{stem}_mean"] = moments[side, 0].astype(np.float32)
            out[f"{stem}_std"] = moments[side, 1].astype(np.float32)
        out["cond"] = {name: _load_npy(raw[name], where).astype(np.float32) for name in self.cond_names}
        return out

    @staticmethod
    def collate(items: Sequence[dict[str, Any] | SampleFailure]) -> dict[str, Any] | SampleFailure:
        for item in items:
            if isinstance(item, SampleFailure):
                return item
        batch: dict[str, Any] = {
            name: torch.from_numpy(np.stack([item[name] for item in items]))
            for name in ("win_mean", "win_std", "lose_mean", "lose_std")
        }
        batch["cond"] = {name: torch.from_numpy(np.stack([item["cond"][name] for item in items]))
                         for name in items[0]["cond"]}
        batch["caption"] = [item["caption"] for item in items]
        batch["key"] = [item["key"] for item in items]
        batch.update(placement(list(items)))
        return batch

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, one row per tensor (float32)."""
        if self._empty is None:
            from safetensors.torch import load_file

            self._empty = load_file(str(self.root / EMPTY_PROMPT))
        return self._empty

    def reference_errors(self) -> np.ndarray:
        """The precomputed reference errors, float32 ``[pairs, epochs, 2]`` (memory-mapped)."""
        if not self.reference:
            raise DataError(f"{self.root}: this cache holds no reference errors (encoded with "
                            "train.precompute_reference=false)")
        return np.load(self.root / self.reference["file"]["name"], mmap_mode="r", allow_pickle=False)

    def first(self, n: int) -> dict[str, Any]:
        """The first ``n`` pairs as one unflipped batch (the held-out probe's inputs)."""
        return self.collate([self.item(i, False) for i in range(min(n, len(self)))])


def component_digests(model_dir: str | Path, names: Sequence[str]) -> dict[str, str]:
    """``fs.folder_digest`` of each component folder of a diffusers pipeline that is present."""
    from sdpo import fs

    folder = Path(model_dir)
    return {name: fs.folder_digest(folder / name) for name in names if (folder / name).is_dir()}


def check_cache_matches(dataset: CachedPairDataset, *, model_dir: str | Path, family: str, resolution: int,
                        source_digest: str | None) -> None:
    """Refuse a cache made by another model, at another resolution, or from other shards (one message each)."""
    info, where = dataset.info, dataset.root
    problems: list[str] = []
    if info["family"] != family:
        problems.append(f"it was encoded for a {info['family']} model, training uses a {family} model")
    if dataset.resolution != resolution:
        problems.append(f"it was encoded at {dataset.resolution} px, the training data is {resolution} px")
    made = info["components"]
    ours = component_digests(model_dir, list(made))
    differ = sorted(name for name in made if ours.get(name) != made[name])
    if differ:
        problems.append(f"it was made by the model in {info['model']} and component(s) {differ} of the training "
                        f"model {model_dir} differ from it")
    recorded = dataset.manifest["inputs"][0].get("manifest_sha256")
    if source_digest is not None and recorded != source_digest:
        problems.append(f"it was encoded from other shards (manifest sha256 {recorded}, the training shards' is "
                        f"{source_digest})")
    if problems:
        raise DataError(f"{where}: refusing this latent cache: " + "; ".join(problems) + ". Re-run `sdpo encode`.")
