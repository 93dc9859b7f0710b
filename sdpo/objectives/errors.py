"""Regression targets per prediction type and per-sample errors (docs/method.md, "Setting")."""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "flow"]


def diffusion_target(
    prediction_type: PredictionType,
    x0: torch.Tensor,
    noise: torch.Tensor,
    *,
    alpha_t: torch.Tensor | None = None,
    sigma_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value the denoiser should predict.

    epsilon: ``noise``; v-prediction: ``alpha_t * noise - sigma_t * x0`` (``alpha_t = sqrt(abar_t)``,
    ``sigma_t = sqrt(1 - abar_t)``, per sample); flow matching: ``noise - x0`` (velocity of the straight path).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":
        if alpha_t is None or sigma_t is None:
            raise ValueError("v_prediction needs alpha_t and sigma_t")
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return alpha_t.reshape(shape) * noise - sigma_t.reshape(shape) * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: 'epsilon', 'v_prediction', 'flow'")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2)`` over all non-batch dimensions, in fp32: shape ``(B,)``."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
