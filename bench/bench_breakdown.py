"""Item 2: where a training step goes, as fractions of the step (data loading's limit: 0).

Phases, timed with a device sync between them, of the trainer's own loop (``Trainer.run`` / ``_micro_step``):
``data_loading`` (the next batch from PairLoader over real shards), ``encode`` (VAE + text encoder on the fly),
``noise`` (timesteps, shared noise, noised inputs), ``reference_forward``, ``policy_forward``, ``loss_safeguard``
(``compute_objective`` with the pair safeguard), ``policy_backward``, ``optimizer`` (clipping, optimizer and
scheduler step). ``policy_forward_backward`` is the sum of the two policy phases.

``instrumented_vs_trainer`` compares the instrumented step with the trainer's own code (``_micro_step``, backward,
optimizer; no syncs inside), interleaved: near 1 means the breakdown describes the real step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import interleaved_timings, median, synchronizer

PHASES = ("data_loading", "encode", "noise", "reference_forward", "policy_forward", "loss_safeguard",
          "policy_backward", "optimizer")


class _PhaseClock:
    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.sync()
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


def _instrumented_step(trainer, batches, sync: Callable[[], None], step: int) -> dict[str, float]:
    """One trainer step, split into :data:`PHASES` (mirrors ``Trainer.run`` + ``_micro_step``)."""
    from sdpo.objectives import compute_objective
    from sdpo.train.inputs import denoiser_inputs

    t, clock = trainer, _PhaseClock(sync)
    batch = next(batches)
    clock.lap("data_loading")
    enc = t._encode(batch)
    clock.lap("encode")
    x = denoiser_inputs(t.model, enc)
    noisy, t2, cond2, target_w, target_l = x.noisy, x.timesteps, x.cond, x.target_w, x.target_l
    clock.lap("noise")
    with torch.no_grad(), t._reference() as reference:
        ref_pred = t.model.predict(reference, noisy, t2, cond2)
    clock.lap("reference_forward")
    pred = t.model.predict(t.denoiser, noisy, t2, cond2)
    clock.lap("policy_forward")
    pred_w, pred_l = pred.chunk(2)
    ref_w, ref_l = ref_pred.chunk(2)
    out = compute_objective(t.objective, pred_w, target_w, pred_l, target_l, ref_w, ref_l)
    clock.lap("loss_safeguard")
    if not torch.isfinite(out.loss):
        raise RuntimeError(f"benchmark step {step}: loss is {out.loss.item()}")
    t.accelerator.backward(out.loss)
    clock.lap("policy_backward")
    t._clip_and_check(step)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return clock.seconds


def _trainer_step(trainer, batches, step: int) -> None:
    """One step exactly as ``Trainer.run`` does it (grad_accum 1)."""
    t = trainer
    out = t._micro_step(next(batches))
    if not torch.isfinite(out.loss):
        raise RuntimeError(f"benchmark step {step}: loss is {out.loss.item()}")
    t.accelerator.backward(out.loss)
    t._clip_and_check(step)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)


def measure(trainer, *, steps: int, warmup: int) -> dict[str, Any]:
    """Median seconds per phase over ``steps`` instrumented steps, the fractions, and the check against the trainer."""
    sync = synchronizer(trainer.accelerator.device)
    batches = iter(trainer.loader)
    counter = iter(range(1, 10**9))
    laps: list[dict[str, float]] = []
    whole: list[float] = []

    def instrumented() -> None:
        start = time.perf_counter()
        laps.append(_instrumented_step(trainer, batches, sync, next(counter)))
        whole.append(time.perf_counter() - start)

    samples = interleaved_timings(
        {"instrumented": instrumented, "trainer": lambda: _trainer_step(trainer, batches, next(counter))},
        rounds=steps, warmup=warmup, sync=sync,
    )
    laps, whole = laps[warmup:], whole[warmup:]
    seconds = {phase: median([lap[phase] for lap in laps]) for phase in PHASES}
    # fractions of the mean step, so that they add up to 1 (medians of parts do not add up to the median whole)
    means = {phase: float(np.mean([lap[phase] for lap in laps])) for phase in PHASES}
    total = sum(means.values())
    fractions = {phase: means[phase] / total for phase in PHASES}
    fractions["policy_forward_backward"] = fractions["policy_forward"] + fractions["policy_backward"]
    return {
        "pairs_per_step": trainer.tcfg.batch_size,
        "dataloader_workers": trainer.tcfg.dataloader_workers,
        "step_s_median": median(whole),
        "phase_s_median": seconds,
        "fractions": fractions,
        "data_loading_share": fractions["data_loading"],
        "data_loading_share_limit": 0.0,
        "trainer_step_s_median": median(samples["trainer"]),
        "instrumented_vs_trainer": median(samples["instrumented"]) / median(samples["trainer"]),
    }


def run(out: dict, quick: bool) -> None:
    """The toy model on 16 px shards, with 0 and 1 DataLoader workers; stores ``out["breakdown"]``."""
    from bench.workspace import set_up_trainer, toy_workspace

    steps, warmup = (4, 1) if quick else (12, 2)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp:
        ws = toy_workspace(Path(tmp), pairs=256)
        result["model"] = ws.label
        for workers in (0, 1):
            trainer = set_up_trainer(ws, Path(tmp) / f"run-{workers}", pairs=16, dataloader_workers=workers)
            result[f"workers_{workers}"] = measure(trainer, steps=steps, warmup=warmup)
    out["breakdown"] = result
