"""The objectives on the real bundled SmolLM2-135M (slow): values at θ = ref and a GA step's effect."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from soul.objectives import build_objective

from .objectives_helpers import FORGET, REFUSALS, RETAIN, make_batch


@pytest.mark.slow
@pytest.mark.smoke
def test_objectives_on_smollm2(smollm2):
    model, tokenizer = smollm2
    forget, retain = make_batch(tokenizer, FORGET, REFUSALS), make_batch(tokenizer, RETAIN)
    # θ = ref: the same module serves as its own reference (its reference pass builds no graph).
    assert build_objective("npo", beta=0.1)(model, forget, ref_model=model).loss.item() == pytest.approx(
        20 * math.log(2), rel=1e-5)
    assert build_objective("dpo", alpha=0)(model, forget, ref_model=model).loss.item() == pytest.approx(
        math.log(2), rel=1e-5)
    assert build_objective("ga_kl")(model, forget, retain, model).parts["retain_kl"] == pytest.approx(0, abs=1e-5)
    model.zero_grad()

    # One SGD step of GA on a copy (the fixture is shared) lowers the forget answers' log-likelihood.
    work = copy.deepcopy(model).train(False)
    ga = build_objective("ga")
    before = ga(work, forget)
    before.loss.backward()
    with torch.no_grad():
        for p in work.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
        after = ga(work, forget)
    assert after.parts["forget_nll"] > before.parts["forget_nll"]
