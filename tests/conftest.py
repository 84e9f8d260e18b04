from __future__ import annotations

import os

import pytest
import torch

from soul.testing import tiny_model, tiny_tokenizer

# Tests must never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models are dominated by per-op overhead: one thread is fastest, and helpers sharing cores contend less.
torch.set_num_threads(1)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["llama", "gpt2", "opt"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled 135M model (slow: ~15 s the first time on a machine, then ~2 s)."""
    from soul.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_tofu_dir():
    """TOFU's published JSON files (``$SOUL_TOFU_DIR`` or a ``shared/data/tofu`` above the checkout)."""
    from soul.data import find_tofu_dir

    found = find_tofu_dir()
    if found is None:
        pytest.skip("real TOFU files not found: set SOUL_TOFU_DIR to a directory holding TOFU's full.json etc.")
    return found
