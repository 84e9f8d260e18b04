"""Attacks on unlearned models: is the forget set removed, or only hidden?

* relearning (`relearn`, `soul.attack.relearning`): a few fine-tuning steps on some forget authors, then the
  held-out authors' metrics, against the same attack on the target and on the retain model;
* quantization (`quantize`, `soul.attack.quantization`): round-to-nearest group-wise 2–8-bit weights;
* paraphrase probe (`paraphrase`, `soul.attack.paraphrasing`): the forget questions asked in other words.

Each reports the forget metrics before and after and ``recovery = (after − unlearned) / (target −
unlearned)`` per metric (`soul.attack.metrics`). `run_attacks` runs any set of them on one model (the
pipeline's entry point; layout in `soul.attack.run`), `attack_references` the target/retain side once per
grid; `soul.attack.report` has the table columns and the recovery plot. Command line: ``soul attack``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attack_references", "paraphrase", "quantize", "quantize_model_", "recovery", "relearn", "run_attacks",
           "split_relearn"]


def relearn(model, tokenizer=None, **kwargs: Any) -> dict[str, Any]:
    """The relearning attack alone: `run_attacks` with ``attacks_cfg={"relearn": options}``.

    Keyword arguments: ``data``, ``forget_split``, ``references``, ``reference_results``, ``eval_kwargs``,
    ``out``, ``generate``, ``max_new_tokens``, ``max_questions`` as in `run_attacks`, and the relearn options
    (``steps``, ``lr``, ``batch_size``, ``seed``, ``optimizer``, ``heldout_fraction``,
    ``questions_per_author``, ``train_options``).
    """
    return _single("relearn", model, tokenizer, kwargs)


def quantize(model, tokenizer=None, **kwargs: Any) -> dict[str, Any]:
    """The quantization attack alone (options ``bits``, ``group_size``, ``symmetric``, ``include_embeddings``)."""
    return _single("quantize", model, tokenizer, kwargs)


def paraphrase(model, tokenizer=None, **kwargs: Any) -> dict[str, Any]:
    """The paraphrase probe alone."""
    return _single("paraphrase", model, tokenizer, kwargs)


_RUN_KEYS = ("data", "forget_split", "references", "reference_results", "eval_kwargs", "out")
_COMMON = ("generate", "max_new_tokens", "max_questions")


def _single(name: str, model, tokenizer, kwargs: dict[str, Any]) -> dict[str, Any]:
    from soul.attack.run import run_attacks

    run = {k: kwargs.pop(k) for k in _RUN_KEYS if k in kwargs}
    common = {k: kwargs.pop(k) for k in _COMMON if k in kwargs}
    return run_attacks(model, tokenizer, attacks_cfg={name: kwargs, **common}, **run)


def __getattr__(name: str):
    # Lazy: `soul attack --help` and `import soul.attack` stay cheap.
    if name in ("run_attacks", "attack_references"):
        from soul.attack import run

        return getattr(run, name)
    if name == "split_relearn":
        from soul.attack.relearning import split_relearn

        return split_relearn
    if name == "quantize_model_":
        from soul.attack.quantization import quantize_model_

        return quantize_model_
    if name == "recovery":
        from soul.attack.metrics import recovery

        return recovery
    raise AttributeError(f"module 'soul.attack' has no attribute {name!r}")
