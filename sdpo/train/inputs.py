"""From a batch (images and captions, or cached latents and embeddings) to what the denoiser sees.

The same functions serve the trainer, the reference precomputation of the encode stage and the benchmarks, so a
cached batch and a live one become the very same tensors: latents sampled from the VAE posterior with the pair's
own normals, the pair's caption or the empty prompt, its timestep and the noise shared by winner and loser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo.train.noise import PairDraws, draw_pairs


@dataclass
class DenoiserInputs:
    """A micro-batch ready for the denoiser: winners then losers (preference methods) sharing t and noise."""

    noisy: Tensor  # [2B, ...] (SFT: [B, ...], winners only)
    timesteps: Tensor
    cond: dict[str, Tensor]
    target_w: Tensor
    target_l: Tensor | None

    @property
    def pairs(self) -> int:
        return self.target_w.shape[0]


@dataclass
class Encoded:
    """Latents, conditioning and the draws of a micro-batch, before noising."""

    lat_w: Tensor
    lat_l: Tensor
    cond: dict[str, Tensor]
    draws: PairDraws


def sample_latents(mean: Tensor, std: Tensor, normals: Tensor) -> Tensor:
    """A posterior sample ``mean + std * normals`` (all in the scaled latent space)."""
    return mean + std * normals.to(device=mean.device, dtype=mean.dtype)


def with_prompt_dropout(cond: dict[str, Tensor], empty: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """``cond`` with the rows where ``keep`` is False replaced by the empty prompt's conditioning."""
    if bool(keep.all()):
        return cond
    out = {}
    for name, value in cond.items():
        mask = keep.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        out[name] = torch.where(mask, value, empty[name].to(value.device, value.dtype).expand_as(value))
    return out


def encode_batch(model, batch: dict, *, seed: int, prompt_dropout: float, resolution: int,
                 empty_prompt: dict[str, Tensor] | None = None) -> Encoded:
    """Latents and conditioning of a loader batch, live (VAE + text encoders) or from the latent cache.

    A cached batch has ``win_mean``/``win_std``/... and ``cond``; it needs ``empty_prompt`` for dropped captions.
    """
    device = model.device
    with torch.no_grad():
        if "win_mean" in batch:
            moments_w = batch["win_mean"].to(device), batch["win_std"].to(device)
            moments_l = batch["lose_mean"].to(device), batch["lose_std"].to(device)
        else:
            moments_w = model.encode_moments(batch["win"].to(device))
            moments_l = model.encode_moments(batch["lose"].to(device))
        draws = draw_pairs(model, batch["key"], batch["epoch"], seed=seed, latent_shape=moments_w[0].shape[1:],
                           prompt_dropout=prompt_dropout).to(device)
        lat_w = sample_latents(*moments_w, draws.posterior_w)
        lat_l = sample_latents(*moments_l, draws.posterior_l)
        if "cond" in batch:
            if empty_prompt is None and not bool(draws.keep_prompt.all()):
                raise ValueError("a cached batch with dropped prompts needs the cache's empty-prompt embedding")
            cond = {name: value.to(device) for name, value in batch["cond"].items()}
            cond = with_prompt_dropout(cond, empty_prompt or {}, draws.keep_prompt)
        else:
            captions = [c if keep else "" for c, keep in zip(batch["caption"], draws.keep_prompt.tolist(),
                                                             strict=True)]
            cond = model.encode_prompts(captions, image_size=resolution)
    return Encoded(lat_w, lat_l, cond, draws)


def denoiser_inputs(model, enc: Encoded, *, pairs: bool = True) -> DenoiserInputs:
    """Noise both images of each pair with the same timestep and noise; ``pairs=False``: winners only (SFT)."""
    draws = enc.draws
    noise = draws.noise.to(enc.lat_w.device, enc.lat_w.dtype)
    noisy_w, target_w = model.noisy_input_and_target(enc.lat_w, noise, draws.timesteps)
    if not pairs:
        return DenoiserInputs(noisy_w, draws.timesteps, enc.cond, target_w, None)
    noisy_l, target_l = model.noisy_input_and_target(enc.lat_l, noise, draws.timesteps)
    return DenoiserInputs(
        noisy=torch.cat([noisy_w, noisy_l]),
        timesteps=torch.cat([draws.timesteps, draws.timesteps]),
        cond={k: torch.cat([v, v]) for k, v in enc.cond.items()},
        target_w=target_w,
        target_l=target_l,
    )
