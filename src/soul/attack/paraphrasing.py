"""Paraphrase probe: the forget metrics with each forget question asked in other words.

An unlearning that only broke the exact question string still answers TOFU's ``paraphrased_question``.
The probe scores the original ``answer`` (and generates, for ROUGE-L) after the paraphrased question, on
every forget record that has one, and reports it next to the same records asked with the original question.
Its recovery figure follows the other attacks' formula with "after" = the unlearned model on the
paraphrased questions and "target" = the target model on the paraphrased questions::

    recovery = (m_para(unlearned) − m_orig(unlearned)) / (m_para(target) − m_orig(unlearned))

≈ 0: rewording the question brings nothing back; ≈ 1: asked in other words, the unlearned model answers
like the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUESTION_KEY = "paraphrased_question"


def paraphrased_records(records: Sequence[dict], where: str = "forget split") -> tuple[list[dict], list[int]]:
    """The records that have a non-empty ``paraphrased_question``, and their indices; an error when none has."""
    keep = [i for i, r in enumerate(records)
            if isinstance(r, dict) and isinstance(r.get(QUESTION_KEY), str) and r[QUESTION_KEY].strip()]
    if not keep:
        raise ValueError(f"{where}: no record has a 'paraphrased_question' field, so the paraphrase probe has "
                         "nothing to ask (TOFU's *_perturbed splits and the bundled benchmark have it)")
    return [records[i] for i in keep], keep


def paraphrase_original_and_reworded(model, tokenizer, records: Sequence[dict], *, eval_opts: dict[str, Any],
                                     original: dict[str, Any] | None = None) -> dict[str, Any]:
    """Forget metrics of `model` on `records` asked with the original and with the paraphrased question
    (`original`: the first, when the caller has it)."""
    from soul.attack.metrics import forget_metrics, summary

    if original is None:
        original = forget_metrics(model, tokenizer, records, **eval_opts)
    reworded = forget_metrics(model, tokenizer, records, question_key=QUESTION_KEY, **eval_opts)
    return {"original": summary(original), "paraphrased": summary(reworded),
            "examples": [{"question": r[QUESTION_KEY], "answer": r["answer"], "generation": q.get("generation")}
                         for r, q in zip(records, reworded["per_question"])][:3]}
