"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if anything builds, loads or fine-tunes a model."""
    import soul.pipeline.api as api
    import soul.pipeline.stages as stages

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the preset was checked")

    monkeypatch.setattr(api, "base_model", boom)
    monkeypatch.setattr(stages, "load", boom)
