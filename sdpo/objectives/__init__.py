"""Pure tensor math of the objectives: targets, per-sample errors, DPO/DMPO/DSPO/SFT, the SDPO safeguard."""

from sdpo.objectives.errors import PredictionType, diffusion_target, per_sample_mse
from sdpo.objectives.losses import (
    ObjectiveConfig,
    ObjectiveOutput,
    compute_objective,
    dmpo_loss,
    dpo_loss,
    dspo_loss,
    inside_term,
)
from sdpo.objectives.safeguard import safeguard_lambda, safeguard_lambda_with_stats, scale_gradient

__all__ = [
    "ObjectiveConfig",
    "ObjectiveOutput",
    "PredictionType",
    "compute_objective",
    "diffusion_target",
    "dmpo_loss",
    "dpo_loss",
    "dspo_loss",
    "inside_term",
    "per_sample_mse",
    "safeguard_lambda",
    "safeguard_lambda_with_stats",
    "scale_gradient",
]
