"""Preference objectives (Diffusion-DPO, DMPO, DSPO) and SFT, with the optional SDPO safeguard.

All functions are pure tensor math: predictions and targets in, loss and diagnostics out (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from sdpo.config import TrainConfig, resolved_dspo_variant
from sdpo.objectives.errors import per_sample_mse
from sdpo.objectives.safeguard import SafeguardGranularity, safeguard_lambda_with_stats, scale_gradient

Method = Literal["sft", "dpo", "dspo", "dmpo"]
SafeguardMode = Literal["off", "pair", "batch"]
_DEFAULTS = TrainConfig.model_fields  # the schema is the only place a default lives
PREFERENCE_METHODS = ("dpo", "dspo", "dmpo")


def inside_term(
    m_w: torch.Tensor, m_l: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """``u = -(beta / 2) * [(m_w - m_l) - (r_w - r_l)]``; implicit accuracy is ``mean(u > 0)``."""
    return -0.5 * beta * ((m_w - m_l) - (r_w - r_l))


def dpo_loss(u: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO: ``mean(-log sigmoid(u))``."""
    return -F.logsigmoid(u).mean()


def dmpo_loss(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """DMPO: ``mean(KL(Bernoulli(sigmoid(u)) || Bernoulli(1 - alpha)))``, log-probabilities via softplus."""
    q = 1.0 - alpha
    p = torch.sigmoid(u)
    log_p, log_1mp = -F.softplus(-u), -F.softplus(u)
    kl = p * (log_p - torch.log(torch.tensor(q))) + (1 - p) * (log_1mp - torch.log1p(torch.tensor(-q)))
    return kl.mean()


def dspo_loss(
    u: torch.Tensor,
    err_w: torch.Tensor,
    pred_w: torch.Tensor,
    ref_pred_w: torch.Tensor,
    beta: float,
    *,
    variant: Literal["sd15", "sdxl"] = "sd15",
    threshold: float = 0.1,
) -> torch.Tensor:
    """DSPO as the public reference implementation computes it.

    ``sd15``: ``mean((e_w - beta * (1 - sigmoid(u)) * (pred_w - ref_w))^2)``.
    ``sdxl``: if the batch mean of ``mean((pred_w - ref_w)^2)`` is at least ``threshold``,
    ``mean(((1 - sigmoid(u)) * (pred_w - ref_w))^2)``; otherwise ``mean((1 - sigmoid(u))^2)``.
    """
    gate = (1 - torch.sigmoid(u)).reshape((-1,) + (1,) * (pred_w.ndim - 1))
    drift = pred_w.float() - ref_pred_w.float()
    if variant == "sd15":
        return (err_w.float() - beta * gate * drift).pow(2).mean()
    if variant == "sdxl":
        if drift.pow(2).flatten(1).mean(1).mean() >= threshold:
            return (gate * drift).pow(2).mean()
        return gate.pow(2).mean()
    raise ValueError(f"unknown DSPO variant {variant!r}; allowed: 'sd15', 'sdxl'")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The knobs of one objective (a subset of ``TrainConfig``, whose defaults it shares)."""

    method: Method = _DEFAULTS["method"].default
    beta: float = _DEFAULTS["beta"].default
    safeguard: SafeguardMode = _DEFAULTS["safeguard"].default
    mu: float = _DEFAULTS["mu"].default
    max_lambda: float = _DEFAULTS["max_lambda"].default
    alpha: float = _DEFAULTS["alpha"].default
    dspo_variant: Literal["sd15", "sdxl"] = "sd15"  # resolved: TrainConfig's "auto" follows the model family
    dspo_threshold: float = _DEFAULTS["dspo_threshold"].default
    all_reduce: bool = False  # batch-mode safeguard: pool the sums across processes (safeguard_reduce=global)

    @classmethod
    def from_train(cls, train: object, *, family: str = "sd15") -> ObjectiveConfig:
        """Build from a :class:`sdpo.config.TrainConfig`, with its DSPO branch resolved for ``family``."""
        names = ("method", "beta", "safeguard", "mu", "max_lambda", "alpha", "dspo_threshold")
        return cls(**{n: getattr(train, n) for n in names},
                   dspo_variant=resolved_dspo_variant(train.dspo_variant, family),
                   all_reduce=train.safeguard_reduce == "global")


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-d tensors
    lam: torch.Tensor | None = None


def compute_objective(
    cfg: ObjectiveConfig,
    pred_w: torch.Tensor,
    target_w: torch.Tensor,
    pred_l: torch.Tensor | None = None,
    target_l: torch.Tensor | None = None,
    ref_pred_w: torch.Tensor | None = None,
    ref_pred_l: torch.Tensor | None = None,
    *,
    ref_mse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ObjectiveOutput:
    """Loss and diagnostics for one micro-batch of pairs (batch first; pair i = winner i, loser i).

    ``sft`` needs only the winner tensors. Preference methods need the loser tensors and the reference: either its
    predictions (``ref_pred_w``, ``ref_pred_l``, from the frozen reference model, no gradient) or, for DPO and
    DMPO, only its per-sample fp32 errors ``ref_mse = (r_w, r_l)`` (precomputed; DSPO needs the predictions).
    With ``cfg.safeguard != "off"`` the loser error's gradient is scaled by the closed-form lambda
    (straight-through), so every forward value is unchanged.
    """
    if cfg.method == "sft":
        m_w = per_sample_mse(pred_w, target_w)
        loss = m_w.mean()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "model_mse_w": m_w.detach().mean()})
    if cfg.method not in PREFERENCE_METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; allowed: 'sft', 'dpo', 'dspo', 'dmpo'")
    if pred_l is None or target_l is None:
        raise ValueError(f"method {cfg.method!r} needs loser predictions and targets")
    have_preds = ref_pred_w is not None and ref_pred_l is not None
    if cfg.method == "dspo" and not have_preds:
        raise ValueError("method 'dspo' needs the reference predictions (ref_pred_w, ref_pred_l): its loss uses "
                         "pred_w - ref_pred_w, which precomputed reference errors do not hold")
    if not have_preds and ref_mse is None:
        raise ValueError(f"method {cfg.method!r} needs reference predictions or precomputed reference errors")

    err_w = pred_w.float() - target_w.float()
    err_l = pred_l.float() - target_l.float()
    m_w = err_w.pow(2).flatten(1).mean(1)
    m_l = err_l.pow(2).flatten(1).mean(1)
    if have_preds:
        with torch.no_grad():
            r_w = per_sample_mse(ref_pred_w, target_w)
            r_l = per_sample_mse(ref_pred_l, target_l)
    else:
        r_w, r_l = (r.detach().float().to(m_w.device) for r in ref_mse)

    metrics: dict[str, torch.Tensor] = {}
    lam = None
    m_l_used = m_l
    if cfg.safeguard != "off":
        granularity: SafeguardGranularity = cfg.safeguard  # type: ignore[assignment]
        lam, metrics = safeguard_lambda_with_stats(
            err_w, err_l, cfg.mu, granularity, cfg.max_lambda, all_reduce=cfg.all_reduce
        )
        m_l_used = scale_gradient(m_l, lam)

    u = inside_term(m_w, m_l_used, r_w, r_l, cfg.beta)
    if cfg.method == "dpo":
        loss = dpo_loss(u)
    elif cfg.method == "dmpo":
        loss = dmpo_loss(u, cfg.alpha)
    else:
        loss = dspo_loss(
            u, err_w, pred_w, ref_pred_w, cfg.beta, variant=cfg.dspo_variant, threshold=cfg.dspo_threshold
        )

    metrics.update(
        {
            "loss": loss.detach(),
            "implicit_acc": (u.detach() > 0).float().mean(),
            "inside_term": u.detach().mean(),
            "model_mse_w": m_w.detach().mean(),
            "model_mse_l": m_l.detach().mean(),
            "ref_mse_w": r_w.mean(),
            "ref_mse_l": r_l.mean(),
            "winner_delta": (m_w.detach() - r_w).mean(),
            "loser_delta": (m_l.detach() - r_l).mean(),
        }
    )
    return ObjectiveOutput(loss, metrics, lam)
