"""Item 4: latent cache, step time with on-the-fly VAE + text encoding vs precomputed latents and embeddings.

Both variants train the same model on the same batches, held in memory (data loading is excluded from both):
``on_the_fly`` encodes images and captions every step as the trainer does (``Trainer._encode``), ``cached`` starts
from latents and text embeddings computed once beforehand (what a latent cache stores). Also: the bytes a cache
needs per pair in fp16, against the size of the image shards.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import interleaved_timings, ratio_of_medians, summary, synchronizer
from bench.rig import StepRig, inputs_from_batch, inputs_from_encoded, sdpo_objective


def measure(trainer, *, batches: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved full steps of both variants over the same ``batches`` in-memory batches."""
    loader = iter(trainer.loader)
    held = [next(loader) for _ in range(batches)]
    with torch.no_grad():
        cache = [trainer._encode(batch) for batch in held]
    objective = sdpo_objective(trainer, "pair")
    cycle_raw, cycle_cached = itertools.cycle(held), itertools.cycle(cache)

    def on_the_fly() -> None:
        StepRig(trainer, inputs_from_batch(trainer, next(cycle_raw))).step(objective)

    def cached() -> None:
        StepRig(trainer, inputs_from_encoded(trainer, next(cycle_cached))).step(objective)

    samples = interleaved_timings({"on_the_fly": on_the_fly, "cached": cached}, rounds=rounds, warmup=warmup,
                                  sync=synchronizer(trainer.accelerator.device))
    cached_vs = ratio_of_medians(samples["cached"], samples["on_the_fly"])
    lat_w, cond = cache[0].lat_w, cache[0].cond
    pairs = lat_w.shape[0]
    latent_bytes = 2 * lat_w[0].numel() * 2  # winner + loser, fp16
    text_bytes = sum(v[0].numel() for v in cond.values()) * 2
    shards = trainer.data_manifest["shards"]
    shard_bytes = sum(s["bytes"] for s in shards) / max(1, sum(s["pairs"] for s in shards))
    return {
        "pairs_per_step": pairs,
        "step_s": {name: summary(values) for name, values in samples.items()},
        "ratio_cached_vs_on_the_fly": cached_vs["ratio"],
        "ratio_cached_vs_on_the_fly_ci95": cached_vs["ci95"],
        "speedup_cached": 1.0 / cached_vs["ratio"],
        "cache_latent_bytes_per_pair_fp16": latent_bytes,
        "cache_text_bytes_per_pair_fp16": text_bytes,
        "shard_bytes_per_pair": shard_bytes,
    }


def run(out: dict, quick: bool) -> None:
    """The toy model on 16 px shards; stores ``out["cache"]``."""
    from bench.workspace import set_up_trainer, toy_workspace

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        ws = toy_workspace(Path(tmp), pairs=64)
        trainer = set_up_trainer(ws, Path(tmp) / "run", pairs=16)
        result = measure(trainer, batches=4, rounds=4 if quick else 16, warmup=1 if quick else 2)
    out["cache"] = {"model": ws.label, **result}
