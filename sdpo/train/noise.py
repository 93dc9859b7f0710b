"""The random draws of one training pair as a pure function of (seed, epoch, pair key).

Everything random about how a pair enters a training step (whether its caption is dropped, its timestep, the noise
shared by winner and loser, and the standard normals that sample each image's VAE posterior) comes from one torch
generator seeded from ``sha256(f"{seed}:{epoch}:{key}")``. The draws therefore do not depend on which other pairs
share the micro-batch, on the rank that trains the pair, or on how many steps ran before in this process: a resumed
run draws exactly what an uninterrupted one draws, and the encode stage can compute the reference's errors for
every (pair, epoch) ahead of training (:mod:`sdpo.train.reference`).

Within a pair's generator the order is fixed: one uniform for the prompt dropout, the timestep, the noise, the
winner's posterior normals, the loser's posterior normals. They are always drawn, whatever the settings, so turning
prompt dropout on does not change the noise of any pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def pair_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """A CPU generator for one pair in one epoch, independent of every other (seed, epoch, key)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


@dataclass
class PairDraws:
    """The draws of a micro-batch, batch first (pair i = key i)."""

    keep_prompt: Tensor  # [B] bool: False where the caption is replaced by the empty prompt
    timesteps: Tensor  # [B], on the model's device
    noise: Tensor  # [B, *latent], shared by winner and loser
    posterior_w: Tensor  # [B, *latent] standard normals: winner latent = mean + std * posterior_w
    posterior_l: Tensor  # [B, *latent]

    def to(self, device: torch.device | str) -> PairDraws:
        return PairDraws(self.keep_prompt, self.timesteps.to(device), self.noise.to(device),
                         self.posterior_w.to(device), self.posterior_l.to(device))


def draw_pairs(model, keys: Sequence[str], epochs: Sequence[int], *, seed: int, latent_shape: Sequence[int],
               prompt_dropout: float) -> PairDraws:
    """The draws of pairs ``keys`` in ``epochs`` (one each) for latents of ``latent_shape`` (without batch).

    ``model`` draws the timesteps (:meth:`sdpo.models.families.DiffusionModel.sample_timesteps`, family-specific).
    """
    if len(keys) != len(epochs):
        raise ValueError(f"{len(keys)} keys but {len(epochs)} epochs")
    shape = tuple(int(d) for d in latent_shape)
    keep, steps, noise, post_w, post_l = [], [], [], [], []
    for key, epoch in zip(keys, epochs, strict=True):
        gen = pair_generator(seed, int(epoch), str(key))
        keep.append(bool(torch.rand((), generator=gen) >= prompt_dropout))
        steps.append(model.sample_timesteps(1, generator=gen).cpu())
        noise.append(torch.randn(shape, generator=gen))
        post_w.append(torch.randn(shape, generator=gen))
        post_l.append(torch.randn(shape, generator=gen))
    return PairDraws(
        keep_prompt=torch.tensor(keep, dtype=torch.bool),
        timesteps=torch.cat(steps),
        noise=torch.stack(noise),
        posterior_w=torch.stack(post_w),
        posterior_l=torch.stack(post_l),
    )
