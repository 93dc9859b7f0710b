"""Items 1-4 on one GPU: an SD1.5-shaped model at 512 px (64x64 latents) in bf16 autocast, plus MFU.

``bench/gpu.sh OUTDIR`` runs it (see bench/README.md for bringing the project's pure-Python dependencies as wheels).
Writes ``OUTDIR/gpu.json``:

- ``overhead``: item 1 (step-time ratios of our pair safeguard and of the reference approach to plain DPO);
- ``mfu``: model FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``: reference forward,
  policy forward and backward) per second of the median step, over the card's dense bf16 peak (null when the card
  is not in :data:`PEAK_BF16_TFLOPS`);
- ``reference_autocast``: the frozen-copy reference forward outside autocast (fp32, what the trainer did before
  ``sdpo.train.reference.forward_context``) over the same forward under autocast (what it does now);
- ``breakdown`` (item 2), ``reference`` (item 3: frozen copy vs LoRA, CUDA peak memory per fresh process),
  ``cache`` (item 4);
- ``modes`` (item 8, bench/bench_modes.py): live VAE + text encoders + reference vs the latent cache vs the cache
  with precomputed reference errors, at SD1.5 (512 px, AdamW) and SDXL (1024 px, Adafactor + gradient
  checkpointing) shapes with their real configurations (random weights) in bf16: step time, CUDA peak per fresh
  process, the ratios to ``live``, and MFU per mode (``modes.<size>.<mode>.mfu``).

``--cpu-smoke`` runs the same code path on CPU with the tiny SD1.5 test pipeline (32 px) and 1-2 rounds; its
``modes`` runs the tiny SDXL shape only (Adafactor + gradient checkpointing): the tiny SD1.5 shape of item 8 is what
``python -m bench modes --quick`` measures, so the smoke does not spend three more processes on it.
Items that would start after ``--budget-s`` are recorded as not measured instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

# dense bf16 peak TFLOP/s by device name (first match wins; "L4" must not match "L40S")
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 125.0),
)
RESULT_KEYS = ("machine", "settings", "overhead", "mfu", "reference_autocast", "breakdown", "reference", "cache",
               "modes")
# item 8 on the GPU: size -> (optimizer, gradient checkpointing), as the recipes train them
GPU_MODES = {"sd15-512": ("adamw", False), "sdxl-1024": ("adafactor", True)}
SMOKE_MODES = {"tiny-sdxl": ("adafactor", True)}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`, None for an unknown card."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def step_flops(rig, objective) -> int:
    """FLOPs of one training step (forwards and backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        rig.step(objective)
    return int(counter.get_total_flops())


def mfu(trainer, step_s: float, device_name: str) -> dict[str, Any]:
    from bench.rig import StepRig, first_batch_inputs, sdpo_objective

    flops = step_flops(StepRig(trainer, first_batch_inputs(trainer)), sdpo_objective(trainer, "pair"))
    peak = peak_bf16_tflops(device_name)
    achieved = flops / step_s / 1e12
    return {
        "device_name": device_name,
        "step_tflop": flops / 1e12,
        "step_s_median": step_s,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def reference_autocast(trainer, *, rounds: int) -> dict[str, Any]:
    """The frozen reference's forward outside autocast (fp32: what the trainer did before its reference forward ran
    under ``sdpo.train.reference.forward_context``) vs inside it (what it does now): the cost that change saved."""
    import torch

    from bench.common import interleaved_timings, median, synchronizer
    from bench.rig import first_batch_inputs

    if trainer.reference is None:
        return {"measured": False, "reason": "not measured: LoRA reference (runs under the policy's autocast)"}
    x = first_batch_inputs(trainer)

    def forward(autocast: bool) -> None:
        with torch.no_grad(), torch.autocast(trainer.accelerator.device.type, dtype=torch.bfloat16, enabled=autocast):
            trainer.model.predict(trainer.reference, x.noisy, x.timesteps, x.cond)

    samples = interleaved_timings({"as_trainer": lambda: forward(False), "autocast": lambda: forward(True)},
                                  rounds=rounds, warmup=1, sync=synchronizer(trainer.accelerator.device))
    return {
        "as_trainer_s": median(samples["as_trainer"]),
        "autocast_s": median(samples["autocast"]),
        "ratio_as_trainer_vs_autocast": median(samples["as_trainer"]) / median(samples["autocast"]),
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.cpu_smoke:
        return {"model": "tiny-sd15", "pairs": 2, "rounds": 2, "warmup": 0, "objective_rounds": 3,
                "breakdown_steps": 2, "cache_rounds": 2, "reference_steps": 2, "dataloader_workers": (0,),
                "shard_pairs": 8, "threads": 1, "modes_sizes": SMOKE_MODES, "modes_rounds": 1, "modes_warmup": 0}
    return {"model": "sd15-shaped-512", "pairs": args.pairs, "rounds": args.rounds, "warmup": 3,
            "objective_rounds": 100, "breakdown_steps": 10, "cache_rounds": 10, "reference_steps": 8,
            "dataloader_workers": (0, 4), "shard_pairs": 16 * args.pairs, "threads": 4, "modes_sizes": GPU_MODES,
            "modes_rounds": 5, "modes_warmup": 1}


def modes(settings: dict[str, Any], work: Path, device_name: str, over_budget) -> dict[str, Any]:
    """Item 8 at each size of ``settings["modes_sizes"]`` in bf16, with MFU per mode."""
    from bench import bench_modes

    peak = peak_bf16_tflops(device_name)
    out: dict[str, Any] = {}
    for size, (optimizer, checkpointing) in settings["modes_sizes"].items():
        if over_budget(f"modes.{size}"):
            out[size] = {"measured": False, "reason": "not measured: time budget spent"}
            continue
        ws = bench_modes.workspace_for(size, work / f"modes-{size}", pairs=2 * settings["pairs"])
        result = bench_modes.measure(ws, pairs=settings["pairs"], rounds=settings["modes_rounds"],
                                     warmup=settings["modes_warmup"], threads=settings["threads"],
                                     mixed_precision="bf16", optimizer=optimizer,
                                     gradient_checkpointing=checkpointing, count_flops=True)
        for mode in bench_modes.MODES:
            this = result[mode]
            achieved = this["step_flops"] / this["step_s_median"] / 1e12
            this["achieved_tflops"] = achieved
            this["mfu"] = achieved / peak if peak else None
        out[size] = result
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench import bench_breakdown, bench_cache, bench_overhead, bench_reference
    from bench.common import machine_info
    from bench.workspace import release, sd15_shaped_workspace, set_up_trainer, tiny_family_workspace

    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke on a CPU")
    settings = _settings(args)
    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "settings": settings}
    device_name = report["machine"]["device"]

    def over_budget(item: str) -> bool:
        if time.perf_counter() - started <= args.budget_s:
            return False
        if "." not in item:
            report[item] = {"measured": False, "reason": f"not measured: time budget of {args.budget_s} s spent"}
        return True

    if args.modes_only:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            report["modes"] = modes(settings, Path(tmp), device_name, over_budget)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        return report
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        if args.cpu_smoke:
            ws = tiny_family_workspace(work, "sd15", pairs=settings["shard_pairs"])
        else:
            ws = sd15_shaped_workspace(work, latent_size=64, full_encoders=True, pairs=settings["shard_pairs"])
        settings["workspace"] = ws.label
        settings["setup_s"] = round(time.perf_counter() - started, 1)
        common = {"pairs": settings["pairs"], "mixed_precision": "bf16"}

        trainer = set_up_trainer(ws, work / "run-main", **common)
        report["overhead"] = bench_overhead.measure(trainer, rounds=settings["rounds"], warmup=settings["warmup"],
                                                    objective_rounds=settings["objective_rounds"])
        report["mfu"] = mfu(trainer, report["overhead"]["step_s"]["sdpo_pair"]["median_s"], device_name)
        report["reference_autocast"] = reference_autocast(trainer, rounds=max(2, settings["rounds"] // 2))
        if not over_budget("cache"):
            report["cache"] = bench_cache.measure(trainer, batches=2, rounds=settings["cache_rounds"], warmup=1)
        release(trainer)

        if not over_budget("breakdown"):
            report["breakdown"] = {}
            for workers in settings["dataloader_workers"]:
                trainer = set_up_trainer(ws, work / f"run-{workers}", dataloader_workers=workers, **common)
                report["breakdown"][f"workers_{workers}"] = bench_breakdown.measure(
                    trainer, steps=settings["breakdown_steps"], warmup=1)
                release(trainer)

        if not over_budget("reference"):
            report["reference"] = bench_reference.measure(
                ws, work, pairs=settings["pairs"], steps=settings["reference_steps"], warmup=1, repeats=1,
                threads=settings["threads"], mixed_precision="bf16")
        if not over_budget("modes"):
            report["modes"] = modes(settings, work, device_name, over_budget)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="folder for gpu.json (created)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same code on CPU with the tiny SD1.5 pipeline and 2 rounds (for tests)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step on the GPU (default 4)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds for item 1 (default 20)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds after which remaining items are skipped (default 420, to end within 8 min)")
    parser.add_argument("--modes-only", action="store_true",
                        help="run only item 8 (modes: live / cached / precomputed reference at SD1.5 and SDXL shapes)")
    args = parser.parse_args(argv)

    from bench.common import flat_figures, format_table, write_json

    report = run(args)
    path = write_json(Path(args.outdir) / "gpu.json", report)
    rows = [(k, v) for k, v in flat_figures(report) if "step_s." not in k and "phase_s" not in k]
    print(format_table([("figure", "value"), *rows]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
