"""Item 1: the safeguard's cost in a full training step, ours (closed form, per pair) and the reference approach.

Figures (limit 1.00, goal for ours <= 1.02):

- ``ratio_sdpo_pair_vs_dpo``: step time of DPO + ``compute_objective(safeguard="pair")`` over plain DPO
  (``safeguard="off"``);
- ``ratio_reference_vs_dpo``: DPO + the reference approach (lambda from ``torch.autograd.grad`` of the pooled
  MSEs, bench/reference_safeguard.py) over plain DPO;
- ``objective_only``: where the added time goes, from the objective alone on the same tensors (forward + backward
  to the predictions), in milliseconds per step: the closed-form lambda, its diagnostics, the rest;
  ``objective_only_sd15_latents``: the same on tensors of SD1.5's training shape (8 pairs of 4x64x64 latents).

A step is forward + backward + optimizer of one DPO step on a fixed pair batch; same model, batch and seed for all
variants, interleaved round by round; medians over rounds, warm-up dropped; 95% bootstrap intervals over rounds.
On CPU the same ratios of process CPU time (``cpu_time_ratio_*``) are reported too: on a shared machine they are
much less noisy than wall time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import interleaved_timings, median, ratio_of_medians, summary, synchronizer
from bench.rig import StepInputs, StepRig, first_batch_inputs, objectives, sdpo_objective

GOAL = 1.02
LIMIT = 1.00


def step_overhead(trainer, inputs: StepInputs, *, rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved full-step timings of the three objectives, and the ratios against plain DPO."""
    rig = StepRig(trainer, inputs)
    device = trainer.accelerator.device
    cpu: dict[str, list[float]] = {}
    samples = interleaved_timings({name: rig.stepper(obj) for name, obj in objectives(trainer).items()},
                                  rounds=rounds, warmup=warmup, sync=synchronizer(device), cpu_seconds=cpu)
    ours = ratio_of_medians(samples["sdpo_pair"], samples["dpo"])
    reference = ratio_of_medians(samples["reference_autograd"], samples["dpo"])
    result = {
        "pairs_per_step": inputs.pairs,
        "step_s": {name: summary(values) for name, values in samples.items()},
        "ratio_sdpo_pair_vs_dpo": ours["ratio"],
        "ratio_sdpo_pair_vs_dpo_ci95": ours["ci95"],
        "ratio_reference_vs_dpo": reference["ratio"],
        "ratio_reference_vs_dpo_ci95": reference["ci95"],
        "ratio_sdpo_pair_vs_reference": ratio_of_medians(samples["sdpo_pair"], samples["reference_autograd"])["ratio"],
        "limit": LIMIT,
        "goal_sdpo_pair": GOAL,
        "meets_goal": ours["ratio"] <= GOAL,
    }
    if device.type == "cpu":
        ours_cpu = ratio_of_medians(cpu["sdpo_pair"], cpu["dpo"])
        reference_cpu = ratio_of_medians(cpu["reference_autograd"], cpu["dpo"])
        result.update({
            "cpu_time_ratio_sdpo_pair_vs_dpo": ours_cpu["ratio"],
            "cpu_time_ratio_sdpo_pair_vs_dpo_ci95": ours_cpu["ci95"],
            "cpu_time_ratio_reference_vs_dpo": reference_cpu["ratio"],
            "cpu_time_ratio_reference_vs_dpo_ci95": reference_cpu["ci95"],
        })
    return result


def _prediction_leaves(trainer, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's and the reference's predictions for ``inputs``, detached (the objective's real inputs)."""
    with torch.no_grad(), trainer.accelerator.autocast():
        pred = trainer.model.predict(trainer.denoiser, inputs.noisy, inputs.timesteps, inputs.cond)
        with trainer._reference() as reference:
            ref_pred = trainer.model.predict(reference, inputs.noisy, inputs.timesteps, inputs.cond)
    return pred.detach(), ref_pred.detach()


def objective_costs(trainer, inputs: StepInputs, pred: torch.Tensor, ref_pred: torch.Tensor, *,
                    rounds: int) -> dict[str, float]:
    """Milliseconds per call of each objective alone (forward + backward to the predictions), and of its parts."""
    from sdpo.objectives import safeguard_lambda, safeguard_lambda_with_stats

    sync = synchronizer(pred.device)
    cfg = trainer.objective

    def loss_backward(objective) -> None:
        leaf = pred.clone().requires_grad_(True)
        objective(leaf, ref_pred, inputs).backward()

    err_w = pred[: inputs.pairs].float() - inputs.target_w.float()
    err_l = pred[inputs.pairs :].float() - inputs.target_l.float()
    variants = {**objectives(trainer), "sdpo_batch": sdpo_objective(trainer, "batch")}
    calls = {name: (lambda obj=obj: loss_backward(obj)) for name, obj in variants.items()}
    calls["lambda_closed_form"] = lambda: safeguard_lambda(err_w, err_l, cfg.mu, "pair", cfg.max_lambda)
    calls["lambda_with_stats"] = lambda: safeguard_lambda_with_stats(err_w, err_l, cfg.mu, "pair", cfg.max_lambda)
    samples = interleaved_timings(calls, rounds=rounds, warmup=3, sync=sync)
    ms = {name: 1000 * median(values) for name, values in samples.items()}
    return {
        "prediction_shape": list(pred.shape),
        "dpo_ms": ms["dpo"],
        "sdpo_pair_ms": ms["sdpo_pair"],
        "sdpo_batch_ms": ms["sdpo_batch"],
        "reference_autograd_ms": ms["reference_autograd"],
        "added_sdpo_pair_ms": ms["sdpo_pair"] - ms["dpo"],
        "added_sdpo_batch_ms": ms["sdpo_batch"] - ms["dpo"],
        "added_reference_ms": ms["reference_autograd"] - ms["dpo"],
        "lambda_closed_form_ms": ms["lambda_closed_form"],
        "lambda_stats_ms": ms["lambda_with_stats"] - ms["lambda_closed_form"],
    }


def sd15_shape_objective_costs(trainer, *, pairs: int = 8, latent_size: int = 64, rounds: int) -> dict[str, float]:
    """:func:`objective_costs` on random predictions of SD1.5's training shape (512 px: 4x64x64 latents).

    The objective's cost depends on the tensor sizes only, so this gives the safeguard's real-scale cost on a
    device where the real-scale model step is too slow to time.
    """
    device = trainer.accelerator.device
    gen = torch.Generator().manual_seed(0)
    shape = (2 * pairs, 4, latent_size, latent_size)
    pred, ref_pred, target = (torch.randn(shape, generator=gen).to(device) for _ in range(3))
    inputs = StepInputs(noisy=pred, timesteps=torch.zeros(0), cond={}, target_w=target[:pairs],
                        target_l=target[pairs:])
    return objective_costs(trainer, inputs, pred, ref_pred, rounds=rounds)


def measure(trainer, *, rounds: int, warmup: int, objective_rounds: int) -> dict[str, Any]:
    """Item 1 on a set-up trainer: full-step ratios plus the objective-only cost breakdown."""
    inputs = first_batch_inputs(trainer)
    result = step_overhead(trainer, inputs, rounds=rounds, warmup=warmup)
    costs = objective_costs(trainer, inputs, *_prediction_leaves(trainer, inputs), rounds=objective_rounds)
    dpo_ms = 1000 * result["step_s"]["dpo"]["median_s"]
    costs["added_sdpo_pair_share_of_step"] = costs["added_sdpo_pair_ms"] / dpo_ms
    costs["added_reference_share_of_step"] = costs["added_reference_ms"] / dpo_ms
    result["objective_only"] = costs
    result["objective_only_sd15_latents"] = sd15_shape_objective_costs(trainer, rounds=max(5, objective_rounds // 10))
    return result


def run(out: dict, quick: bool) -> None:
    """The toy model (default params: 16 pairs per step) on CPU; stores ``out["overhead"]``."""
    from bench.workspace import set_up_trainer, toy_workspace

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        ws = toy_workspace(Path(tmp), pairs=64)
        trainer = set_up_trainer(ws, Path(tmp) / "run", pairs=16)
        result = measure(trainer, rounds=4 if quick else 40, warmup=1 if quick else 3,
                         objective_rounds=20 if quick else 200)
    out["overhead"] = {"model": ws.label, "device": str(trainer.accelerator.device), **result}
