"""Item 8: what the latent cache and precomputed reference errors save, in step time and peak memory.

Three ways to run the same DPO + pair-safeguard training step, each set up by the trainer itself
(``Trainer._setup``) and stepped with the trainer's own micro-step (``Trainer._micro_step``, backward, clipping,
optimizer and scheduler: :func:`bench.bench_breakdown._trainer_step`):

- ``live`` (a): images through the VAE and captions through the text encoder(s) every step, a frozen reference
  copy of the denoiser forward every step (``train.cache=false``);
- ``cached`` (b): latents and text embeddings from the latent cache that ``sdpo encode`` wrote (no VAE, no text
  encoder in memory), reference forward every step (``train.cache=true``);
- ``precomputed`` (c): the cache plus the reference's per-pair errors computed once by ``sdpo encode``: no reference
  model at all (``train.precompute_reference=true``).

The cache is written once by the stage code (``sdpo.stages.encode``, timed as ``encode_s``), with the settings the
three runs train with. Each mode runs in a fresh Python process, so its memory peak is its own: on CPU the peak
resident set (``VmHWM``, :func:`bench.common.peak_rss_mib`) and its rise over the process after imports, on a GPU
``torch.cuda.max_memory_allocated``. On CPU ``cpu_time_<mode>_vs_live`` compares process CPU time too (less noisy
on a shared machine; meaningless on a GPU).
Batches are fetched from the trainer's loader before timing (data loading is excluded from every mode). Ratios:
``step_time_<mode>_vs_live`` and ``peak_rise_<mode>_vs_live`` (CPU) / ``cuda_peak_<mode>_vs_live`` (GPU), and what
is in memory under each mode (``params``: denoiser, reference, encoders; ``reference_in_memory``).

Sizes (:func:`workspace_for`): ``tiny`` (the tiny SD1.5 test pipeline, 32 px: the quick smoke), ``toy`` (the embedded
toy model, 16 px), ``sd15-512-truncated`` (SD1.5's real VAE and CLIP ViT-L text encoder configurations at 512 px,
random weights, and a truncated UNet with SD1.5's first-level width: what fits a CPU), and for a GPU ``sd15-512``
(the full SD1.5 UNet) and ``sdxl-1024`` (SDXL's UNet, VAE and both text encoders).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, peak_rss_mib

MODES = ("live", "cached", "precomputed")
CPU_SIZES = ("tiny", "toy", "sd15-512-truncated")
GPU_SIZES = ("sd15-512", "sdxl-1024")


def mode_settings(mode: str) -> dict[str, Any]:
    """The ``train`` keys that select a mode."""
    return {"cache": mode != "live", "precompute_reference": mode == "precomputed"}


def modes_config(ws, *, mode: str, pairs: int, steps: int, mixed_precision: str = "no", optimizer: str = "adamw",
                 gradient_checkpointing: bool = False):
    """The default params with this workspace's model and data, one of :data:`MODES`, and the bench's batch."""
    from sdpo.config import validate_config

    raw = {
        "data": {"resolution": ws.resolution, "root": str(ws.root / "run-root")},
        "model": {"family": ws.family, "base": str(ws.model_dir)},
        "train": {
            "method": "dpo", "safeguard": "pair", "variants": {"bench": {}}, "batch_size": pairs, "steps": steps,
            "optimizer": optimizer, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "heldout_every": 0, "prompt_dropout": 0.2,
            "cache_batch_size": max(1, pairs), **mode_settings(mode),
        },
        "registry": {"candidate": "bench"},
    }
    return validate_config(raw, f"bench modes ({mode})")


def encode_cache(ws, **config: Any) -> dict[str, Any]:
    """``sdpo encode`` (the stage function) on the workspace's shards, with reference errors; returns the cache."""
    from sdpo import fs, stages

    cfg = modes_config(ws, mode="precomputed", **config)
    ctx = stages.StageContext.from_config(cfg, ws.root)
    target = ctx.layout.shards("train")
    if not fs.exists(fs.join(target, "manifest.json")):
        shutil.copytree(ws.shards_dir, target)
    start = time.perf_counter()
    result = stages.encode(ctx, "train", base=str(ws.model_dir))
    seconds = time.perf_counter() - start
    return {"cache_dir": ctx.layout.cache("train"), "shards_dir": target, "encode_s": seconds,
            "pairs": result["pairs"], "encode_s_per_pair": seconds / max(1, result["pairs"]),
            "reference_epochs": result["reference_epochs"]}


def _module_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def memory_contents(trainer) -> dict[str, Any]:
    """Parameters held by the trainer: the denoiser, the frozen reference, the VAE and text encoders."""
    import torch

    pipeline = trainer.model.pipeline
    encoders = {name: _module_params(getattr(pipeline, name, None))
                for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                if isinstance(getattr(pipeline, name, None), torch.nn.Module)}
    reference = _module_params(trainer.reference)
    return {
        "params": {"denoiser": _module_params(trainer.accelerator.unwrap_model(trainer.denoiser)),
                   "reference": reference, "encoders": sum(encoders.values()), **{f"encoder_{k}": v
                                                                                  for k, v in encoders.items()}},
        "reference_in_memory": trainer.reference is not None,
        "encoders_in_memory": bool(encoders),
        "precomputed_reference": trainer.precomputed is not None,
    }


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside the fresh process: set up the trainer for one mode, time its steps, report memory peaks."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    import sdpo.models  # noqa: F401  (imported before the baseline, so the rise is training's alone)
    import sdpo.train.trainer  # noqa: F401
    from bench.bench_breakdown import _trainer_step
    from bench.common import interleaved_timings, synchronizer
    from bench.workspace import Workspace
    from sdpo.train.trainer import Trainer

    on_gpu = torch.cuda.is_available()
    rss_after_imports = psutil.Process().memory_info().rss
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    ws = Workspace(**{k: Path(v) if k in ("root", "model_dir", "shards_dir") else v
                      for k, v in json.loads(args.workspace).items()})
    steps = args.warmup + args.rounds + (1 if args.count_flops else 0)
    cfg = modes_config(ws, mode=args.mode, pairs=args.pairs, steps=steps, mixed_precision=args.mixed_precision,
                       optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing)
    cache = args.cache_dir if args.mode != "live" else None
    trainer = Trainer(cfg, shards_dir=args.shards_dir, base_model=str(ws.model_dir), output_dir=args.run_dir,
                      variant="bench", show_progress=False, cache_dir=cache)
    trainer._setup()
    loader = iter(trainer.loader)
    batches = iter([next(loader) for _ in range(steps)])  # in memory: data loading is not timed
    counter = iter(range(1, 10**9))
    sync = synchronizer(trainer.accelerator.device)
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter_mode:
            _trainer_step(trainer, batches, next(counter))
        flops = int(counter_mode.get_total_flops())
    cpu: dict[str, list[float]] = {}
    samples = interleaved_timings({"step": lambda: _trainer_step(trainer, batches, next(counter))},
                                  rounds=args.rounds, warmup=args.warmup, sync=sync, cpu_seconds=cpu)
    result: dict[str, Any] = {
        "mode": args.mode,
        "step_s_median": median(samples["step"]),
        "step_s": samples["step"],
        "cpu_s_median": median(cpu["step"]),  # process CPU time: less noisy than wall time on a shared CPU
        **memory_contents(trainer),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_imports_mib": rss_after_imports / 2**20,
        "step_flops": flops,
    }
    result["peak_rss_rise_mib"] = result["peak_rss_mib"] - result["rss_after_imports_mib"]
    if on_gpu:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_mode(mode: str, ws, cache: dict[str, Any], run_dir: Path, *, pairs: int, rounds: int, warmup: int,
             threads: int, mixed_precision: str = "no", optimizer: str = "adamw", gradient_checkpointing: bool = False,
             count_flops: bool = False) -> dict[str, Any]:
    """One mode in a fresh process; its measurements."""
    workspace = {k: str(v) if isinstance(v, Path) else v for k, v in vars(ws).items()}
    command = [sys.executable, "-m", "bench.bench_modes", "--worker", "--mode", mode, "--workspace",
               json.dumps(workspace), "--cache-dir", str(cache["cache_dir"]), "--shards-dir", str(cache["shards_dir"]),
               "--run-dir", str(run_dir), "--pairs", str(pairs), "--rounds", str(rounds), "--warmup", str(warmup),
               "--threads", str(threads), "--optimizer", optimizer, "--mixed-precision", mixed_precision]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if count_flops:
        command.append("--count-flops")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench modes worker {mode!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a / b):
        return None
    return a / b


def measure(ws, *, pairs: int, rounds: int, warmup: int, threads: int, mixed_precision: str = "no",
            optimizer: str = "adamw", gradient_checkpointing: bool = False, count_flops: bool = False,
            rounds_live: int | None = None) -> dict[str, Any]:
    """Encode the cache once, then run the three modes (each in a fresh process) and compare them with ``live``."""
    # the cache's reference errors must cover every batch any mode fetches
    config = {"pairs": pairs, "steps": warmup + max(rounds, rounds_live or 0) + (1 if count_flops else 0),
              "mixed_precision": mixed_precision, "optimizer": optimizer,
              "gradient_checkpointing": gradient_checkpointing}
    cache = encode_cache(ws, **config)
    result: dict[str, Any] = {"model": ws.label, "pairs_per_step": pairs, "mixed_precision": mixed_precision,
                              "optimizer": optimizer, "gradient_checkpointing": gradient_checkpointing,
                              "encode_s": cache["encode_s"], "encode_s_per_pair": cache["encode_s_per_pair"],
                              "cache_pairs": cache["pairs"]}
    for mode in MODES:
        result[mode] = run_mode(mode, ws, cache, ws.root / f"run-{mode}", pairs=pairs,
                                rounds=rounds_live if mode == "live" and rounds_live else rounds, warmup=warmup,
                                threads=threads, mixed_precision=mixed_precision, optimizer=optimizer,
                                gradient_checkpointing=gradient_checkpointing, count_flops=count_flops)
    live = result["live"]
    for mode in MODES[1:]:
        this = result[mode]
        result[f"step_time_{mode}_vs_live"] = _ratio(this["step_s_median"], live["step_s_median"])
        result[f"peak_rise_{mode}_vs_live"] = _ratio(this["peak_rss_rise_mib"], live["peak_rss_rise_mib"])
        result[f"peak_rss_{mode}_vs_live"] = _ratio(this["peak_rss_mib"], live["peak_rss_mib"])
        result[f"cpu_time_{mode}_vs_live"] = _ratio(this["cpu_s_median"], live["cpu_s_median"])
        if "cuda_max_allocated_mib" in live:
            result[f"cuda_peak_{mode}_vs_live"] = _ratio(this["cuda_max_allocated_mib"],
                                                         live["cuda_max_allocated_mib"])
    result["reference_in_memory_precomputed"] = result["precomputed"]["reference_in_memory"]
    result["encoders_in_memory_cached"] = result["cached"]["encoders_in_memory"]
    # what the cache costs to make, in steps it saves (live - cached step time)
    saved = live["step_s_median"] - result["cached"]["step_s_median"]
    result["encode_s_per_pair_vs_saved_per_pair"] = _ratio(cache["encode_s_per_pair"], saved / pairs) \
        if saved > 0 else None
    return result


def workspace_for(size: str, root: Path, *, pairs: int):
    """The model and shards of one benchmark size (see the module docstring)."""
    from bench import workspace as w

    if size == "tiny":
        return w.tiny_family_workspace(root, "sd15", pairs=pairs)
    if size == "tiny-sdxl":
        return w.tiny_family_workspace(root, "sdxl", pairs=pairs)
    if size == "toy":
        return w.toy_workspace(root, pairs=pairs)
    if size == "sd15-512-truncated":
        return w.sd15_encoders_workspace(root, pairs=pairs, unet="truncated")
    if size == "sd15-512":
        return w.sd15_encoders_workspace(root, pairs=pairs, unet="full")
    if size == "sdxl-1024":
        return w.sdxl_workspace(root, pairs=pairs)
    raise ValueError(f"unknown size {size!r}")


# per size on CPU: (pairs per step, rounds, warm-up rounds, rounds of the live mode, pairs in the shards); at 512 px
# one live step takes about a minute here, and encoding one pair as long
CPU_PLAN = {"tiny": (2, 2, 0, 2, 4), "toy": (16, 8, 1, 8, 32), "sd15-512-truncated": (1, 2, 0, 1, 1)}


def run(out: dict, quick: bool, threads: int = 1, sizes: tuple[str, ...] | None = None) -> None:
    """CPU: the toy model and the SD1.5-encoders-at-512-px model (``--quick``: the tiny pipeline only)."""
    sizes = sizes or (("tiny",) if quick else ("toy", "sd15-512-truncated"))
    results: dict[str, Any] = {}
    for size in sizes:
        pairs, rounds, warmup, rounds_live, shard_pairs = CPU_PLAN[size]
        with tempfile.TemporaryDirectory(prefix=f"bench-modes-{size}-") as tmp:
            ws = workspace_for(size, Path(tmp), pairs=shard_pairs)
            start = time.perf_counter()
            results[size] = measure(ws, pairs=pairs, rounds=rounds, warmup=warmup, threads=threads,
                                    rounds_live=rounds_live)
            results[size]["wall_s"] = round(time.perf_counter() - start, 1)
    out["modes"] = results


def main() -> None:
    parser = argparse.ArgumentParser(description="one training mode of bench item 8 in this process (internal)")
    parser.add_argument("--worker", action="store_true", required=True, help="run one mode and print JSON")
    parser.add_argument("--mode", choices=MODES, required=True, help="live, cached or precomputed")
    parser.add_argument("--workspace", required=True, help="the Workspace as JSON (model folder, shards, ...)")
    parser.add_argument("--cache-dir", required=True, help="the latent cache written by the encode stage")
    parser.add_argument("--shards-dir", required=True, help="the train shards the cache was encoded from")
    parser.add_argument("--run-dir", required=True, help="output folder for the trainer")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--optimizer", default="adamw", help="train.optimizer")
    parser.add_argument("--mixed-precision", default="no", help="train.mixed_precision (no, bf16, fp16)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--count-flops", action="store_true", help="count one step's FLOPs first (for MFU)")
    print(json.dumps(_worker(parser.parse_args())))


if __name__ == "__main__":
    main()
