"""Item 3: reference handling, a frozen copy of the denoiser vs the same network with its LoRA adapters disabled.

Each variant runs in a fresh Python process (``python -m bench.bench_reference --worker ...``), so its memory peak is
its own: on CPU the peak resident set size (``VmHWM``, :func:`bench.common.peak_rss_mib`) and its rise over the
process after imports; on a GPU ``torch.cuda.max_memory_allocated``. Step time is the median of full training steps
(DPO + pair safeguard) on a fixed batch. Note that the two variants also differ in what is trained: LoRA trains
only the adapters (smaller gradients and optimizer state), which is the point of using it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import median, peak_rss_mib

VARIANTS = ("frozen_copy", "lora_disabled")


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside the fresh process: set up the trainer for one variant, time steps, report memory peaks."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (imported before the baseline RSS, so the rise is training's alone)

    import sdpo.models  # noqa: F401
    import sdpo.train.trainer  # noqa: F401
    from bench.common import interleaved_timings, synchronizer
    from bench.rig import StepRig, first_batch_inputs, sdpo_objective
    from bench.workspace import Workspace, set_up_trainer

    on_gpu = torch.cuda.is_available()
    rss_after_imports = psutil.Process().memory_info().rss
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    ws = Workspace(**{k: Path(v) if k in ("root", "model_dir", "shards_dir") else v
                      for k, v in json.loads(args.workspace).items()})
    optimizer = args.optimizer
    trainer = set_up_trainer(ws, Path(args.run_dir), pairs=args.pairs, lora=args.worker == "lora_disabled",
                             optimizer=optimizer, mixed_precision=args.mixed_precision)
    denoiser = trainer.accelerator.unwrap_model(trainer.denoiser)
    rig = StepRig(trainer, first_batch_inputs(trainer))
    step = rig.stepper(sdpo_objective(trainer, "pair"))
    samples = interleaved_timings({"step": step}, rounds=args.steps, warmup=args.warmup,
                                  sync=synchronizer(trainer.accelerator.device))
    result: dict[str, Any] = {
        "step_s_median": median(samples["step"]),
        "step_s": samples["step"],
        "trainable_params": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_imports_mib": rss_after_imports / 2**20,
    }
    result["peak_rss_rise_mib"] = result["peak_rss_mib"] - result["rss_after_imports_mib"]
    if on_gpu:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_variant(variant: str, ws, run_dir: Path, *, pairs: int, steps: int, warmup: int, threads: int,
                optimizer: str = "adamw", mixed_precision: str = "no") -> dict[str, Any]:
    """Run one variant in a fresh process and return its measurements."""
    workspace = {k: str(v) if isinstance(v, Path) else v for k, v in vars(ws).items()}
    command = [sys.executable, "-m", "bench.bench_reference", "--worker", variant, "--workspace", json.dumps(workspace),
               "--run-dir", str(run_dir), "--pairs", str(pairs), "--steps", str(steps), "--warmup", str(warmup),
               "--threads", str(threads), "--optimizer", optimizer, "--mixed-precision", mixed_precision]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench reference worker {variant!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(ws, work: Path, *, pairs: int, steps: int, warmup: int, repeats: int, threads: int,
            optimizer: str = "adamw", mixed_precision: str = "no") -> dict[str, Any]:
    """Alternate the variants (frozen, lora, frozen, lora, ...) ``repeats`` times; pool steps, keep the largest peak."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS:
            runs[variant].append(run_variant(variant, ws, work / f"{variant}-{r}", pairs=pairs, steps=steps,
                                             warmup=warmup, threads=threads, optimizer=optimizer,
                                             mixed_precision=mixed_precision))
    result: dict[str, Any] = {"pairs_per_step": pairs, "processes_per_variant": repeats, "optimizer": optimizer}
    for variant, reports in runs.items():
        pooled = [s for report in reports for s in report["step_s"]]
        summary = {k: v for k, v in reports[0].items() if k != "step_s"}
        summary["step_s_median"] = median(pooled)
        for key in ("peak_rss_mib", "peak_rss_rise_mib", "cuda_max_allocated_mib"):
            if key in summary:
                summary[key] = max(report[key] for report in reports)
        result[variant] = summary
    frozen, lora = result["frozen_copy"], result["lora_disabled"]
    result["step_time_lora_vs_frozen"] = lora["step_s_median"] / frozen["step_s_median"]
    result["peak_rss_rise_lora_vs_frozen"] = lora["peak_rss_rise_mib"] / frozen["peak_rss_rise_mib"]
    if "cuda_max_allocated_mib" in frozen:
        result["cuda_peak_lora_vs_frozen"] = lora["cuda_max_allocated_mib"] / frozen["cuda_max_allocated_mib"]
    return result


def run(out: dict, quick: bool, threads: int = 1) -> None:
    """The toy model on CPU; stores ``out["reference"]``."""
    from bench.workspace import toy_workspace

    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        ws = toy_workspace(Path(tmp), pairs=64)
        result = measure(ws, Path(tmp), pairs=16, steps=4 if quick else 10, warmup=1 if quick else 2,
                         repeats=1 if quick else 2, threads=threads)
    out["reference"] = {"model": ws.label, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description="one reference-handling variant in this process (internal)")
    parser.add_argument("--worker", choices=VARIANTS, required=True, help="which reference handling to measure")
    parser.add_argument("--workspace", required=True, help="the Workspace as JSON (model folder, shards, ...)")
    parser.add_argument("--run-dir", required=True, help="output folder for the trainer")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--optimizer", default="adamw", help="train.optimizer (adamw, adafactor, ...)")
    parser.add_argument("--mixed-precision", default="no", help="train.mixed_precision (no, bf16, fp16)")
    print(json.dumps(_worker(parser.parse_args())))


if __name__ == "__main__":
    main()
