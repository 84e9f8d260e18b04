"""KroneckerSophia (soul.optim.ksophia): Sophia's clipped rule with a K-FAC / EK-FAC preconditioner.

In float64 on a tiny Llama: with diagonal factors (identity eigenbases) and no damping it must take exactly
SophiaG's steps; with general factors its direction must equal an explicit (ρ(G⊗A + δI))⁻¹ m solved on the
64-entry Kronecker matrix; the clip bounds every step by lr; the curvature is refitted exactly every
hessian_interval steps; and a state_dict round trip (through the checkpoint's JSON + tensors split) gives the
same next steps bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from soul.losses import answer_nll
from soul.optim import KroneckerSophia, SophiaG, build_optimizer, estimate_hessian, fit_kfac
from soul.optim import kfac as kfac_module
from soul.testing import tiny_model
from soul.train.checkpoint import restore_optimizer_state, split_optimizer_state
from soul.train.loop import param_groups

from .kfac_worker import SEQUENCES, make_batch, tiny_llama64


def _grads(model, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01


def _diagonal_curvature(model):
    """A fitted K-FAC curvature whose factors are replaced by diagonal ones (distinct entries): its
    eigenbases are signed permutations, so G ⊗ A is the diagonal outer(diag G, diag A)."""
    curv = fit_kfac(model, [make_batch(SEQUENCES)], kind="kfac")
    gen = torch.Generator().manual_seed(7)
    for b in curv.blocks.values():
        b.A = torch.diag(torch.rand(b.A.shape[0], generator=gen, dtype=b.A.dtype) + 0.5)
        b.G = torch.diag(torch.rand(b.G.shape[0], generator=gen, dtype=b.G.dtype) * 1e-3 + 1e-4)
        b.eig()
    for h in curv.diag.values():
        h.clamp_min_(1e-12)  # SophiaG clamps explicit estimates at eps; make both see the same h
    return curv


def test_diagonal_factors_without_damping_take_exactly_sophias_steps():
    """Identity-like eigenbases and damping_relative=0: five steps (refreshes on steps 0, 2, 4, bias
    correction, weight decay on the matrices only) equal SophiaG fed h = diag(G) diag(A)ᵀ."""
    model = tiny_llama64()
    twin = copy.deepcopy(model)
    curv = _diagonal_curvature(model)
    kw = dict(lr=0.02, rho=0.5, betas=(0.9, 0.95), hessian_interval=2, foreach=False)
    kron = KroneckerSophia(param_groups(model, 0.1), estimator="kfac", damping_relative=0.0, **kw)
    diag = SophiaG(param_groups(twin, 0.1), **kw)
    by_name = dict(twin.named_parameters())
    h = {by_name[n]: v for n, v in curv.diag.items()}
    for b in curv.blocks.values():
        h[by_name[b.weight]] = torch.outer(torch.diagonal(b.G), torch.diagonal(b.A))
    clipped = []
    for step in range(5):
        if kron.hessian_due():
            kron.update_curvature(curv)
        if diag.hessian_due():
            diag.update_hessian(estimates=h)
        _grads(model, step)
        _grads(twin, step)
        kron.step()
        diag.step()
        clipped.append(kron.last_stats["clip_fraction"])
        assert kron.last_stats["clip_fraction"] == pytest.approx(diag.last_stats["clip_fraction"], abs=1e-12)
    assert kron.param_groups[0]["hessian_updates"] == 3
    assert min(clipped) > 0 and max(clipped) < 1  # both regimes of the clip are exercised
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=name)


def test_one_step_equals_the_rule_by_hand_with_general_factors_and_damping():
    """General SPD factors: the step of a block equals −lr·clip(u, 1) with u solved from the explicit
    64 × 64 matrix ρ(G̃ ⊗ Ã + δI) (row-major vec), δ = r · mean eigenvalue; weight decay decoupled."""
    model = tiny_llama64()
    curv = fit_kfac(model, [make_batch(SEQUENCES)], kind="kfac")
    lr, rho, wd, r, beta1 = 0.01, 0.3, 0.1, 0.2, 0.9
    opt = KroneckerSophia(param_groups(model, wd), estimator="kfac", lr=lr, rho=rho, betas=(beta1, 0.99),
                          damping_relative=r, foreach=False)
    opt.update_curvature(curv)
    name = "model.layers.0.self_attn.q_proj"
    block = curv.blocks[name]
    weight = dict(model.named_parameters())[block.weight]
    before = weight.detach().clone()
    _grads(model, 0)
    g = weight.grad.clone()
    opt.step()
    # one refresh: the bias-corrected EMA factors are the fit's; one step: m~ = g
    kron = torch.kron(block.G, block.A)
    delta = r * float(torch.linalg.eigvalsh(kron).mean())
    u = torch.linalg.solve(rho * (kron + delta * torch.eye(kron.shape[0], dtype=kron.dtype)), g.reshape(-1))
    expected = before * (1 - lr * wd) - lr * u.clamp(-1, 1).reshape(g.shape)
    assert 0 < int((u.abs() > 1).sum()) < u.numel()  # some coordinates clipped, some not
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_the_clip_bounds_every_coordinate_by_lr_and_is_reported(kind):
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    lr = 1e-3
    opt = build_optimizer("sophia", param_groups(model, 0.0), lr=lr, rho="auto", estimator=kind,
                          hessian_interval=2, weight_decay=0.0)
    assert isinstance(opt, KroneckerSophia)
    for step in range(3):
        if opt.hessian_due():
            estimate_hessian(model, batch, opt, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        answer_nll(model, batch).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moves = torch.cat([(p.detach() - b).abs().reshape(-1) for p, b in zip(model.parameters(), before)])
        assert float(moves.max()) <= lr * (1 + 2e-4)  # float32: theta - lr rounds by <= ulp(1)/2 ~ 6e-8
        at_lr = float((moves > lr * (1 - 1e-3)).float().mean())
        stats = opt.last_stats
        assert 0.1 < stats["clip_fraction"] < 1.0  # rho='auto': about half the moving coordinates
        assert stats["clip_fraction"] == pytest.approx(at_lr, abs=0.02)
        assert stats["kron_eig_mean"] > 0 and stats["hessian_updates"] == step // 2 + 1


def test_curvature_is_refit_exactly_every_hessian_interval_steps(monkeypatch):
    calls = []
    original = kfac_module.fit_kfac

    def counting(*args, **kwargs):
        calls.append(len(steps))
        return original(*args, **kwargs)

    monkeypatch.setattr(kfac_module, "fit_kfac", counting)
    model = tiny_llama64()
    batch = make_batch(SEQUENCES[:2])
    opt = build_optimizer("sophia", model.parameters(), lr=1e-3, estimator="kfac", hessian_interval=3)
    steps: list[int] = []
    for step in range(8):
        if opt.hessian_due():
            estimate_hessian(model, batch, opt)
        opt.zero_grad()
        answer_nll(model, batch).backward()
        opt.step()
        steps.append(step)
    assert calls == [0, 3, 6] and opt.param_groups[0]["hessian_updates"] == 3


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_state_dict_round_trip_gives_identical_next_steps(kind):
    """GPT-2 (Conv1D blocks stored as Wᵀ, biases in the other param group) in float64: 3 steps, save through
    the checkpoint's tensors + JSON split, load into a fresh optimizer on a copy of the model, and the next
    4 steps (one more refresh, whose EK-FAC S is carried from the saved basis) equal an unbroken run's."""
    model, _ = tiny_model("gpt2")
    model = model.double()
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def make(m):
        return build_optimizer("sophia", param_groups(m, 0.1), lr=1e-2, estimator=kind, hessian_interval=2,
                               rho="auto")

    def run(m, opt, steps):
        for step in steps:
            if opt.hessian_due():
                estimate_hessian(m, batch, opt, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            answer_nll(m, batch).backward()
            opt.step()

    opt = make(model)
    run(model, opt, range(3))
    tensors, rest = split_optimizer_state(opt)
    rest = json.loads(json.dumps(rest))
    assert any(k.endswith(".kron_G") for k in tensors) and (kind == "kfac") != any(k.endswith(".kron_S")
                                                                                    for k in tensors)
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model)
    restore_optimizer_state(resumed, tensors, rest, where="test")
    run(model, opt, range(3, 7))
    run(resumed_model, resumed, range(3, 7))
    assert resumed.param_groups[0]["hessian_updates"] == opt.param_groups[0]["hessian_updates"] == 4
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_options_are_checked():
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match=r"estimator must be one of \['gnb', 'hutchinson', 'gradsq', 'kfac', "
                                         r"'ekfac'\], got 'shampoo'"):
        build_optimizer("sophia", params, estimator="shampoo")
    with pytest.raises(ValueError, match="damping_relative applies to the Kronecker estimators"):
        build_optimizer("sophia", params, damping_relative=0.1)
    with pytest.raises(ValueError, match="damping_relative must be a finite number >= 0"):
        build_optimizer("sophia", params, estimator="ekfac", damping_relative=-1)
    opt = build_optimizer("sophia", params, estimator="ekfac", damping_relative=0.0)
    assert isinstance(opt, KroneckerSophia) and opt.kind == "ekfac"
    params[0].grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="step\\(\\) before any curvature"):
        opt.step()
    with pytest.raises(TypeError, match="KroneckerSophia takes a Kronecker curvature"):
        opt.update_hessian()
    with pytest.raises(ValueError, match="holds ekfac factors; estimator 'gnb'"):
        estimate_hessian(torch.nn.Linear(2, 2), {}, opt, estimator="gnb")
