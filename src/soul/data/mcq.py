"""Multiple-choice forgetting sets in WMDP's schema: ``question: str``, ``choices: list[str]``, ``answer: int``.

Sources for `load_multiple_choice(source, name, split)`:

* ``"bundled"``: built from a split of the bundled benchmark (`mcq_from_qa`): the paraphrased answer among
  its perturbed answers, positions shuffled with a fixed seed;
* a local ``.json``/``.jsonl``/``.parquet`` file, or a directory holding ``<name>.*`` or ``<name>/`` (for
  WMDP's hub layout: ``<dir>/wmdp-bio/test-*.parquet``);
* a hub id: ``cais/wmdp`` (configs ``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``; split ``test``), or
  ``hf:owner/name`` — through ``datasets.load_dataset(id, name, split=split)``; never used by the tests.

Accuracy is computed by the evaluator by comparing the log-likelihood of each choice given the question.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from soul.data.io import find_split_file, read_record_path
from soul.data.validate import DataError, check_records, check_str, check_str_list

WMDP_HUB_ID = "cais/wmdp"
WMDP_CONFIGS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")
HUB_PREFIX = "hf:"


def validate_mcq(records: Sequence, file: str) -> list[dict]:
    """Each record needs a question, at least two choices and an integer `answer` indexing `choices`."""
    check_records(records, file)
    for i, r in enumerate(records):
        check_str(r, "question", file, i)
        check_str_list(r, "choices", file, i, min_len=2)
        if "answer" not in r or r["answer"] is None:
            raise DataError(file, "missing (expected the index of the correct choice)", index=i, field="answer")
        a = r["answer"]
        if isinstance(a, bool) or not isinstance(a, int):
            raise DataError(file, f"expected an integer index into 'choices', got {type(a).__name__} {a!r:.40}",
                            index=i, field="answer")
        if not 0 <= a < len(r["choices"]):
            raise DataError(file, f"index {a} out of range for {len(r['choices'])} choices", index=i,
                            field="answer")
    return [dict(r) for r in records]


def mcq_from_qa(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """WMDP-style items from TOFU-schema records: choices = paraphrased answer + perturbed answers (same
    sentence frame), shuffled with `seed`; ``answer`` is where the paraphrased answer landed."""
    rng = random.Random(seed)
    out = []
    for r in records:
        choices = [r.get("paraphrased_answer", r["answer"]), *r["perturbed_answer"]]
        order = list(range(len(choices)))
        rng.shuffle(order)
        out.append({"question": r["question"], "choices": [choices[k] for k in order], "answer": order.index(0)})
    return out


def load_multiple_choice(source: str | os.PathLike = "bundled", name: str | None = None,
                         split: str = "test") -> list[dict]:
    """Validated multiple-choice items from `source` (see the module docstring)."""
    src = str(source)
    if src == "bundled":
        from soul.data.tofu import load_split

        name = name or "forget10_perturbed"
        return validate_mcq(mcq_from_qa(load_split("bundled", name)), f"bundled[{name}]")
    path = Path(src)
    if path.is_file():
        return validate_mcq(read_record_path(path), str(path))
    if path.is_dir():
        if name is None:
            raise ValueError(f"{path} is a directory: give the subset name (e.g. one of {WMDP_CONFIGS})")
        found = find_split_file(path, name)
        if found.is_dir() and any(found.glob(f"{split}*")):
            # Hub layout: <name>/<split>-00000-of-00001.parquet
            files = sorted(found.glob(f"{split}*"))
            records = [r for f in files for r in read_record_path(f)]
            return validate_mcq(records, str(found / f"{split}*"))
        return validate_mcq(read_record_path(found), str(found))
    if src == WMDP_HUB_ID or src.startswith(HUB_PREFIX):
        from datasets import load_dataset

        hub_id = src.removeprefix(HUB_PREFIX)
        records = [dict(r) for r in load_dataset(hub_id, name, split=split)]
        return validate_mcq(records, f"{hub_id}[{name}/{split}]")
    raise FileNotFoundError(
        f"multiple-choice source {src!r} is not 'bundled', an existing file or directory, or a hub id "
        f"({WMDP_HUB_ID} or '{HUB_PREFIX}owner/name')"
    )
