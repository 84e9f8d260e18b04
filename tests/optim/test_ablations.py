"""rho='auto' calibration, averaged GNB draws, and the curvature-free ablations Signum and Lion."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from soul.optim import Lion, Signum, SophiaG, estimate_hessian
from soul.optim import sophia as sophia_module
from soul.testing import tiny_model


def _one_param_sophia(ratios: torch.Tensor, **kwargs) -> tuple[torch.nn.Parameter, SophiaG]:
    """A parameter whose first-step ratio |m~_1| / h~ is exactly `ratios` (h~ = 1, g = ratios)."""
    p = torch.nn.Parameter(torch.zeros(ratios.numel(), dtype=torch.float64))
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.5), rho="auto", weight_decay=0.0, **kwargs)
    # bc2 = 1 - beta2 after one estimate, so h~ is the estimate itself; beta1 = 0.5: m~_1 = g exactly.
    opt.update_hessian(estimates={p: torch.ones_like(p)})
    p.grad = ratios.clone()
    return p, opt


@pytest.mark.parametrize("foreach", [True, False])
def test_auto_rho_is_the_target_quantile_of_the_first_step_ratio(foreach):
    ratios = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double() + 1  # 1..100, shuffled
    ratios[::2] *= -1  # the sign of the gradient does not matter
    p, opt = _one_param_sophia(ratios, target_unclipped=0.3, foreach=foreach)
    assert opt.last_stats["rho"] != opt.last_stats["rho"]  # NaN until calibrated
    opt.step()
    # quantile 0.3 of 1..100 with linear interpolation: position 0.3 * 99 = 29.7 -> 30 + 0.7 = 30.7
    group = opt.param_groups[0]
    assert group["rho"] == pytest.approx(30.7) and group["rho_auto"] is True
    assert opt.last_stats["rho"] == pytest.approx(30.7)
    assert opt.last_stats["clip_fraction"] == pytest.approx(0.70)  # ratios 31..100 clipped
    # unclipped coordinates take the Newton step lr * m / (rho h), clipped ones lr * sign(m)
    expected = -0.1 * torch.where(ratios.abs() <= 30.7, ratios / 30.7, ratios.sign())
    torch.testing.assert_close(p.detach(), expected)


def test_auto_rho_ignores_coordinates_without_gradient_and_survives_a_state_dict_round_trip():
    ratios = torch.cat([torch.arange(1, 11, dtype=torch.float64), torch.zeros(90, dtype=torch.float64)])
    p, opt = _one_param_sophia(ratios, target_unclipped=0.5)
    opt.step()
    assert opt.param_groups[0]["rho"] == pytest.approx(5.5)  # median of 1..10, zeros ignored
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = SophiaG([q], lr=0.1, betas=(0.5, 0.5), rho="auto", weight_decay=0.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.param_groups[0]["rho"] == pytest.approx(5.5) and resumed.param_groups[0]["rho_auto"]
    q.grad = torch.full_like(q, 100.0)  # a new calibration would pick a different rho
    p.grad = q.grad.clone()
    opt.step()
    resumed.step()
    assert resumed.param_groups[0]["rho"] == opt.param_groups[0]["rho"] == pytest.approx(5.5)
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=0)


def test_auto_rho_on_a_sample_hits_the_target_fraction(monkeypatch):
    monkeypatch.setattr(sophia_module, "RHO_SAMPLE_SIZE", 4000)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((200, 150), (5000,), (7,))]
    opt = SophiaG(params, lr=0.01, rho="auto", target_unclipped=0.8, weight_decay=0.0)
    for p in params:
        p.grad = torch.rand(p.shape, generator=gen) + 0.01
    opt.update_hessian(scale=1.0)  # h~ = g^2 -> ratio 1/|g|, spread over (1, 100)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert 0.17 < opt.last_stats["clip_fraction"] < 0.23  # 1 - 0.8, up to the sample's error


def test_bad_rho_and_target_are_clear_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="rho \\(gamma\\) must be a number > 0 or 'auto'"):
        SophiaG([p], rho="calibrated")
    with pytest.raises(ValueError, match="target_unclipped must be in \\(0, 1\\)"):
        SophiaG([p], rho="auto", target_unclipped=1.0)


def _gnb_estimate(model, batch, samples: int, seed: int) -> torch.Tensor:
    opt = SophiaG(model.parameters(), betas=(0.9, 0.0))  # beta2 = 0: h is the estimate itself
    estimate_hessian(model, batch, opt, generator=torch.Generator().manual_seed(seed), samples=samples)
    return torch.cat([opt.state[p]["hessian"].flatten() for p in model.parameters()])


def test_hessian_samples_average_draws_and_cut_the_estimator_variance():
    model, _ = tiny_model("llama", hidden=16, layers=1)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seeds = range(12)
    one = torch.stack([_gnb_estimate(model, batch, 1, s) for s in seeds])
    eight = torch.stack([_gnb_estimate(model, batch, 8, 100 + s) for s in seeds])
    # same expectation (the mean Gauss-Newton diagonal), a fraction of the variance (1/8 in theory)
    mean_one, mean_eight = one.mean(0), eight.mean(0)
    assert abs(mean_eight.sum() / mean_one.sum() - 1) < 0.2
    ratio = eight.var(0).sum() / one.var(0).sum()
    assert ratio < 0.25, float(ratio)
    # and it is reproducible from the generator
    torch.testing.assert_close(_gnb_estimate(model, batch, 3, 7), _gnb_estimate(model, batch, 3, 7))
    with pytest.raises(ValueError, match="samples \\(hessian_samples\\) must be an integer >= 1"):
        _gnb_estimate(model, batch, 0, 0)


def _groups(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((6, 4), (9,), (2, 3, 2))]
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 0.03}]


@pytest.mark.parametrize("foreach", [True, False])
def test_signum_is_sophia_with_zero_curvature(foreach):
    """Sophia whose every estimate is zero (h = 0 exactly, via scale 0) moves exactly like Signum."""
    a, b = _groups(0), _groups(0)
    sophia = SophiaG(a, lr=0.01, betas=(0.9, 0.99), rho=0.04, hessian_interval=3, foreach=foreach)
    signum = Signum(b, lr=0.01, betas=(0.9, 0.99), foreach=foreach)
    pa = [p for grp in a for p in grp["params"]]
    pb = [p for grp in b for p in grp["params"]]
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        assert not signum.hessian_due()
        if sophia.hessian_due():
            sophia.update_hessian(scale=0.0)  # h <- beta2 h + 0
        for x, y in zip(pa, pb):
            x.grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
            y.grad = x.grad.clone()
        sophia.step()
        signum.step()
    for x, y in zip(pa, pb):  # the same arithmetic up to the rounding of (m / (|m|/a)) / a: ~1e-16 in fp64
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert signum.last_stats["clip_fraction"] == 1.0 == sophia.last_stats["clip_fraction"]
    with pytest.raises(TypeError, match="Signum has no curvature"):
        signum.update_hessian()


def test_signum_moves_every_coordinate_by_lr():
    p = torch.nn.Parameter(torch.zeros(50))
    opt = Signum([p], lr=0.02, weight_decay=0.0)
    p.grad = torch.randn(50, generator=torch.Generator().manual_seed(2))
    opt.step()
    torch.testing.assert_close(p.detach(), -0.02 * p.grad.sign())


@pytest.mark.parametrize("foreach", [True, False])
def test_lion_two_steps_by_hand(foreach):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.8, 0.5), weight_decay=0.2, foreach=foreach)
    g1, g2 = torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-0.5, -0.2, 0.4])
    p.grad = g1
    opt.step()
    # m0 = 0: u = sign(0.2 g1) = (1, -1, 0); theta = theta (1 - 0.1*0.2) - 0.1 u; m1 = 0.5 g1
    theta1 = torch.tensor([1.0, -2.0, 0.5]) * 0.98 - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(p.detach(), theta1)
    p.grad = g2
    opt.step()
    # u = sign(0.8 * 0.5 g1 + 0.2 g2) = sign((0.12 - 0.1, -0.04 - 0.04, 0.08)) = (1, -1, 1)
    theta2 = theta1 * 0.98 - 0.1 * torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(p.detach(), theta2)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * (0.5 * g1) + 0.5 * g2)
    state = copy.deepcopy(opt.state_dict())
    assert state["param_groups"][0]["betas"] == (0.8, 0.5)
