"""soul: LLM unlearning with second-order optimization (SOUL) and the field's evaluation suite."""

from __future__ import annotations

from soul._version import __version__

__all__ = ["__version__", "evaluate", "finetune", "load_model", "save_model", "unlearn"]


def __getattr__(name: str):
    # Lazy: `import soul` stays cheap; heavy modules load on first use.
    if name in ("load_model", "save_model"):
        from soul import models

        return getattr(models, name)
    if name in ("unlearn", "finetune"):
        from soul import train

        return getattr(train, name)
    if name == "evaluate":
        from soul.eval import evaluate

        return evaluate
    raise AttributeError(f"module 'soul' has no attribute {name!r}")
