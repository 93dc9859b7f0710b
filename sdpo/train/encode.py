"""The encode pass: image shards -> latent cache (and, optionally, the reference errors of every draw).

:func:`encode_dataset` runs the VAE and the text encoders once over a dataset, in dataset order, and writes the
cache format of :mod:`sdpo.train.cache`. With ``train.precompute_reference`` it then frees the encoders and runs
the reference denoiser over every (pair, epoch) draw the training run will make (:mod:`sdpo.train.reference`).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdpo.config import TrainConfig
from sdpo.data.loader import PairDataset
from sdpo.models.components import ENCODER_COMPONENTS
from sdpo.train.cache import (
    CACHE_VERSION,
    REFERENCE_ERRORS,
    CachedPairDataset,
    CacheWriter,
    component_digests,
    file_entry,
)
from sdpo.train.reference import epochs_needed, precompute_reference_errors, settings_of

CACHE_SETTINGS = ("cache_dtype", "cache_batch_size", "cache_flips", "random_flip")  # recorded as the manifest's config


def encoder_names(model) -> list[str]:
    """The pipeline's components that shape the cached tensors (VAE, text encoders and their tokenizers)."""
    return [name for name in ENCODER_COMPONENTS if getattr(model.pipeline, name, None) is not None]


def reference_components(model) -> dict[str, str]:
    """Digests of what the reference errors depend on in a model folder: the denoiser and the noise schedule."""
    return component_digests(model.model_dir, [model.denoiser_name, "scheduler"])


def _moments(model, pixels: torch.Tensor, flips: bool) -> np.ndarray:
    """``[B, F, 2, C, h, w]``: posterior (mean, std) of the images as stored and, with ``flips``, mirrored."""
    sides = [pixels, torch.flip(pixels, dims=[-1])] if flips else [pixels]
    out = []
    for side in sides:
        mean, std = model.encode_moments(side)
        out.append(torch.stack([mean, std], dim=1))
    return torch.stack(out, dim=1).float().cpu().numpy()


@torch.no_grad()
def encode_dataset(model, shards_dir: str | Path, out_dir: str | Path, tcfg: TrainConfig, *, model_uri: str,
                   shard_max_pairs: int, source_uri: str, progress: bool = True) -> dict[str, Any]:
    """Write the latent cache of the dataset in ``shards_dir`` into ``out_dir``; returns its manifest.

    Flips: both orientations are stored when ``train.random_flip`` and ``train.cache_flips`` are on; with
    ``cache_flips`` off only the stored one (training then runs without flips and says so).
    """
    from sdpo.data.loader import collate_pairs
    from sdpo.logs import progress as sdpo_progress

    dataset = PairDataset(shards_dir)
    resolution = int(dataset.resolution)
    flips = tcfg.random_flip and tcfg.cache_flips
    if tcfg.random_flip and not tcfg.cache_flips:
        print("sdpo encode: train.cache_flips=false: the cache holds one orientation, so training from it runs "
              "without random flips")
    components = component_digests(model.model_dir, encoder_names(model))
    writer = CacheWriter(out_dir, dtype=tcfg.cache_dtype, shard_max_pairs=shard_max_pairs)
    bar = sdpo_progress(len(dataset), "encode", disable=not progress)
    latent_shape: list[int] = []
    for start in range(0, len(dataset), tcfg.cache_batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + tcfg.cache_batch_size))]
        batch = collate_pairs(items)
        device = model.device
        win = _moments(model, batch["win"].to(device), flips)
        lose = _moments(model, batch["lose"].to(device), flips)
        cond = model.encode_prompts(batch["caption"], image_size=resolution)
        cond_np = {name: value.float().cpu().numpy() for name, value in cond.items()}
        latent_shape = list(win.shape[3:])
        for row, item in enumerate(items):
            writer.write(item["key"], caption=item["caption"], meta=item["meta"], win=win[row], lose=lose[row],
                         cond={name: value[row] for name, value in cond_np.items()})
        bar.update(len(items))
    bar.close()
    writer.save_empty_prompt(model.encode_prompts([""], image_size=resolution))
    cache = {
        "model": model_uri,
        "family": model.family,
        "components": components,
        "resolution": resolution,
        "flips": flips,
        "latent_shape": latent_shape,
        "posterior": "mean and std of the VAE posterior in the scaled latent space",
    }
    source = {"uri": source_uri, "manifest_sha256": dataset.digest, "pairs": len(dataset)}
    config = {name: getattr(tcfg, name) for name in CACHE_SETTINGS}
    return writer.finish(source=source, cache=cache, config=config)


def stale_reason(manifest: dict[str, Any], *, model_dir: str | Path, source_digest: str, tcfg: TrainConfig,
                 with_reference: bool) -> str | None:
    """Why a published cache is not what encoding again would write (None: it is, and can be reused).

    It must come from the same shards (their manifest's sha256), the same VAE and text encoders (folder digests in
    ``model_dir``) and the same cache settings; with ``with_reference`` it must hold the reference errors of the
    draws this training will make, by the same denoiser and noise schedule.
    """
    cache = manifest.get("cache") or {}
    if manifest.get("cache_version") != CACHE_VERSION:
        return f"cache version {manifest.get('cache_version')}, this code writes {CACHE_VERSION}"
    if (manifest.get("inputs") or [{}])[0].get("manifest_sha256") != source_digest:
        return "it was encoded from other shards"
    if manifest.get("config") != {name: getattr(tcfg, name) for name in CACHE_SETTINGS}:
        return f"other cache settings ({', '.join(CACHE_SETTINGS)})"
    index_file = Path(model_dir) / "model_index.json"
    if not index_file.is_file():
        return "the base model is not a local diffusers folder"
    index = json.loads(index_file.read_text())
    declared = [name for name in ENCODER_COMPONENTS if (index.get(name) or [None])[0] is not None]  # [library, class]
    if cache.get("components") != component_digests(model_dir, declared):
        return "the base model's VAE or text encoders differ"
    if not with_reference:
        return None
    reference = manifest.get("reference")
    if not reference:
        return "it holds no reference errors (train.precompute_reference)"
    if reference.get("settings") != settings_of(tcfg, random_flip=bool(cache.get("flips"))):
        return "its reference errors were drawn with other training settings"
    if reference.get("epochs") != (tcfg.reference_epochs or epochs_needed(tcfg, int(manifest["pairs_written"]))):
        return "its reference errors cover another number of epochs"
    made = reference.get("denoiser_digest") or {}
    if not made or component_digests(model_dir, list(made)) != made:
        return "its reference errors were made by another denoiser or noise schedule"
    return None


def add_reference_errors(model, out_dir: str | Path, tcfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute the reference errors of every draw into the cache in ``out_dir`` and rewrite its manifest (last).

    The VAE and text encoders are dropped from ``model`` first: only the denoiser is needed.
    """
    from sdpo.data.shards import write_manifest

    for name in encoder_names(model):
        setattr(model.pipeline, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out_dir = Path(out_dir)
    dataset = CachedPairDataset(out_dir)
    epochs = tcfg.reference_epochs or epochs_needed(tcfg, len(dataset))
    errors = precompute_reference_errors(model, dataset, tcfg, epochs=epochs, random_flip=dataset.flips,
                                         batch_size=tcfg.cache_batch_size, progress=progress)
    np.save(out_dir / REFERENCE_ERRORS, errors, allow_pickle=False)
    manifest = dict(dataset.manifest)
    manifest["reference"] = {
        "file": file_entry(out_dir / REFERENCE_ERRORS),
        "epochs": epochs,
        "shape": list(errors.shape),
        "settings": settings_of(tcfg, random_flip=dataset.flips),
        "denoiser_digest": reference_components(model),
    }
    (out_dir / "manifest.json").unlink()
    write_manifest(out_dir, manifest)
    return manifest
