"""One DPO training step on a fixed pair batch, with the objective swappable: the unit every step benchmark times.

:class:`StepRig` takes what :meth:`sdpo.train.trainer.Trainer._setup` built (model adapter, prepared denoiser,
reference, optimizer, scheduler) and does what ``Trainer.run`` does for one micro-batch after encoding: reference
forward (no grad), policy forward, objective, finiteness check, backward, gradient clipping, optimizer and scheduler
step. The forwards and the objective run under ``accelerator.autocast()`` (bf16 when the trainer is set up with
``mixed_precision=bf16``; a no-op otherwise). Inputs (noised latents, timesteps, conditioning) are drawn once, by the
trainer's own ``_encode`` and :func:`sdpo.train.inputs.denoiser_inputs`, so every variant sees the same batch and seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.reference_safeguard import reference_dpo_loss

# (prediction [2B], reference prediction [2B], inputs) -> loss
Objective = Callable[[torch.Tensor, torch.Tensor, "StepInputs"], torch.Tensor]
OBJECTIVES = ("dpo", "sdpo_pair", "reference_autograd")


@dataclass
class StepInputs:
    """A micro-batch ready for the denoiser: winners then losers, sharing timesteps and noise."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]
    target_w: torch.Tensor
    target_l: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.target_w.shape[0]


def inputs_from_encoded(trainer, enc) -> StepInputs:
    """Noised inputs and targets of an encoded batch (:class:`sdpo.train.inputs.Encoded`), through the trainer's
    own :func:`sdpo.train.inputs.denoiser_inputs` (the pair's own timestep and shared noise)."""
    from sdpo.train.inputs import denoiser_inputs

    x = denoiser_inputs(trainer.model, enc)
    return StepInputs(noisy=x.noisy, timesteps=x.timesteps, cond=x.cond, target_w=x.target_w, target_l=x.target_l)


def inputs_from_batch(trainer, batch: dict) -> StepInputs:
    """Encode a loader batch as the trainer does (``Trainer._encode``: VAE + text encoder, or the latent cache) and
    noise it."""
    return inputs_from_encoded(trainer, trainer._encode(batch))


def first_batch_inputs(trainer) -> StepInputs:
    return inputs_from_batch(trainer, next(iter(trainer.loader)))


def sdpo_objective(trainer, safeguard: str) -> Objective:
    """``sdpo.objectives.compute_objective`` with the trainer's settings and ``safeguard`` (off, pair, batch)."""
    from sdpo.objectives import compute_objective

    config = dataclasses.replace(trainer.objective, safeguard=safeguard)

    def objective(pred: torch.Tensor, ref_pred: torch.Tensor, x: StepInputs) -> torch.Tensor:
        pred_w, pred_l = pred.chunk(2)
        ref_w, ref_l = ref_pred.chunk(2)
        return compute_objective(config, pred_w, x.target_w, pred_l, x.target_l, ref_w, ref_l).loss

    return objective


def reference_objective(trainer) -> Objective:
    """The reference approach (autograd lambda per micro-batch), same beta, mu and clip as the trainer."""
    cfg = trainer.objective

    def objective(pred: torch.Tensor, ref_pred: torch.Tensor, x: StepInputs) -> torch.Tensor:
        loss, _ = reference_dpo_loss(pred, ref_pred, x.target_w, x.target_l, beta=cfg.beta, mu=cfg.mu,
                                     max_lambda=cfg.max_lambda)
        return loss

    return objective


def objectives(trainer) -> dict[str, Objective]:
    """The compared variants: plain DPO, DPO + our pair safeguard, DPO + the reference (autograd) safeguard."""
    return {
        "dpo": sdpo_objective(trainer, "off"),
        "sdpo_pair": sdpo_objective(trainer, "pair"),
        "reference_autograd": reference_objective(trainer),
    }


class StepRig:
    """Runs full training steps of a set-up trainer on fixed inputs."""

    def __init__(self, trainer, inputs: StepInputs) -> None:
        self.trainer = trainer
        self.inputs = inputs
        self.steps = 0

    def forward_loss(self, objective: Objective) -> torch.Tensor:
        """Reference and policy forward and the objective (the part of a step before ``backward``)."""
        t, x = self.trainer, self.inputs
        with t.accelerator.autocast():
            with torch.no_grad(), t._reference() as reference:
                ref_pred = t.model.predict(reference, x.noisy, x.timesteps, x.cond)
            pred = t.model.predict(t.denoiser, x.noisy, x.timesteps, x.cond)
            return objective(pred, ref_pred, x)

    def update(self, loss: torch.Tensor) -> None:
        """Finiteness check, backward, clipping, optimizer and scheduler step, as ``Trainer.run`` does."""
        t = self.trainer
        self.steps += 1
        if not torch.isfinite(loss):
            raise RuntimeError(f"benchmark step {self.steps}: loss is {loss.item()}")
        t.accelerator.backward(loss)
        t._clip_and_check(self.steps)
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)

    def step(self, objective: Objective) -> None:
        self.update(self.forward_loss(objective))

    def stepper(self, objective: Objective) -> Callable[[], None]:
        """A no-argument callable running one step with ``objective`` (for :func:`bench.common.interleaved_timings`)."""
        return lambda: self.step(objective)
