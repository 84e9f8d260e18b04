"""Figures drawn from user data: matplotlib's mathtext off (shared by `soul.report` and `soul.attack`, so it
lives below both)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import matplotlib

F = TypeVar("F", bound=Callable[..., Any])


def literal_text(draw: F) -> F:
    """Run `draw` with matplotlib's mathtext off: labels come from user data (method labels, preset entry
    names), and text between two ``$`` in one was parsed as TeX math — ``$x^$`` or ``$\\foo$`` made `soul report`
    fail and write nothing. Text objects read ``text.parse_math`` when created, so it must be off while the figure is built."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
