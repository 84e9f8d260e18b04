"""General utility through EleutherAI's lm-evaluation-harness (optional extra ``soul[lm-eval]``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

LM_EVAL_MISSING = ("`--lm-eval` needs EleutherAI's lm-evaluation-harness, which is not installed: "
                   "pip install 'soul[lm-eval]' (its tasks also download data from the Hugging Face hub)")


def run_lm_eval(model: str | os.PathLike, tasks: Sequence[str] | str, *, batch_size: int = 8,
                limit: int | float | None = None, device: str = "cpu", num_fewshot: int | None = None,
                dtype: str = "float32") -> dict[str, Any]:
    """Run lm-eval `tasks` (e.g. ``mmlu``, ``wmdp``, ``arc_easy``) on the model at `model` (an alias, a local
    HF directory or a hub id) with lm-eval's ``hf`` backend; returns lm-eval's per-task ``results`` dict."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None
    from soul.models import resolve_model_path

    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not task_list or not all(task_list):
        raise ValueError(f"lm-eval tasks must be a non-empty comma-separated list, got {tasks!r}")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve_model_path(model)},dtype={dtype}", tasks=task_list,
        batch_size=batch_size, limit=limit, device=device, num_fewshot=num_fewshot,
    )
    return dict(out["results"])
