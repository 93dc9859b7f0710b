"""The objective library proves its own guarantees (docs/method.md states them)."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdpo.objectives import (
    ObjectiveConfig,
    compute_objective,
    diffusion_target,
    dmpo_loss,
    dpo_loss,
    dspo_loss,
    inside_term,
    per_sample_mse,
    safeguard_lambda,
    safeguard_lambda_with_stats,
    scale_gradient,
)


def aligned_errors(seed: int, batch: int = 6, shape=(4, 8, 8), dtype=torch.float32):
    """Winner/loser errors with a mix of positive and negative alignment, like real DPO batches."""
    g = torch.Generator().manual_seed(seed)
    e_w = torch.randn(batch, *shape, generator=g)
    coef = torch.linspace(-1.5, 3.0, batch).reshape(-1, 1, 1, 1)
    e_l = coef * e_w + 0.5 * torch.randn(batch, *shape, generator=g)
    return e_w.to(dtype), e_l.to(dtype)


def autograd_lambda(e_w: torch.Tensor, e_l: torch.Tensor, mu: float, pooled: bool) -> torch.Tensor:
    """Lambda from output-space gradients obtained with autograd on the MSE definitions (float64)."""
    pred_w = e_w.double().clone().requires_grad_(True)
    pred_l = e_l.double().clone().requires_grad_(True)
    zeros = torch.zeros_like(pred_w)
    m_w = ((pred_w - zeros) ** 2).flatten(1).mean(1)
    m_l = ((pred_l - zeros) ** 2).flatten(1).mean(1)
    (g_w,) = torch.autograd.grad(m_w.sum(), pred_w)
    (g_l,) = torch.autograd.grad(m_l.sum(), pred_l)
    ww = (g_w * g_w).flatten(1).sum(1)
    wl = (g_w * g_l).flatten(1).sum(1)
    if pooled:
        ww, wl = ww.sum(), wl.sum()
    lam = torch.where(wl > 0, (1 - mu) * ww / torch.where(wl > 0, wl, torch.ones_like(wl)), torch.ones_like(wl))
    return lam.clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pair", "batch"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_closed_form_equals_autograd(dtype, mode, mu):
    e_w, e_l = aligned_errors(0, dtype=dtype)
    lam = safeguard_lambda(e_w, e_l, mu, mode=mode)
    expected = autograd_lambda(e_w, e_l, mu, pooled=mode == "batch")
    assert lam.dtype == torch.float32
    assert lam.shape == ((e_w.shape[0],) if mode == "pair" else ())
    torch.testing.assert_close(lam.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mu", [0.0, 0.3, 0.9, 1.0])
def test_safeguard_inequality_per_pair(seed, mu):
    e_w, e_l = aligned_errors(seed)
    lam = safeguard_lambda(e_w, e_l, mu, mode="pair")
    ew, el = e_w.flatten(1), e_l.flatten(1)
    decrease = (ew * (ew - lam[:, None] * el)).sum(1)
    required = mu * (ew * ew).sum(1)
    assert torch.all(decrease >= required - 1e-4 * required.abs().clamp(min=1))


@pytest.mark.parametrize("seed", range(5))
def test_safeguard_inequality_pooled(seed):
    mu = 0.6
    e_w, e_l = aligned_errors(seed)
    lam = safeguard_lambda(e_w, e_l, mu, mode="batch")
    ew, el = e_w.flatten(), e_l.flatten()
    assert (ew @ (ew - lam * el)) >= mu * (ew @ ew) - 1e-3


def test_lambda_is_one_where_inner_product_non_positive():
    e_w = torch.ones(3, 2, 2)
    e_l = torch.stack([-torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([[1.0, -1.0], [1.0, -1.0]])])
    lam = safeguard_lambda(e_w, e_l, mu=0.9)
    assert lam.tolist() == [1.0, 1.0, 1.0]
    stats = safeguard_lambda_with_stats(e_w, e_l, 0.9)[1]
    assert stats["lambda_frac_nonpositive"].item() == 1.0


def test_mu_edges():
    e_w = torch.ones(2, 4)
    e_l = torch.stack([torch.full((4,), 2.0), torch.full((4,), 0.5)])
    assert safeguard_lambda(e_w, e_l, mu=1.0).tolist() == [0.0, 0.0]
    # mu = 0: lambda = ||e_w||^2 / <e_w, e_l> = 0.5 for the first pair, 2 -> clipped to 1 for the second
    lam, stats = safeguard_lambda_with_stats(e_w, e_l, mu=0.0)
    assert lam.tolist() == [0.5, 1.0]
    assert stats["lambda_frac_clipped"].item() == 0.5
    assert safeguard_lambda(e_w, e_l, mu=0.0, max_lambda=3.0).tolist() == [0.5, 2.0]


def test_zero_errors_give_finite_lambda():
    zeros = torch.zeros(3, 4, 4)
    assert safeguard_lambda(zeros, zeros, 0.5).tolist() == [1.0, 1.0, 1.0]
    assert safeguard_lambda(zeros, torch.randn(3, 4, 4), 0.5, mode="batch").item() == 1.0


def test_invalid_arguments_are_named():
    e = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mu"):
        safeguard_lambda(e, e, 1.5)
    with pytest.raises(ValueError, match="mode"):
        safeguard_lambda(e, e, 0.5, mode="global")
    with pytest.raises(ValueError, match="shape"):
        safeguard_lambda(e, torch.randn(3, 3), 0.5)


def test_scale_gradient_is_straight_through():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_gradient(x * 3, torch.tensor([0.25, 0.5]))
    assert y.tolist() == [3.0, 6.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.75, 1.5]


def preference_tensors(seed: int, batch: int = 5, shape=(4, 6, 6)):
    g = torch.Generator().manual_seed(seed)

    def r():
        return torch.randn(batch, *shape, generator=g)

    target_w, target_l = r(), r()
    ref_w = target_w + 0.3 * r()
    ref_l = target_l + 0.3 * r()
    shared = 0.4 * r()  # correlated policy errors so some inner products are positive
    pred_w = (ref_w + shared + 0.05 * r()).requires_grad_(True)
    pred_l = (ref_l + 2.0 * shared + 0.05 * r()).requires_grad_(True)
    return pred_w, target_w, pred_l, target_l, ref_w, ref_l


@pytest.mark.parametrize("method", ["dpo", "dmpo", "dspo"])
@pytest.mark.parametrize("granularity", ["pair", "batch"])
def test_forward_unchanged_and_loser_gradient_scaled_by_lambda(method, granularity):
    tensors = preference_tensors(1)
    pred_w, target_w, pred_l, target_l, ref_w, ref_l = tensors
    plain = compute_objective(ObjectiveConfig(method=method, beta=50.0, safeguard="off"), *_order(tensors))
    (g_plain_l,) = torch.autograd.grad(plain.loss, pred_l)
    safe = compute_objective(
        ObjectiveConfig(method=method, beta=50.0, safeguard=granularity, mu=0.7), *_order(tensors)
    )
    (g_safe_l,) = torch.autograd.grad(safe.loss, pred_l)
    assert safe.loss.item() == plain.loss.item()
    for key in ("implicit_acc", "inside_term", "winner_delta", "loser_delta"):
        assert safe.metrics[key].item() == plain.metrics[key].item()
    lam = safe.lam.reshape(-1, 1, 1, 1) if granularity == "pair" else safe.lam
    assert safe.lam.min().item() > 0 and safe.lam.max().item() <= 1
    torch.testing.assert_close(g_safe_l, lam * g_plain_l, rtol=1e-5, atol=1e-9)


def _order(t):
    pred_w, target_w, pred_l, target_l, ref_w, ref_l = t
    return pred_w, target_w, pred_l, target_l, ref_w, ref_l


def test_loss_values_match_definitions():
    u = torch.tensor([-2.0, 0.0, 3.0])
    assert dpo_loss(u).item() == pytest.approx(float(-F.logsigmoid(u).mean()))
    assert dpo_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    alpha = 0.01
    p = torch.sigmoid(u).double()
    q = 1 - alpha
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert dmpo_loss(u, alpha).item() == pytest.approx(kl.mean().item(), rel=1e-5)
    m_w, m_l, r_w, r_l = (torch.tensor([v]) for v in (0.5, 0.7, 0.6, 0.6))
    assert inside_term(m_w, m_l, r_w, r_l, beta=10).item() == pytest.approx(-5 * (-0.2 - 0.0))


def test_dspo_variants_are_explicit():
    g = torch.Generator().manual_seed(0)
    pred_w, ref_w, err_w = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    u = torch.tensor([0.1, -0.4, 2.0])
    gate = (1 - torch.sigmoid(u)).reshape(-1, 1, 1, 1)
    sd15 = dspo_loss(u, err_w, pred_w, ref_w, beta=0.5, variant="sd15")
    assert sd15.item() == pytest.approx(((err_w - 0.5 * gate * (pred_w - ref_w)) ** 2).mean().item())
    far = dspo_loss(u, err_w, pred_w, ref_w, beta=0.5, variant="sdxl", threshold=0.1)
    assert far.item() == pytest.approx(((gate * (pred_w - ref_w)) ** 2).mean().item())
    near = dspo_loss(u, err_w, ref_w + 1e-3, ref_w, beta=0.5, variant="sdxl", threshold=0.1)
    assert near.item() == pytest.approx((gate**2).mean().item())


def test_sft_uses_winners_only():
    pred_w, target_w = torch.ones(2, 3), torch.zeros(2, 3)
    out = compute_objective(ObjectiveConfig(method="sft"), pred_w, target_w)
    assert out.loss.item() == 1.0 and out.lam is None


def test_preference_method_requires_all_tensors():
    pred, target = torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs loser predictions"):
        compute_objective(ObjectiveConfig(method="dpo"), pred, target)
    with pytest.raises(ValueError, match="reference predictions or precomputed reference errors"):
        compute_objective(ObjectiveConfig(method="dpo"), pred, target, pred, target)


def test_targets_per_prediction_type():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t]
    v = diffusion_target("v_prediction", x0, noise, alpha_t=abar.sqrt(), sigma_t=(1 - abar).sqrt())
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t))
    assert torch.equal(diffusion_target("epsilon", x0, noise), noise)
    assert torch.equal(diffusion_target("flow", x0, noise), noise - x0)
    assert per_sample_mse(x0, x0).tolist() == [0.0] * 4


@pytest.mark.parametrize("seed", range(4))
def test_linear_model_plain_dpo_step_raises_winner_error_safeguard_does_not(seed):
    """First-order check on a model where the two branches' Jacobians are close (the paper's assumption).

    The loser's error is aligned with the winner's and larger, so the DPO direction -(grad m_w - grad m_l)
    climbs the winner's error; the safeguarded direction still descends it.
    """
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, batch = 16, 32, 8
    weight0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    x = torch.randn(batch, d_in, generator=g)
    x_w, x_l = x, x + 0.01 * torch.randn(batch, d_in, generator=g)  # same noisy input up to a small change
    base_err = torch.randn(batch, d_out, generator=g)
    target_w = x_w @ weight0.T - base_err
    target_l = x_l @ weight0.T - 3.0 * base_err - 0.1 * torch.randn(batch, d_out, generator=g)
    ref_w, ref_l = x_w @ weight0.T, x_l @ weight0.T

    def winner_error_after_step(safeguard: str) -> tuple[float, float]:
        weight = weight0.clone().requires_grad_(True)
        cfg = ObjectiveConfig(method="dpo", beta=1.0, safeguard=safeguard, mu=0.5)
        out = compute_objective(cfg, x_w @ weight.T, target_w, x_l @ weight.T, target_l, ref_w, ref_l)
        out.loss.backward()
        with torch.no_grad():
            stepped = weight0 - 1e-3 * weight.grad
            before = per_sample_mse(x_w @ weight0.T, target_w).mean().item()
            after = per_sample_mse(x_w @ stepped.T, target_w).mean().item()
        return before, after

    before, after_plain = winner_error_after_step("off")
    _, after_safe = winner_error_after_step("pair")
    assert after_plain > before
    assert after_safe < before
