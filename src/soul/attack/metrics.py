"""Forget-set metrics of one model on a few questions, and the recovery figure every attack reports.

`forget_metrics` is a trimmed `soul.eval.evaluate` for the attacks: it scores only the records it is given
(the held-out forget questions, or the paraphrased ones) with the same primitives and formulas, and needs
only ``question``/``answer``. Per metric (``METRICS``):

* ``prob``: mean over questions of P(a|q)^(1/|a|) = exp(−NLL(a))  (``forget_Q_A_Prob``);
* ``rouge``: mean ROUGE-L recall of the greedy answer (≤ ``max_new_tokens``) against ``answer``
  (``forget_Q_A_ROUGE``); only with ``generate=True`` (generation is the expensive part on a CPU);
* ``truth_ratio``: mean of min(TR, 1/TR) (``forget_truth_ratio``), when every record has
  ``paraphrased_answer`` and ``perturbed_answer``.

Recovery of metric m after an attack (``recovery``)::

    recovery = (m_after − m_unlearned) / (m_target − m_unlearned)

0 = the attack left the unlearned model where it was, 1 = back at the target model's level (negative or
above 1 is possible). When the gap |m_target − m_unlearned| is below ``RECOVERY_EPS`` or below
``RECOVERY_REL_EPS`` times the larger of |m_target|, |m_unlearned| (`gap_too_small`), the unlearning did not
measurably move the metric: dividing by that gap would turn noise into a figure of thousands, so recovery is
None, with the note "gap too small to measure".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

METRICS = ("prob", "rouge", "truth_ratio")
# The names of the same numbers in `soul.eval.evaluate`'s results (open-unlearning's spelling).
EVAL_KEYS = {"prob": "forget_Q_A_Prob", "rouge": "forget_Q_A_ROUGE", "truth_ratio": "forget_truth_ratio"}
RECOVERY_EPS = 1e-6
# Relative floor of the gap: the metrics are means over a few questions in [0, 1] (or near it), so a change of
# less than 0.1 % of their size is rounding and batch-order noise, not unlearning (a 2e-6 gap gave 2e5).
RECOVERY_REL_EPS = 1e-3


def check_records(records: Sequence[dict], where: str, question_key: str = "question") -> None:
    """Raise a ValueError naming `where`, the record and the field when a record cannot be scored."""
    if not isinstance(records, Sequence) or isinstance(records, str | bytes) or not records:
        raise ValueError(f"{where}: expected a non-empty list of question-answer records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{where} record {i}: expected a dict, got {type(r).__name__}")
        for field in (question_key, "answer"):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise ValueError(f"{where} record {i}: field {field!r} must be a non-empty string, got {r.get(field)!r}")


def _has_truth_ratio_fields(r: dict) -> bool:
    pert = r.get("perturbed_answer")
    return (isinstance(r.get("paraphrased_answer"), str) and bool(r["paraphrased_answer"].strip())
            and isinstance(pert, list) and bool(pert) and all(isinstance(p, str) and p for p in pert))


def forget_metrics(model, tokenizer, records: Sequence[dict], *, question_key: str = "question",
                   generate: bool = True, max_new_tokens: int = 200, batch_size: int = 16,
                   generation_batch_size: int | None = None, prompt_format: str = "auto",
                   implementation: str = "batched", mixed_precision: str = "no") -> dict[str, Any]:
    """``{"prob", "rouge", "truth_ratio", "n", "per_question"}`` of `model` on `records` (see the module doc).

    `question_key` picks the question field (``"paraphrased_question"`` for the paraphrase probe); the
    answers scored are always ``answer`` (and ``paraphrased_answer``/``perturbed_answer`` for the truth
    ratio). ``rouge`` is None without generation, ``truth_ratio`` None when a record lacks its fields.
    `mixed_precision` as in `soul.eval.tofu.evaluate` ("bf16": bfloat16 autocast).
    """
    from soul.data.format import answer_ids, prompt_ids, resolve_format
    from soul.eval import metrics as M
    from soul.eval.scoring import eval_autocast, get_implementation
    from soul.losses import IGNORE_INDEX

    check_records(records, "forget records", question_key)
    score_fn, generate_fn = get_implementation(implementation)
    fmt = resolve_format(tokenizer, prompt_format)
    with_tr = all(_has_truth_ratio_fields(r) for r in records)
    prompts: dict[str, list[int]] = {}
    features: list[dict[str, list[int]]] = []
    where: dict[tuple[int, str, int], int] = {}

    def add(key: tuple[int, str, int], question: str, answer: str) -> None:
        if question not in prompts:
            prompts[question] = prompt_ids(tokenizer, question, fmt)
        p, a = prompts[question], answer_ids(tokenizer, answer, fmt)
        where[key] = len(features)
        features.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})

    for i, r in enumerate(records):
        add((i, "answer", 0), r[question_key], r["answer"])
        if with_tr:
            add((i, "para", 0), r[question_key], r["paraphrased_answer"])
            for j, pert in enumerate(r["perturbed_answer"]):
                add((i, "pert", j), r[question_key], pert)
    was_training = model.training
    model.eval()
    try:
        with eval_autocast(model, mixed_precision):
            stats = score_fn(model, features, tokenizer.pad_token_id, batch_size=batch_size)
            gens = None
            if generate:
                gens = generate_fn(model, tokenizer, [prompts[r[question_key]] for r in records],
                                   max_new_tokens=max_new_tokens, batch_size=generation_batch_size or 2 * batch_size)
    finally:
        model.train(was_training)

    per_question = []
    for i, r in enumerate(records):
        row: dict[str, Any] = {"prob": M.probability(stats[where[(i, "answer", 0)]])}
        if with_tr:
            pert = [stats[where[(i, "pert", j)]] for j in range(len(r["perturbed_answer"]))]
            row["truth_ratio"] = M.truth_ratio_forget_stat_log(M.log_truth_ratio(stats[where[(i, "para", 0)]], pert))
        if gens is not None:
            row["rouge"] = M.rouge_l_recall(gens[i], r["answer"])
            row["generation"] = gens[i]
        per_question.append(row)

    return {**aggregate(per_question), "per_question": per_question}


def aggregate(per_question: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"prob", "rouge", "truth_ratio", "n"}``: the means of per-question rows (None for a metric none has)."""
    def mean(name: str) -> float | None:
        values = [q[name] for q in per_question if name in q]
        return sum(values) / len(values) if values else None

    return {"prob": mean("prob"), "rouge": mean("rouge"), "truth_ratio": mean("truth_ratio"), "n": len(per_question)}


def recovery(after: float | None, unlearned: float | None, target: float | None, *,
             eps: float = RECOVERY_EPS) -> float | None:
    """(after − unlearned) / (target − unlearned); None when a number is missing or the gap is below `eps`."""
    if after is None or unlearned is None or target is None:
        return None
    if not all(math.isfinite(v) for v in (after, unlearned, target)):
        return None
    if gap_too_small(unlearned, target, eps=eps):
        return None
    return (after - unlearned) / (target - unlearned)


def gap_too_small(unlearned: float, target: float, *, eps: float = RECOVERY_EPS,
                  rel_eps: float = RECOVERY_REL_EPS) -> bool:
    """Whether target − unlearned is too small to divide by: below `eps`, or below `rel_eps` × the larger
    magnitude of the two (module docstring)."""
    return abs(target - unlearned) < max(eps, rel_eps * max(abs(target), abs(unlearned)))


def recoveries(after: dict[str, Any], unlearned: dict[str, Any], target: dict[str, Any] | None,
               notes: list[str], what: str) -> dict[str, float | None]:
    """`recovery` of every metric in `METRICS`; appends to `notes` why a figure is None."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        a, u = after.get(name), unlearned.get(name)
        t = target.get(name) if target is not None else None
        out[name] = recovery(a, u, t)
        if out[name] is None and a is not None and u is not None:
            if target is None:
                notes.append(f"{what}: no target reference, so no recovery figure")
            elif t is not None and math.isfinite(t) and math.isfinite(u) and gap_too_small(u, t):
                notes.append(f"{what}: {name} of the target ({t:.6g}) and of the starting model ({u:.6g}) differ by "
                             f"{abs(t - u):.2g}: gap too small to measure, recovery undefined")
    # One note per cause is enough.
    notes[:] = list(dict.fromkeys(notes))
    return out


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The aggregate numbers of a `forget_metrics` result (no per-question rows)."""
    return {k: metrics.get(k) for k in (*METRICS, "n")}
