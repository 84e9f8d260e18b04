from __future__ import annotations

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
        influence_unlearn(model, forget, retain, hessian="kfac")
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
