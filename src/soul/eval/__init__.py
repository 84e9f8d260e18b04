"""Evaluation: TOFU metrics with a retain-model reference, MIA, memorisation, copyright, multiple choice,
toxicity and optional lm-eval tasks. ``soul.evaluate`` is `soul.eval.evaluate`; `soul.eval.interop` reads
open-unlearning / TOFU results as retain references and writes open-unlearning's layout."""

from __future__ import annotations

from soul.eval.interop import normalise_reference, reference_format, to_open_unlearning, write_open_unlearning
from soul.eval.results import load_reference, load_results
from soul.eval.tofu import evaluate, reference_stats
from soul.io import write_json_atomic

__all__ = [
    "copyright_eval",
    "evaluate",
    "load_reference",
    "load_results",
    "multiple_choice_eval",
    "normalise_reference",
    "reference_format",
    "reference_stats",
    "run_lm_eval",
    "to_open_unlearning",
    "toxicity_eval",
    "write_json_atomic",
    "write_open_unlearning",
]


def __getattr__(name: str):
    # The task-specific evaluators load on first use (nltk, profanity-check, lm-eval are heavy or optional).
    if name == "copyright_eval":
        from soul.eval.copyright import copyright_eval

        return copyright_eval
    if name == "multiple_choice_eval":
        from soul.eval.multiple_choice import multiple_choice_eval

        return multiple_choice_eval
    if name == "toxicity_eval":
        from soul.eval.toxicity import toxicity_eval

        return toxicity_eval
    if name == "run_lm_eval":
        from soul.eval.harness import run_lm_eval

        return run_lm_eval
    raise AttributeError(f"module 'soul.eval' has no attribute {name!r}")
