"""Relearning attack: fine-tune the unlearned model for a few steps on part of the forget set and see whether
the *other* part comes back.

The forget set is split by author (`split_relearn`): a model that truly lost the held-out authors' facts
can only relearn them from the relearn authors' questions by generalisation, which a model that never saw
them (the retain model) does just as well. So the same attack runs on three models (`relearn_attack`):

* the unlearned model: held-out metrics before and after; ``recovery = (after − unlearned) / (target −
  unlearned)`` (`soul.attack.metrics.recovery`);
* the target model (reference): how much the same fine-tuning moves a model that knows the facts;
* the retain model (baseline): its own "recovery" ``(after_R − before_R) / (target − before_R)`` is what
  learning the relearn authors gives on the held-out ones from scratch. An unlearned model whose recovery is
  no higher than this has not been shown to hide anything.

Fine-tuning is `soul.train.finetune` on a copy of the model (the caller's model is never changed), in
memory, with a fixed seed, no warm-up and the mean answer-token NLL of the relearn records.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# TOFU has no author field: its forget sets are blocks of 20 questions per author, in order.
TOFU_QUESTIONS_PER_AUTHOR = 20


@dataclass(frozen=True)
class RelearnSplit:
    """Indices (into the forget records) of the relearn part and of the held-out part."""

    relearn: list[int]
    heldout: list[int]
    by: str                      # "author" (records' `author` field) or "block" (contiguous blocks)
    groups: int                  # authors (or blocks) in the forget set
    heldout_groups: list[str]    # the held-out authors (or "block i")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_relearn(records: Sequence[dict], *, heldout_fraction: float = 0.5, seed: int = 0,
                  questions_per_author: int = TOFU_QUESTIONS_PER_AUTHOR) -> RelearnSplit:
    """Split the forget records into whole authors to relearn and whole authors held out.

    Authors are the records' ``author`` field when every record has one (the bundled benchmark), else
    contiguous blocks of `questions_per_author` records (TOFU's layout: 20 per author; a shorter last block
    is one more author). ``max(1, round(heldout_fraction × authors))`` authors, drawn with
    ``random.Random(seed)``, are held out, and at least one is left to relearn. Deterministic in its arguments.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if not isinstance(questions_per_author, int) or questions_per_author < 1:
        raise ValueError(f"questions_per_author must be a positive integer, got {questions_per_author!r}")
    groups: dict[str, list[int]] = {}
    if records and all(isinstance(r.get("author"), str) and r["author"].strip() for r in records):
        by = "author"
        for i, r in enumerate(records):
            groups.setdefault(r["author"], []).append(i)
    else:
        by = "block"
        for i in range(len(records)):
            groups.setdefault(f"block {i // questions_per_author}", []).append(i)
    if len(groups) < 2:
        raise ValueError(f"the relearning attack needs a forget set of at least two authors, to relearn one and hold "
                         f"out another; this one has {len(groups)} ({len(records)} records, split by {by}"
                         + ("" if by == "author" else f" into blocks of {questions_per_author}") + ")")
    names = list(groups)
    n_held = min(len(names) - 1, max(1, round(heldout_fraction * len(names))))
    held = random.Random(seed).sample(names, n_held)
    heldout = sorted(i for name in held for i in groups[name])
    relearn = sorted(i for name in names if name not in held for i in groups[name])
    return RelearnSplit(relearn, heldout, by, len(names), [n for n in names if n in held])


def relearned_copy(model, tokenizer, records: Sequence[dict], *, steps: int, lr: float, batch_size: int,
                   seed: int = 0, optimizer: str = "adamw", prompt_format: str = "auto",
                   train_options: dict[str, Any] | None = None):
    """A copy of `model` fine-tuned for `steps` optimizer steps on `records` (the model itself is untouched)."""
    from soul.train import finetune

    options = {"warmup_ratio": 0.0, "weight_decay": 0.0, "progress": False, **(train_options or {})}
    attacked = copy.deepcopy(model)
    attacked, _ = finetune(attacked, tokenizer, data={"relearn": list(records)}, split="relearn",
                           optimizer=optimizer, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           prompt_format=prompt_format, **options)
    attacked.eval()
    return attacked


def relearn_before_after(model, tokenizer, relearn_records: Sequence[dict], heldout_records: Sequence[dict], *,
                         cfg: dict[str, Any], eval_opts: dict[str, Any],
                         before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Held-out forget metrics of `model` before and after relearning (`relearned_copy`) on `relearn_records`.

    `before` (a `forget_metrics` result of `model` on `heldout_records`, when the caller has it) saves one
    evaluation.
    """
    from soul.attack.metrics import forget_metrics, summary

    if before is None:
        before = forget_metrics(model, tokenizer, heldout_records, **eval_opts)
    attacked = relearned_copy(model, tokenizer, relearn_records, steps=cfg["steps"], lr=cfg["lr"],
                              batch_size=cfg["batch_size"], seed=cfg["seed"], optimizer=cfg["optimizer"],
                              prompt_format=eval_opts.get("prompt_format", "auto"),
                              train_options=cfg.get("train_options"))
    after = forget_metrics(attacked, tokenizer, heldout_records, **eval_opts)
    del attacked
    return {"before": summary(before), "after": summary(after),
            "examples": [{"question": r["question"], "answer": r["answer"], "before": b.get("generation"),
                          "after": a.get("generation")}
                         for r, b, a in zip(heldout_records, before["per_question"], after["per_question"])][:3]}
