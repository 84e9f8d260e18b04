"""Sign effects of one gradient step, and the objectives' known values at θ = ref."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from soul.objectives import build_objective

from .objectives_helpers import TOL, logits, seq_logprob, sharp_model

LR = 1e-2


def mean_logprob(model, batch) -> float:
    """Mean over rows of the summed answer log-probability (oracle, float64)."""
    rows = seq_logprob(logits(model, batch), batch["labels"])
    return sum(s for s, _ in rows) / len(rows)


def sgd_step(model, loss: torch.Tensor, lr: float = LR) -> None:
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    model.zero_grad()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_ga_step_lowers_forget_likelihood(family, batches):
    model, forget = sharp_model(family), batches[0]
    before = mean_logprob(model, forget)
    sgd_step(model, build_objective("ga")(model, forget).loss)
    assert mean_logprob(model, forget) < before - 1e-4


def test_graddiff_forget_down_and_retain_up(batches):
    forget, retain = batches
    model = sharp_model()
    before = mean_logprob(model, forget)
    sgd_step(model, build_objective("graddiff")(model, forget, retain).loss)
    assert mean_logprob(model, forget) < before - 1e-4
    # The retain term alone (γ = 0) is plain descent on the retain NLL.
    model = sharp_model()
    before = mean_logprob(model, retain)
    sgd_step(model, build_objective("graddiff", gamma=0.0)(model, forget, retain).loss)
    assert mean_logprob(model, retain) > before + 1e-4


def test_po_step_raises_refusal_likelihood(batches):
    forget, _retain = batches
    model = sharp_model()
    refusal = forget["refusal"]
    before = mean_logprob(model, refusal)
    sgd_step(model, build_objective("po", alpha=0.0)(model, forget).loss)
    assert mean_logprob(model, refusal) > before + 1e-4


@pytest.mark.parametrize("name", ["npo", "npo_rt", "simnpo"])
def test_npo_family_step_lowers_forget_likelihood(name, batches):
    forget, retain = batches
    model = sharp_model()
    ref = sharp_model(seed=1)
    before = mean_logprob(model, forget)
    coeffs = {} if name == "npo" else {"alpha": 0.0}
    if name == "simnpo":
        # With the default β = 4.5 the sharp model's answers (≈ −8 nats/token) already sit where SimNPO's
        # weight σ(β·log p/|y|) has vanished — by design it stops pushing unlikely answers further down.
        coeffs["beta"] = 0.2
    sgd_step(model, build_objective(name, **coeffs)(model, forget, retain, ref).loss)
    assert mean_logprob(model, forget) < before - 1e-4


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_at_reference_is_two_over_beta_log_two(beta, batches):
    forget, _retain = batches
    model = sharp_model()
    ref = copy.deepcopy(model)
    out = build_objective("npo", beta=beta)(model, forget, ref_model=ref)
    assert out.loss.item() == pytest.approx((2 / beta) * math.log(2), rel=1e-6)
    assert out.parts["forget_logratio"] == pytest.approx(0.0, abs=1e-5)


def test_npo_gradient_at_reference_is_the_summed_log_likelihood_gradient(batches):
    """d/dθ −(2/β)·log σ(−β·r) = 2σ(β·r)·∇r = ∇r at r = 0: NPO starts as ascent on the *summed* answer
    log-likelihood (per sequence, averaged over the batch), independent of β."""
    forget = batches[0]
    model = sharp_model()
    ref = copy.deepcopy(model)
    build_objective("npo", beta=0.7)(model, forget, ref_model=ref).loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lg = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    labels = forget["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(lg[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    (logp * mask).sum(1).mean().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=TOL, atol=TOL)  # two formulas of one gradient, float64


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_at_reference_is_log_two(beta, batches):
    forget, retain = batches
    model = sharp_model()
    ref = copy.deepcopy(model)
    out = build_objective("dpo", beta=beta, alpha=0.0)(model, forget, ref_model=ref)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    with_retain = build_objective("dpo", beta=beta)(model, forget, retain, ref)
    assert with_retain.parts["dpo"] == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_step_prefers_refusal_over_forget_answer(batches):
    forget, _retain = batches
    model = sharp_model()
    ref = copy.deepcopy(model)

    def margin() -> float:
        return mean_logprob(model, forget["refusal"]) - mean_logprob(model, forget)

    before = margin()
    sgd_step(model, build_objective("dpo", alpha=0.0, beta=0.5)(model, forget, ref_model=ref).loss)
    assert margin() > before + 1e-4


def test_kl_is_zero_at_reference_and_positive_otherwise(batches):
    forget, retain = batches
    model = sharp_model()
    obj = build_objective("ga_kl", gamma=0.0)
    at_ref = obj(model, forget, retain, copy.deepcopy(model))
    assert at_ref.parts["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    at_ref.loss.backward()  # the KL's gradient vanishes at its minimum θ = ref
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) < 1e-4
    model.zero_grad()
    for seed in (1, 2):
        away = obj(model, forget, retain, sharp_model(seed=seed))
        assert away.parts["retain_kl"] > 0.1
    # and a descent step on the KL moves θ toward the reference
    ref = sharp_model(seed=1)
    before = obj(model, forget, retain, ref).parts["retain_kl"]
    sgd_step(model, obj(model, forget, retain, ref).loss, lr=0.1)
    assert obj(model, forget, retain, ref).parts["retain_kl"] < before
