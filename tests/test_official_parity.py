"""Our objectives against the official Diffusion-SDPO training code's formulas, written out here independently.

The official ``train.py`` computes, per GPU micro-batch of 2B predictions (winners then losers):
``model_losses = mean((pred - target)^2)`` per sample; a loser-gradient scale from two ``torch.autograd.grad`` calls
on the pooled winner and loser MSEs (``get_adaptive_lose_l_scale``: ``(1 - mu) ||gA||^2 / (gB . gA + 1e-9)``, 1
where ``gB . gA <= 0``, clipped to [0, 1]); the straight-through scaled loser loss; the inside term
``-0.5 beta ((w - l_scaled) - (ref_w - ref_l))``; then DPO, DSPO (SD1.5 and SDXL branches) or DMPO. Our ``batch``
safeguard with ``safeguard_reduce: process`` is that computation; these tests keep the two equal.
"""

import pytest
import torch
import torch.nn.functional as F

from sdpo.objectives import ObjectiveConfig, compute_objective, per_sample_mse


def official_lambda(pred: torch.Tensor, target: torch.Tensor, mu: float) -> torch.Tensor:
    pred_w, pred_l = pred.detach().requires_grad_(True).chunk(2, dim=0)
    true_w, true_l = target.detach().chunk(2, dim=0)
    a = ((pred_w - true_w) ** 2).mean()
    b = ((pred_l - true_l) ** 2).mean()
    ga = torch.autograd.grad(a, pred_w)[0]
    gb = torch.autograd.grad(b, pred_l)[0]
    num = ga.flatten().pow(2).sum()
    den = (gb.flatten() * ga.flatten()).sum()
    lam = torch.where(den > 0, (1.0 - mu) * num / (den + 1e-9), torch.tensor(1.0))
    return lam.clamp(0.0, 1.0).detach()


def official_loss(pred, ref_pred, target, *, method, beta, mu, sdxl=False, alpha=0.01, safeguard=True):
    losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    losses_w, losses_l = losses.chunk(2)
    lam = official_lambda(pred, target, mu) if safeguard else 1.0
    losses_l_scaled = losses_l.detach() + lam * (losses_l - losses_l.detach())
    model_diff = losses_w - losses_l_scaled
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * beta * (model_diff - (ref_w - ref_l))
    if method == "dpo":
        return -F.logsigmoid(inside).mean(), lam
    if method == "dspo":
        pred2, _ = (pred - ref_pred).chunk(2)
        gate = (1 - torch.sigmoid(inside))[:, None, None, None]
        if sdxl:
            if pred2.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
                return (gate * pred2).pow(2).mean(dim=[1, 2, 3]).mean(), lam
            return gate.pow(2).mean(dim=[1, 2, 3]).mean(), lam
        err_w, _ = (pred - target).chunk(2)
        return (err_w - beta * gate * pred2).pow(2).mean(dim=[1, 2, 3]).mean(), lam
    if method == "dmpo":
        p = torch.sigmoid(inside)
        q = torch.tensor([1.0 - alpha]).clamp(1e-6, 1 - 1e-6)
        loss = p * (-F.softplus(-inside) - torch.log(q)) + (1 - p) * (-F.softplus(inside) - torch.log1p(-q))
        return loss.mean(), lam
    raise ValueError(method)


def _batch(seed: int, *, pairs: int = 4, drift: float = 0.05):
    """Predictions whose winner/loser errors point both ways, their targets and a nearby reference."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, 4, 6, 6, generator=g)
    err_w = torch.randn(pairs, 4, 6, 6, generator=g)
    coef = torch.linspace(-0.5, 3.5, pairs).reshape(-1, 1, 1, 1)
    err_l = coef * err_w + 0.5 * torch.randn(pairs, 4, 6, 6, generator=g)
    pred = target + torch.cat([err_w, err_l])
    ref_pred = pred + drift * torch.randn(pred.shape, generator=g)
    return pred, ref_pred, target


# the reference scripts' settings (docs/method.md, "Configuration"), beta lowered where 5000 saturates the sigmoid
CASES = [
    ("dpo", 50.0, 0.9, False), ("dpo", 50.0, 0.6, True), ("dmpo", 20.0, 0.9, False), ("dmpo", 60.0, 0.6, True),
    ("dspo", 0.001, 0.2, False), ("dspo", 50.0, 0.6, True),
]


@pytest.mark.parametrize(("method", "beta", "mu", "sdxl"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_lambda_and_gradients_equal_the_official_code(method, beta, mu, sdxl, seed):
    drift = 0.5 if (method == "dspo" and sdxl and seed) else 0.05  # both SDXL DSPO branches (threshold 0.1)
    pred, ref_pred, target = _batch(seed, drift=drift)
    theirs_leaf, ours_leaf = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    theirs, lam = official_loss(theirs_leaf, ref_pred, target, method=method, beta=beta, mu=mu, sdxl=sdxl)
    cfg = ObjectiveConfig(method=method, beta=beta, mu=mu, safeguard="batch", alpha=0.01,
                          dspo_variant="sdxl" if sdxl else "sd15")
    pw, pl = ours_leaf.chunk(2)
    tw, tl = target.chunk(2)
    rw, rl = ref_pred.chunk(2)
    ours = compute_objective(cfg, pw, tw, pl, tl, rw, rl)
    theirs.backward()
    ours.loss.backward()
    assert 0 < float(lam) < 1  # the safeguard binds: the comparison covers the scaled loser gradient
    torch.testing.assert_close(ours.lam, lam, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.loss, theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, rtol=1e-5, atol=1e-9)


def test_precomputed_reference_errors_give_the_official_dpo_loss_and_gradients():
    pred, ref_pred, target = _batch(3)
    theirs_leaf, ours_leaf = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    theirs, _ = official_loss(theirs_leaf, ref_pred, target, method="dpo", beta=50.0, mu=0.9)
    cfg = ObjectiveConfig(method="dpo", beta=50.0, mu=0.9, safeguard="batch")
    ref_mse = (ref_pred - target).pow(2).flatten(1).mean(1).chunk(2)
    pw, pl = ours_leaf.chunk(2)
    tw, tl = target.chunk(2)
    ours = compute_objective(cfg, pw, tw, pl, tl, ref_mse=ref_mse)
    theirs.backward()
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="dspo' needs the reference predictions"):
        compute_objective(ObjectiveConfig(method="dspo"), pw, tw, pl, tl, ref_mse=ref_mse)


def test_bf16_mses_make_the_inside_term_noise_at_beta_5000_and_fp32_mses_do_not():
    """docs/training.md: the official code computes the MSEs in bf16; at beta 5000 that moves u by O(1), so the sign
    of u (implicit accuracy) is noise near step 0. Our MSEs are fp32 from the same bf16 network outputs."""
    g = torch.Generator().manual_seed(0)
    n = 64  # 32 pairs of SD1.5-shaped latents
    target = torch.randn(n, 4, 64, 64, generator=g).bfloat16()  # bf16 noise, as the official code draws it
    out = (target.float() + 0.3 * torch.randn(target.shape, generator=g)).bfloat16()  # policy output (autocast)
    ref = (out.float() + 0.003 * torch.randn(target.shape, generator=g)).bfloat16()  # bf16 reference output

    def u(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return -2500.0 * ((m[: n // 2] - m[n // 2:]) - (r[: n // 2] - r[n // 2:])).double()

    exact = u(*((x.double() - target.double()).pow(2).flatten(1).mean(1) for x in (out, ref)))
    ours = u(*(per_sample_mse(x, target) for x in (out, ref)))
    theirs = u(*((x - target).pow(2).mean(dim=[1, 2, 3]) for x in (out, ref)))
    assert float((ours - exact).abs().max()) < 1e-3 and bool(((ours > 0) == (exact > 0)).all())
    assert float((theirs - exact).abs().max()) > 0.5  # measured 1.15, against |u| of 0.04 on average
    assert float(((theirs > 0) == (exact > 0)).float().mean()) < 0.7  # measured 0.44: a coin flip
