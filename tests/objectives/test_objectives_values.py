"""Each objective's loss equals a value computed independently (float64 loops over the logits)."""

from __future__ import annotations

import math

import pytest
import torch

from soul.objectives import OBJECTIVES, build_objective

from .objectives_helpers import TOL, kl, log_sigmoid, logits, nll, seq_logprob, sharp_model

# Non-default coefficients, so a coefficient that is ignored or misplaced shows up in the value.
COEFFS = {
    "ga": {},
    "graddiff": {"gamma": 0.7, "alpha": 1.3},
    "ga_kl": {"gamma": 0.7, "alpha": 1.3},
    "po": {"gamma": 0.7, "alpha": 1.3},
    "npo": {"gamma": 0.7, "beta": 0.5},
    "npo_rt": {"gamma": 0.7, "alpha": 1.3, "beta": 0.5},
    "simnpo": {"gamma": 0.7, "alpha": 1.3, "beta": 0.2, "delta": 0.3},  # σ not saturated
    "dpo": {"gamma": 0.7, "alpha": 1.3, "beta": 0.5},
}


def expected(name, c, model, ref, forget, retain) -> float:
    """The loss of issue 4's definitions, from the oracle's per-sequence log-probabilities."""
    refusal = forget["refusal"]
    lp = seq_logprob(logits(model, forget), forget["labels"])
    lp_ref = seq_logprob(logits(ref, forget), forget["labels"])
    if name == "ga":
        return -nll(model, forget)
    if name == "graddiff":
        return -c["gamma"] * nll(model, forget) + c["alpha"] * nll(model, retain)
    if name == "ga_kl":
        return -c["gamma"] * nll(model, forget) + c["alpha"] * kl(ref, model, retain)
    if name == "po":
        return c["gamma"] * nll(model, refusal) + c["alpha"] * nll(model, retain)
    if name in ("npo", "npo_rt"):
        b = c["beta"]
        npo = sum(-(2 / b) * log_sigmoid(-b * (s - s_ref)) for (s, _), (s_ref, _) in zip(lp, lp_ref)) / len(lp)
        return c["gamma"] * npo + (c["alpha"] * nll(model, retain) if name == "npo_rt" else 0.0)
    if name == "simnpo":
        b, d = c["beta"], c["delta"]
        sim = sum(-(2 / b) * log_sigmoid(-b * s / n - d) for s, n in lp) / len(lp)
        return c["gamma"] * sim + c["alpha"] * nll(model, retain)
    if name == "dpo":
        b = c["beta"]
        win = seq_logprob(logits(model, refusal), refusal["labels"])
        win_ref = seq_logprob(logits(ref, refusal), refusal["labels"])
        terms = [
            -log_sigmoid(b * ((w - wr) - (s - sr)))
            for (w, _), (wr, _), (s, _), (sr, _) in zip(win, win_ref, lp, lp_ref)
        ]
        return c["gamma"] * sum(terms) / len(terms) + c["alpha"] * nll(model, retain)
    raise AssertionError(name)


def test_every_registered_objective_has_a_value_test():
    assert set(COEFFS) == set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(COEFFS))
def test_loss_matches_hand_computed_value(name, models, batches):
    model, ref = models
    forget, retain = batches
    out = build_objective(name, **COEFFS[name])(model, forget, retain, ref)
    want = expected(name, COEFFS[name], model, ref, forget, retain)
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert out.loss.item() == pytest.approx(want, rel=TOL, abs=TOL)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.parts.values())


@pytest.mark.parametrize("name", sorted(COEFFS))
def test_defaults_are_the_documented_ones(name):
    documented = {
        "ga": {},
        "graddiff": {"gamma": 1.0, "alpha": 1.0},
        "ga_kl": {"gamma": 1.0, "alpha": 1.0},
        "po": {"gamma": 1.0, "alpha": 1.0},
        "npo": {"gamma": 1.0, "beta": 0.1},
        "npo_rt": {"gamma": 1.0, "alpha": 1.0, "beta": 0.1},
        "simnpo": {"gamma": 0.125, "alpha": 1.0, "beta": 4.5, "delta": 0.0},
        "dpo": {"gamma": 1.0, "alpha": 1.0, "beta": 0.1},
    }
    obj = build_objective(name)
    assert obj.coefficients == documented[name]
    for key, value in documented[name].items():
        assert getattr(obj, key) == value


def test_parts_are_the_unweighted_terms(batches):
    model, ref = sharp_model("llama", seed=0), sharp_model("llama", seed=1)
    forget, retain = batches
    out = build_objective("ga_kl", gamma=0.5, alpha=2.0)(model, forget, retain, ref)
    assert out.parts["forget_nll"] == pytest.approx(nll(model, forget), rel=TOL)
    assert out.parts["retain_kl"] == pytest.approx(kl(ref, model, retain), rel=TOL, abs=TOL)
    assert out.loss.item() == pytest.approx(-0.5 * out.parts["forget_nll"] + 2.0 * out.parts["retain_kl"], rel=TOL)


def test_reference_gets_no_gradient(batches):
    model, ref = sharp_model("llama", seed=0), sharp_model("llama", seed=1)
    forget, retain = batches
    for name in ("npo_rt", "dpo", "ga_kl"):
        build_objective(name)(model, forget, retain, ref).loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_batch_loss_is_the_mean_of_per_example_losses(tokenizer):
    """Per-sequence reduction, then a mean over sequences: a 2-row batch (padded to the longer row) gives the
    mean of the two rows scored alone (no padding) — for every objective."""
    from .objectives_helpers import FORGET, REFUSALS, RETAIN, make_batch

    model, ref = sharp_model("llama", seed=0), sharp_model("llama", seed=1)
    both_f, both_r = make_batch(tokenizer, FORGET, REFUSALS), make_batch(tokenizer, RETAIN)
    rows = [(make_batch(tokenizer, [FORGET[i]], [REFUSALS[i]]), make_batch(tokenizer, [RETAIN[i]])) for i in (0, 1)]
    for name in OBJECTIVES:
        obj = build_objective(name, **COEFFS[name])
        whole = obj(model, both_f, both_r, ref).loss.item()
        alone = [obj(model, f, r, ref).loss.item() for f, r in rows]
        assert whole == pytest.approx(sum(alone) / 2, rel=TOL, abs=TOL), name
        # and the two rows really differ, so the mean is informative
        assert abs(alone[0] - alone[1]) > 1e-4, name
    assert torch.equal(both_f["attention_mask"].sum(1) < both_f["input_ids"].shape[1], torch.tensor([False, True]))
