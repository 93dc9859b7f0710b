"""Held-out winner/loser error deltas against the reference: the safeguard's own diagnostic.

A fixed set of held-out pairs is noised once (fixed timesteps and noise, the same for both images of a pair),
so the deltas ``m_w - r_w`` and ``m_l - r_l`` of different checkpoints are exactly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdpo.objectives import per_sample_mse


@dataclass
class _Chunk:
    noisy: torch.Tensor  # [2B, ...] winners then losers
    timesteps: torch.Tensor
    target: torch.Tensor
    cond: dict[str, torch.Tensor]
    ref_err: torch.Tensor  # [2B] reference per-sample errors


class HeldoutProbe:
    """Precomputed held-out inputs; :meth:`deltas` evaluates a denoiser on them."""

    def __init__(self, model, pairs: dict, reference: torch.nn.Module, *, seed: int = 0, batch_size: int = 32,
                 repeats: int = 2, image_size: int | None = None) -> None:
        """``pairs``: images as returned by :func:`sdpo.data.loader.load_pairs_arrays`, or a latent-cache batch
        (``win_mean``, ``lose_mean``, ``cond``: :meth:`sdpo.train.cache.CachedPairDataset.first`), whose
        posterior means are the latents; ``repeats`` noise draws per pair."""
        self.model = model
        self.chunks: list[_Chunk] = []
        gen = torch.Generator().manual_seed(seed)
        device = model.denoiser.device if hasattr(model.denoiser, "device") else torch.device("cpu")
        cached = "win_mean" in pairs
        if not cached:
            win = _to_pixels(pairs["win"])
            lose = _to_pixels(pairs["lose"])
        captions = list(pairs["caption"])
        with torch.no_grad():
            for _ in range(repeats):
                for start in range(0, len(captions), batch_size):
                    sl = slice(start, start + batch_size)
                    if cached:
                        lat_w, lat_l = pairs["win_mean"][sl].to(device), pairs["lose_mean"][sl].to(device)
                        cond = {k: v[sl].to(device) for k, v in pairs["cond"].items()}
                    else:
                        lat_w = model.encode_images(win[sl].to(device), sample=False)
                        lat_l = model.encode_images(lose[sl].to(device), sample=False)
                        cond = model.encode_prompts(captions[sl], image_size=image_size)
                    n = lat_w.shape[0]
                    t = model.sample_timesteps(n, generator=gen).to(device)
                    noise = torch.randn(lat_w.shape, generator=gen).to(device, lat_w.dtype)
                    noisy_w, target_w = model.noisy_input_and_target(lat_w, noise, t)
                    noisy_l, target_l = model.noisy_input_and_target(lat_l, noise, t)
                    chunk = _Chunk(
                        noisy=torch.cat([noisy_w, noisy_l]),
                        timesteps=torch.cat([t, t]),
                        target=torch.cat([target_w, target_l]),
                        cond={k: torch.cat([v, v]) for k, v in cond.items()},
                        ref_err=torch.empty(0),
                    )
                    chunk.ref_err = self._errors(reference, chunk)
                    self.chunks.append(chunk)

    def _errors(self, denoiser: torch.nn.Module, chunk: _Chunk) -> torch.Tensor:
        pred = self.model.predict(denoiser, chunk.noisy, chunk.timesteps, chunk.cond)
        return per_sample_mse(pred, chunk.target)

    @torch.no_grad()
    def deltas(self, denoiser: torch.nn.Module) -> dict[str, float]:
        """Mean ``m_w - r_w`` and ``m_l - r_l`` over the held-out pairs (negative = better than the reference)."""
        was_training = denoiser.training
        denoiser.eval()
        win, lose = [], []
        for chunk in self.chunks:
            diff = self._errors(denoiser, chunk) - chunk.ref_err
            half = diff.shape[0] // 2
            win.append(diff[:half])
            lose.append(diff[half:])
        denoiser.train(was_training)
        w, l_ = torch.cat(win), torch.cat(lose)
        return {"winner_delta": w.mean().item(), "loser_delta": l_.mean().item(), "n_pairs": int(w.numel())}


def _to_pixels(images) -> torch.Tensor:
    """uint8 [N,H,W,3] (numpy or tensor) -> float [N,3,H,W] in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def heldout_deltas(model_dir: str, base_dir: str, heldout_shards: str, *, n_pairs: int = 64, seed: int = 0,
                   device: str | None = None) -> dict[str, float]:
    """Held-out winner/loser error deltas of the model in ``model_dir`` against ``base_dir`` (the reference)."""
    from sdpo.data.loader import load_pairs_arrays
    from sdpo.models import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(base_dir, device=device)
    base.freeze_all_but_denoiser()
    candidate = load_model(model_dir, device=device)
    pairs = load_pairs_arrays(heldout_shards, n=n_pairs)
    probe = HeldoutProbe(base, pairs, base.denoiser.eval(), seed=seed)
    return probe.deltas(candidate.denoiser)
