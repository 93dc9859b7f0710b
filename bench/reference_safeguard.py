"""The REFERENCE APPROACH to the safeguard, written here independently of ``sdpo.objectives``, as a baseline.

This is how public training code gets lambda: gradients of the micro-batch-pooled winner and loser MSEs with respect
to the predictions, by two ``torch.autograd.grad`` calls, then one lambda for the whole micro-batch from their inner
products. ``sdpo`` computes the same quantity in closed form from detached errors (no autograd call); in ``batch``
mode the two agree exactly, which tests/test_bench.py checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def autograd_batch_lambda(pred_w: torch.Tensor, pred_l: torch.Tensor, target_w: torch.Tensor,
                          target_l: torch.Tensor, mu: float, max_lambda: float = 1.0) -> torch.Tensor:
    """One lambda per micro-batch from autograd gradients of the pooled MSEs w.r.t. ``pred_w`` and ``pred_l``.

    ``pred_w`` and ``pred_l`` must be part of the autograd graph (outputs of the model, or views of them).
    lambda = (1 - mu) <g_w, g_w> / <g_w, g_l> where <g_w, g_l> > 0, else 1; clipped to [0, max_lambda]; detached.
    """
    loss_w = F.mse_loss(pred_w.float(), target_w.float())
    loss_l = F.mse_loss(pred_l.float(), target_l.float())
    (grad_w,) = torch.autograd.grad(loss_w, pred_w, retain_graph=True)
    (grad_l,) = torch.autograd.grad(loss_l, pred_l, retain_graph=True)
    grad_w, grad_l = grad_w.float(), grad_l.float()
    aligned = (grad_w * grad_l).sum()
    norm = (grad_w * grad_w).sum()
    safe = torch.where(aligned > 0, aligned, torch.ones_like(aligned))
    lam = torch.where(aligned > 0, (1.0 - mu) * norm / safe, torch.ones_like(aligned))
    return lam.clamp(0.0, max_lambda).detach()


def reference_dpo_loss(
    pred: torch.Tensor, ref_pred: torch.Tensor, target_w: torch.Tensor, target_l: torch.Tensor,
    *, beta: float, mu: float, max_lambda: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO with the autograd safeguard on a ``[winners; losers]`` prediction batch.

    The loser MSE enters with its gradient scaled by lambda (forward value unchanged). Returns the loss and the
    usual detached diagnostics (implicit accuracy, lambda, winner/loser deltas against the reference).
    """
    pred_w, pred_l = pred.chunk(2)
    ref_w, ref_l = ref_pred.chunk(2)
    lam = autograd_batch_lambda(pred_w, pred_l, target_w, target_l, mu, max_lambda)
    model_w = (pred_w.float() - target_w.float()).pow(2).flatten(1).mean(1)
    model_l = (pred_l.float() - target_l.float()).pow(2).flatten(1).mean(1)
    scaled_l = model_l.detach() + lam * (model_l - model_l.detach())
    with torch.no_grad():
        ref_err_w = (ref_w.float() - target_w.float()).pow(2).flatten(1).mean(1)
        ref_err_l = (ref_l.float() - target_l.float()).pow(2).flatten(1).mean(1)
    inside = -0.5 * beta * ((model_w - scaled_l) - (ref_err_w - ref_err_l))
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": (inside.detach() > 0).float().mean(),
        "lambda_mean": lam,
        "winner_delta": (model_w.detach() - ref_err_w).mean(),
        "loser_delta": (model_l.detach() - ref_err_l).mean(),
    }
    return loss, metrics
