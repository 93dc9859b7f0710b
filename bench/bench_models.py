"""Item 7: step time per model family, and item 1's figures on an SD1.5-shaped UNet.

- ``families``: the tiny test pipelines (sd15, sd2, sdxl, sd3; 32 px, random weights) through the same trainer:
  median step time of DPO + pair safeguard, and its ratio to plain DPO, interleaved.
- ``sd15_shaped``: the overhead ratios of item 1 on a UNet with SD1.5's real layout and widths (~860M parameters,
  random weights). On CPU it runs with small latents (16x16 by default), 1 pair per step, very few rounds and the
  Adafactor optimizer (AdamW's state would not fit beside other work on a 24 GiB machine); it is skipped, with
  the reason, when free memory is short. Treat its ratios as indicative only: few rounds on a slow device.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

from bench.common import interleaved_timings, ratio_of_medians, summary, synchronizer
from bench.rig import StepRig, first_batch_inputs, objectives, sdpo_objective

FAMILIES = ("sd15", "sd2", "sdxl", "sd3")
SD15_UNET_PARAMS = 859_520_964


def family_steps(trainer, *, rounds: int, warmup: int) -> dict[str, Any]:
    """DPO vs DPO + pair safeguard on one trainer, interleaved."""
    rig = StepRig(trainer, first_batch_inputs(trainer))
    variants = {"dpo": rig.stepper(sdpo_objective(trainer, "off")),
                "sdpo_pair": rig.stepper(sdpo_objective(trainer, "pair"))}
    cpu: dict[str, list[float]] = {}
    samples = interleaved_timings(variants, rounds=rounds, warmup=warmup,
                                  sync=synchronizer(trainer.accelerator.device), cpu_seconds=cpu)
    denoiser = trainer.accelerator.unwrap_model(trainer.denoiser)
    return {
        "denoiser": type(denoiser).__name__,
        "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
        "prediction_type": trainer.model.prediction_type,
        "step_s_sdpo_pair": summary(samples["sdpo_pair"]),
        "ratio_sdpo_pair_vs_dpo": ratio_of_medians(samples["sdpo_pair"], samples["dpo"])["ratio"],
        "cpu_time_ratio_sdpo_pair_vs_dpo": ratio_of_medians(cpu["sdpo_pair"], cpu["dpo"])["ratio"],
    }


def measure_families(work: Path, *, pairs: int, rounds: int, warmup: int) -> dict[str, Any]:
    from bench.workspace import set_up_trainer, tiny_family_workspace

    result: dict[str, Any] = {"pairs_per_step": pairs, "resolution": 32}
    for family in FAMILIES:
        ws = tiny_family_workspace(work, family, pairs=4 * pairs)
        trainer = set_up_trainer(ws, work / f"run-{family}", pairs=pairs)
        result[family] = family_steps(trainer, rounds=rounds, warmup=warmup)
        del trainer
        gc.collect()
    return result


def sd15_memory_need_gib(optimizer: str) -> float:
    """Rough resident need of an SD1.5-shaped step: weights, reference copy, gradients (+ AdamW's two moments)."""
    copies = 3 + (2 if optimizer == "adamw" else 0)
    return copies * SD15_UNET_PARAMS * 4 / 2**30 + 2.0  # + activations, encoders and the interpreter


def measure_sd15_shaped(work: Path, *, latent_size: int, pairs: int, rounds: int, optimizer: str) -> dict[str, Any]:
    """Item 1's step figures on the SD1.5-shaped UNet (tiny encoders; only the UNet step is timed)."""
    import psutil

    need, free = sd15_memory_need_gib(optimizer), psutil.virtual_memory().available / 2**30
    if free < need * 1.15:
        return {"measured": False,
                "reason": f"not measured: needs about {need:.1f} GiB of free memory, {free:.1f} GiB available"}
    from bench.workspace import sd15_shaped_workspace, set_up_trainer

    ws = sd15_shaped_workspace(work, latent_size=latent_size, full_encoders=False, pairs=4 * pairs)
    trainer = set_up_trainer(ws, work / "run-sd15-shaped", pairs=pairs, optimizer=optimizer)
    rig = StepRig(trainer, first_batch_inputs(trainer))
    variants = {name: rig.stepper(obj) for name, obj in objectives(trainer).items()}
    variants["dpo"]()  # one warm-up step (allocations); the rounds below are all timed
    cpu: dict[str, list[float]] = {}
    samples = interleaved_timings(variants, rounds=rounds, warmup=0, sync=synchronizer(trainer.accelerator.device),
                                  cpu_seconds=cpu)
    return {
        "measured": True,
        "model": ws.label,
        "optimizer": optimizer,
        "pairs_per_step": pairs,
        "rounds": rounds,
        "step_s": {name: summary(values) for name, values in samples.items()},
        "ratio_sdpo_pair_vs_dpo": ratio_of_medians(samples["sdpo_pair"], samples["dpo"])["ratio"],
        "ratio_reference_vs_dpo": ratio_of_medians(samples["reference_autograd"], samples["dpo"])["ratio"],
        "cpu_time_ratio_sdpo_pair_vs_dpo": ratio_of_medians(cpu["sdpo_pair"], cpu["dpo"])["ratio"],
        "cpu_time_ratio_reference_vs_dpo": ratio_of_medians(cpu["reference_autograd"], cpu["dpo"])["ratio"],
        "note": f"indicative only: {rounds} round(s) of a slow CPU step; the safeguard's own cost at SD1.5's "
                "training shape is overhead.objective_only_sd15_latents",
    }


def run(out: dict, quick: bool, *, sd15: bool = True) -> None:
    """Tiny families (always) and the SD1.5-shaped UNet (unless ``quick`` or ``sd15`` is False)."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        result["families"] = measure_families(Path(tmp), pairs=4, rounds=3 if quick else 10, warmup=1)
    if quick or not sd15:
        result["sd15_shaped"] = {"measured": False, "reason": "not measured: skipped (--quick or --skip sd15)"}
    else:
        with tempfile.TemporaryDirectory(prefix="bench-sd15-") as tmp:
            result["sd15_shaped"] = measure_sd15_shaped(Path(tmp), latent_size=16, pairs=1, rounds=1,
                                                        optimizer="adafactor")
    out["models"] = result
