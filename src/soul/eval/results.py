"""Results files: atomic JSON writing and retain-reference loading.

A results dict maps metric names to ``{"agg_value": float | None, "value_by_index": {str(idx): {...}}}``
(open-unlearning's layout) plus a ``"meta"`` entry. A retain model's results file (full or the reduced one
from `soul.eval.reference_stats`) is a valid forget-quality / PrivLeak reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# What a reference must hold, and what for.
REFERENCE_TR_KEY = "forget_truth_ratio"
REFERENCE_MIA_KEY = "mia_min_k"


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"results file {p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"results file {p}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"results file {p}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def load_reference(reference: str | os.PathLike | dict[str, Any], *, need_tr: bool = True) -> dict[str, Any]:
    """A retain reference as a results dict, checked to hold per-question forget truth ratios.

    A path may name a soul results file, open-unlearning's ``TOFU_EVAL.json`` or TOFU's ``eval_log_forget.json``
    (the format is detected; see `soul.eval.interop`).
    """
    from soul.eval.interop import normalise_reference

    where = "retain reference"
    if isinstance(reference, str | os.PathLike):
        where = f"retain reference {reference}"
        reference = load_results(reference)
    if not isinstance(reference, dict):
        raise ValueError(f"{where}: expected a results dict or a path to a results JSON file")
    return normalise_reference(reference, where) if need_tr else reference


def reference_truth_ratios(reference: dict[str, Any]) -> dict[str, float]:
    return {k: float(v["score"]) for k, v in reference[REFERENCE_TR_KEY]["value_by_index"].items()}


def reference_mia_auc(reference: dict[str, Any]) -> float | None:
    entry = reference.get(REFERENCE_MIA_KEY)
    value = entry.get("agg_value") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else None
