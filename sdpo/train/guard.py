"""The NaN guard's checks and its advice.

The loss of step N is computed from the weights written after step N-1, so a checkpoint is only *good* when

1. its weights are finite (checked after every optimizer step, before anything is written),
2. the model's outputs from those weights are finite (checked on the step's own batch just before writing), and
3. when training went on, the next step's loss and gradients, computed from those weights, were finite.

A checkpoint that fails (3) is set aside (``rejected-step-N``) so that ``--resume`` cannot pick it. The error names
the newest checkpoint that passed all three, and its advice is a command line that works when followed literally.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from sdpo.config import TrainConfig


def weights_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one reduction per tensor, one device sync)."""
    params = list(params)
    if not params:
        return True
    maxima = torch._foreach_norm([p.detach() for p in params], math.inf)
    return bool(torch.isfinite(torch.stack([m.float() for m in maxima])).all())


def outputs_finite(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> bool:
    """Whether an objective's loss and every diagnostic (winner/loser errors, margins...) are finite."""
    values = [loss.detach().float().reshape(-1)] + [torch.as_tensor(v).detach().float().reshape(-1)
                                                   for v in metrics.values()]
    return bool(torch.isfinite(torch.cat([v.cpu() for v in values])).all())


@contextlib.contextmanager
def rng_preserved(*generators: torch.Generator) -> Iterator[None]:
    """Run a block without moving any random stream: the given generators and torch's global CPU/CUDA ones."""
    states = [g.get_state() for g in generators]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def lower_lr(lr: float) -> float:
    """The learning rate to suggest after a divergence: the schema default when above it, else a tenth."""
    default = TrainConfig.model_fields["lr"].default
    return float(default) if lr > default else lr / 10


def advice(tcfg: TrainConfig, last_good: str | None, *, variant: str) -> str:
    """What to run next, as flags to add to the same ``sdpo train`` command (or to the flow's ``--set``);
    ``last_good`` is the name of the newest good checkpoint."""
    lr = lower_lr(tcfg.lr)
    flag = f"--set train.lr={lr:g}"
    if last_good is not None:
        return (f"To continue from {last_good} with a lower learning rate, rerun the same command with "
                f"`--resume {flag}` (train.lr {tcfg.lr:g} -> {lr:g}; the new lr applies from that step on and is "
                f"recorded in training_summary.json). train.beta and the objective cannot change on resume: to change "
                f"them, start over with `--overwrite`.")
    return (f"No checkpoint of variant {variant!r} passed the check, so there is nothing to resume: rerun the same "
            f"command with `--overwrite {flag}` (train.lr {tcfg.lr:g} -> {lr:g}), or lower train.beta.")
