"""Fixtures for the objectives' tests."""

from __future__ import annotations

import pytest

from .objectives_helpers import FORGET, REFUSALS, RETAIN, make_batch, sharp_model


@pytest.fixture
def batches(tokenizer):
    forget = make_batch(tokenizer, FORGET, REFUSALS)
    retain = make_batch(tokenizer, RETAIN)
    return forget, retain


@pytest.fixture(params=["llama", "gpt2", "opt"])
def family(request):
    return request.param


@pytest.fixture
def models(family):
    """(model, reference): the same architecture with different random weights, sharpened so that the
    reference and the model differ clearly (KL ≈ 0.7 nats/token; log-ratios of a few nats)."""
    return sharp_model(family, seed=0), sharp_model(family, seed=1)
