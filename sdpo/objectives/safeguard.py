"""The Diffusion-SDPO safeguard: a closed-form scale for the loser's gradient (docs/method.md, "The safeguard").

With output-space gradients ``e_w = pred_w - y_w`` and ``e_l = pred_l - y_l`` the largest loser scale that still
decreases the winner error by ``mu * ||e_w||^2`` to first order is

    lambda = (1 - mu) * <e_w, e_w> / <e_w, e_l>     where <e_w, e_l> > 0, else 1,   clipped to [0, max_lambda].

It is computed from detached errors in fp32: no autograd call, no graph.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

SafeguardGranularity = Literal["pair", "batch"]


def _inner_products(err_w: torch.Tensor, err_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if err_w.shape != err_l.shape:
        raise ValueError(f"err_w and err_l must have the same shape, got {tuple(err_w.shape)} and {tuple(err_l.shape)}")
    if err_w.ndim < 1:
        raise ValueError("errors need a batch dimension first")
    e_w = err_w.detach().float().reshape(err_w.shape[0], -1)
    e_l = err_l.detach().float().reshape(err_l.shape[0], -1)
    return (e_w * e_w).sum(dim=1), (e_w * e_l).sum(dim=1)


def safeguard_lambda(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    mu: float,
    mode: SafeguardGranularity = "pair",
    max_lambda: float = 1.0,
    *,
    all_reduce: bool = False,
) -> torch.Tensor:
    """Closed-form loser-gradient scale.

    Args:
        err_w, err_l: prediction minus target for winners and losers, batch first, same shape.
        mu: safety margin in [0, 1]; 0 only forbids increasing the winner error, 1 forbids any loser push
            that is aligned with the winner.
        mode: ``"pair"`` gives one lambda per pair, shape ``(B,)``; ``"batch"`` pools the sums over the
            micro-batch (pair i matched with pair i) and returns a 0-d tensor.
        max_lambda: upper clip (1 in the paper).
        all_reduce: in ``batch`` mode, sum the two inner products over all processes of the default
            ``torch.distributed`` group first (one lambda for the global batch).

    Returns:
        fp32 lambda, detached.
    """
    lam, _ = safeguard_lambda_with_stats(err_w, err_l, mu, mode, max_lambda, all_reduce=all_reduce, stats=False)
    return lam


def safeguard_lambda_with_stats(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    mu: float,
    mode: SafeguardGranularity = "pair",
    max_lambda: float = 1.0,
    *,
    all_reduce: bool = False,
    stats: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`safeguard_lambda` plus its diagnostics as detached 0-d tensors (no host sync).

    Diagnostics are per pair even in ``batch`` mode: ``lambda_frac_nonpositive`` is the fraction of pairs with
    ``<e_w, e_l> <= 0`` and ``lambda_frac_clipped`` the fraction whose own ratio exceeded ``max_lambda``.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    if max_lambda < 0:
        raise ValueError(f"max_lambda must be >= 0, got {max_lambda}")
    if mode not in ("pair", "batch"):
        raise ValueError(f"unknown safeguard mode {mode!r}; allowed: 'pair', 'batch'")
    ww, wl = _inner_products(err_w, err_l)
    pair_lam, pair_ratio = _closed_form(ww, wl, mu, max_lambda)
    if mode == "pair":
        lam = pair_lam
    else:
        pooled = torch.stack([ww.sum(), wl.sum()])
        if all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(pooled, op=dist.ReduceOp.SUM)
        lam, _ = _closed_form(pooled[0], pooled[1], mu, max_lambda)
    if not stats:
        return lam, {}
    lam_flat = lam.reshape(-1)
    aligned = wl > 0
    diagnostics = {
        "lambda_mean": lam_flat.mean(),
        "lambda_min": lam_flat.min(),
        "lambda_max": lam_flat.max(),
        "lambda_frac_clipped": (aligned & (pair_ratio > max_lambda)).float().mean(),
        "lambda_frac_nonpositive": (~aligned).float().mean(),
    }
    return lam, diagnostics


def _closed_form(ww: torch.Tensor, wl: torch.Tensor, mu: float, max_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped lambda, unclipped ratio) from <e_w, e_w> and <e_w, e_l>; lambda = 1 where <e_w, e_l> <= 0."""
    aligned = wl > 0
    ratio = (1.0 - mu) * ww / torch.where(aligned, wl, torch.ones_like(wl))
    lam = torch.where(aligned, ratio, torch.ones_like(wl)).clamp(0.0, max_lambda)
    return lam, ratio


def scale_gradient(value: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Straight-through scaling: same forward value, gradient multiplied by ``scale`` (detached)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(value.dtype)
    frozen = value.detach()
    return frozen + scale * (value - frozen)
