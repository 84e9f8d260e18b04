"""Multiple-choice accuracy (WMDP-style sets) from choice log-likelihoods.

A record is ``{"question": str, "choices": list[str] (>= 2), "answer": int}`` (index of the right choice).
Each choice is scored as the answer to the question, tokenised exactly as training would
(`soul.data.format`: prompt, then the choice closed by EOS), in the batched scorer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from soul.data.format import answer_ids, prompt_ids, resolve_format
from soul.eval.scoring import get_implementation
from soul.io import write_json_atomic
from soul.losses import IGNORE_INDEX


def _check(i: int, r: Any) -> None:
    if not isinstance(r, dict):
        raise ValueError(f"multiple-choice record {i}: expected a dict, got {type(r).__name__}")
    if not isinstance(r.get("question"), str):
        raise ValueError(f"multiple-choice record {i}: field 'question' must be a string")
    choices = r.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"multiple-choice record {i}: field 'choices' must be a list of >= 2 non-empty strings")
    ans = r.get("answer")
    if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
        raise ValueError(f"multiple-choice record {i}: field 'answer' must be an index in 0..{len(choices) - 1}, "
                         f"got {ans!r}")


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # first maximum on ties


def multiple_choice_eval(model, tokenizer, records: Sequence[dict], *, prompt_format: str = "auto",
                         batch_size: int = 16, implementation: str = "batched",
                         out: str | os.PathLike | None = None) -> dict[str, Any]:
    """``mc_accuracy``: fraction of questions whose right choice has the highest total log-likelihood
    Σ_t log p(c_t | q, c_<t); ``mc_accuracy_norm``: the same with the per-token mean (length-normalised)."""
    for i, r in enumerate(records):
        _check(i, r)
    if not records:
        raise ValueError("multiple-choice evaluation needs at least one record")
    score_fn, _ = get_implementation(implementation)
    fmt = resolve_format(tokenizer, prompt_format)
    features, owner = [], []
    for i, r in enumerate(records):
        p = prompt_ids(tokenizer, r["question"], fmt)
        for j, c in enumerate(r["choices"]):
            a = answer_ids(tokenizer, c, fmt)
            features.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
            owner.append((i, j))
    stats = score_fn(model, features, tokenizer.pad_token_id, batch_size=batch_size)
    total: dict[int, list[float]] = {i: [] for i in range(len(records))}
    mean: dict[int, list[float]] = {i: [] for i in range(len(records))}
    for (i, _), s in zip(owner, stats):
        total[i].append(sum(s.logp))
        mean[i].append(-s.mean_nll)
    acc, acc_norm = {}, {}
    for i, r in enumerate(records):
        pred, pred_n = _argmax(total[i]), _argmax(mean[i])
        acc[str(i)] = {"score": float(pred == r["answer"]), "pred": pred, "answer": r["answer"], "loglik": total[i]}
        acc_norm[str(i)] = {"score": float(pred_n == r["answer"]), "pred": pred_n, "mean_logp": mean[i]}
    n = len(records)
    results = {
        "mc_accuracy": {"agg_value": sum(v["score"] for v in acc.values()) / n, "value_by_index": acc},
        "mc_accuracy_norm": {"agg_value": sum(v["score"] for v in acc_norm.values()) / n, "value_by_index": acc_norm},
        "meta": {"prompt_format": fmt, "n": n},
    }
    if out is not None:
        write_json_atomic(out, results)
    return results
