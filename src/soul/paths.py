"""Where soul keeps its cache (a module below `soul.models` and `soul.safety`, which both need it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SOUL_CACHE``, default ``~/.cache/soul``: converted base models, reference models, evaluations, data."""
    return Path(os.environ.get("SOUL_CACHE", Path.home() / ".cache" / "soul"))
