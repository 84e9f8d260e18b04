from __future__ import annotations

import itertools

import pytest
import torch

from soul.losses import answer_nll
from soul.optim import influence_unlearn
from soul.testing import tiny_model


def _toy_batches(gen: torch.Generator, n_batches: int, vocab: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Sequences of a 4-token prompt and a 6-token answer drawn from a vocabulary slice."""
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(vocab[0], vocab[1], (4, 10), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(answer_nll(model, b).item() for b in batches) / len(batches)


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama fitted to a toy forget set (tokens 10-60) and retain set (tokens 150-250)."""
    torch.manual_seed(0)
    model, _ = tiny_model("llama", hidden=32, layers=1)
    gen = torch.Generator().manual_seed(0)
    forget, retain = _toy_batches(gen, 2, (10, 60)), _toy_batches(gen, 4, (150, 250))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(120):
        batch = (forget + retain)[step % 6]
        opt.zero_grad()
        answer_nll(model, batch).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, forget, retain


@pytest.mark.parametrize("hessian", ["fisher", "gnb"])
def test_influence_unlearning_raises_the_forget_loss_more_than_the_retain_loss(trained, hessian):
    model, forget, retain = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        forget0, retain0 = _mean_loss(model, forget), _mean_loss(model, retain)
        _, stats = influence_unlearn(model, forget, retain, alpha=1e-3, damping=1e-3, hessian=hessian,
                                     generator=torch.Generator().manual_seed(0))
        forget1, retain1 = _mean_loss(model, forget), _mean_loss(model, retain)
        assert stats["forget_loss"] == pytest.approx(forget0, rel=1e-4)
        assert stats["step_norm"] > 0 and stats["h_mean"] > 0
        assert forget1 - forget0 > 0.2
        assert forget1 - forget0 > 3 * (retain1 - retain0)
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.load_state_dict(state)


def test_influence_unlearning_rejects_bad_arguments(trained):
    model, forget, retain = trained
    with pytest.raises(ValueError, match="hessian must be one of"):
        influence_unlearn(model, forget, retain, hessian="shampoo")
    with pytest.raises(ValueError, match="damping must be > 0"):
        influence_unlearn(model, forget, retain, damping=0.0)
    with pytest.raises(ValueError, match="damping_relative must be > 0"):
        influence_unlearn(model, forget, retain, damping_relative=-1.0)
    with pytest.raises(ValueError, match=r"either damping \(absolute\) or damping_relative"):
        influence_unlearn(model, forget, retain, damping=1.0, damping_relative=0.1)
    with pytest.raises(ValueError, match="no batches to estimate the Hessian on"):
        influence_unlearn(model, forget, [], hessian_data="retain")


@pytest.mark.parametrize("hessian", ["fisher", "gnb"])
def test_relative_damping_gives_a_newton_step_and_huge_damping_gives_ascent(trained, hessian):
    """Small damping relative to a non-uniform diagonal turns the step away from the gradient; huge
    damping makes (H + lambda)^-1 ~ 1/lambda, i.e. the plain ascent direction (cosine 1)."""
    model, forget, retain = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {}
    try:
        for r in (1e-3, 1e4):
            model.load_state_dict(state)
            _, stats[r] = influence_unlearn(model, forget, retain, alpha=1e-6, damping_relative=r, hessian=hessian,
                                            generator=torch.Generator().manual_seed(0))
            assert stats[r]["damping_absolute"] == pytest.approx(r * stats[r]["h_mean"])
            assert stats[r]["damping_relative"] == pytest.approx(r)
    finally:
        model.load_state_dict(state)
    assert stats[1e-3]["cosine_with_ascent"] < 0.7  # measured 0.40 (fisher), 0.47 (gnb)
    assert stats[1e4]["cosine_with_ascent"] > 0.999
    # the step is alpha * g / (h + lambda): with huge damping exactly alpha |g| / lambda in norm, up to h / lambda
    big = stats[1e4]
    assert big["step_norm"] == pytest.approx(1e-6 * big["grad_norm"] / big["damping_absolute"], rel=1e-3)


def test_default_damping_is_relative(trained):
    model, forget, retain = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _, stats = influence_unlearn(model, forget, retain, alpha=1e-6, generator=torch.Generator().manual_seed(0))
    finally:
        model.load_state_dict(state)
    assert stats["damping_relative"] == pytest.approx(0.1) and 0 < stats["cosine_with_ascent"] < 1


# --------------------------------------------------------------------------- Kronecker curvature, diagnostics
def _llama64_data():
    from .kfac_worker import SEQUENCES, make_batch, tiny_llama64

    return tiny_llama64(), [make_batch(SEQUENCES[:2])], [make_batch(SEQUENCES[2:])]


def _forget_grad(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = sum(answer_nll(model, b) for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, params)
    return {n: g for (n, _), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads)}


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [{"damping_relative": 0.2}, {"damping": 0.05}])
def test_kronecker_step_is_alpha_times_the_damped_inverse_of_the_fitted_curvature(kind, damping):
    """Δθ = α (C + λI)⁻¹ ∇L_forget with C fitted on the retain batches (exact Fisher: deterministic), in
    float64; the quadratic term is ½ Δᵀ C Δ from the same curvature's product."""
    from soul.optim import fit_kfac

    model, forget, retain = _llama64_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad = _forget_grad(model, forget)
    curv = fit_kfac(model, retain, kind=kind, fisher="exact")
    want = {n: 0.5 * v for n, v in curv.inverse_apply(grad, **damping).items()}
    _, stats = influence_unlearn(model, forget, retain, alpha=0.5, hessian=kind, kfac_fisher="exact", **damping)
    got = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-13)
    cv = curv.apply(want)
    quad = 0.5 * sum(float((cv[n] * want[n]).sum()) for n in want)
    assert stats["quadratic_term"] == pytest.approx(quad, rel=1e-9)
    first = sum(float((grad[n] * want[n]).sum()) for n in want)
    assert stats["first_order_forget_change"] == pytest.approx(first, rel=1e-9)
    assert stats["predicted_forget_change"] == pytest.approx(first + quad, rel=1e-9)
    assert stats["h_examples"] == curv.tokens and stats["curvature_nbytes"] == curv.nbytes()
    assert all(p.grad is None for p in model.parameters())


class _LinearHead(torch.nn.Module):
    """Frozen embedding -> one linear layer -> logits: the logits are linear in the weights, so the loss's
    Hessian is its Gauss-Newton matrix, which K-FAC / EK-FAC with the exact Fisher and one loss token equal."""

    def __init__(self, dim: int = 3, vocab: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim).requires_grad_(False)
        self.proj = torch.nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.proj.parameters():
                p.copy_(torch.randn_like(p))
        self.double()

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.proj(self.embed(input_ids)))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_predicted_change_is_the_measured_change_to_third_order_where_the_model_is_quadratic(kind):
    """With C the exact Hessian (one loss token, linear logits, curvature on the same batch), predicted -
    measured is O(|Δ|³): halving α divides it by 8, while the first-order error only falls by 4."""
    batch = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 3]])}
    errors, first_errors = [], []
    for alpha in (0.02, 0.01, 0.005):  # |Δ| = 0.074, 0.037, 0.018
        model = _LinearHead()
        _, s = influence_unlearn(model, [batch], [batch], alpha=alpha, damping=0.5, hessian=kind,
                                 hessian_data="both", kfac_fisher="exact")
        assert s["predicted_forget_change"] == pytest.approx(s["predicted_retain_change"], rel=1e-12)
        errors.append(abs(s["measured_forget_change"] - s["predicted_forget_change"]))
        first_errors.append(abs(s["measured_forget_change"] - s["first_order_forget_change"]))
        assert errors[-1] < 0.1 * first_errors[-1], (alpha, s)  # measured 0.05, 0.026, 0.013
    for big, small in itertools.pairwise(errors):  # measured 7.8, 7.9
        assert 6 < big / small < 10, errors
    for big, small in itertools.pairwise(first_errors):  # measured 3.9, 3.9
        assert 3 < big / small < 5, first_errors


@pytest.mark.parametrize("hessian", ["gnb", "kfac", "ekfac"])
def test_first_order_terms_match_finite_differences(hessian):
    """For a tiny step the measured forget and retain changes are the gradients' inner products with Δ."""
    model, forget, retain = _llama64_data()
    _, s = influence_unlearn(model, forget, retain, alpha=1e-6, damping=1.0, hessian=hessian,
                             generator=torch.Generator().manual_seed(0))
    for part in ("forget", "retain"):
        first, measured = s[f"first_order_{part}_change"], s[f"measured_{part}_change"]
        assert first != 0 and measured == pytest.approx(first, rel=1e-3, abs=1e-3 * abs(s["first_order_forget_change"]))
    assert s["retain_loss_after"] - s["retain_loss"] == pytest.approx(s["measured_retain_change"])
    assert s["step_norm"] > 0


def test_cosine_with_the_diagonal_step():
    """1 for GNB itself; K-FAC with a damping far above its curvature is ascent, as is the GNB step with the
    same λ (cosine 1); at a small relative damping K-FAC turns the step elsewhere."""
    model, forget, retain = _llama64_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for name, kw in {"gnb": {"hessian": "gnb"}, "kfac-huge": {"hessian": "kfac", "damping": 1e6},
                     "kfac-small": {"hessian": "kfac", "damping_relative": 1e-3}}.items():
        model.load_state_dict(state)
        _, out[name] = influence_unlearn(model, forget, retain, alpha=1e-3, generator=torch.Generator().manual_seed(0),
                                         **kw)
    assert out["gnb"]["cosine_with_diagonal"] == 1.0
    assert out["kfac-huge"]["cosine_with_diagonal"] > 0.9999 and out["kfac-huge"]["cosine_with_ascent"] > 0.9999
    assert out["kfac-small"]["cosine_with_diagonal"] < 0.99


def test_kronecker_options_are_checked():
    model, forget, retain = _llama64_data()
    with pytest.raises(ValueError, match="kfac_fisher must be one of"):
        influence_unlearn(model, forget, retain, hessian="kfac", kfac_fisher="true")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        influence_unlearn(model, forget, retain, hessian="kfac", alpha=0.0)
