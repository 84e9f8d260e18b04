"""Detoxification sets (PKU-SafeRLHF-style): prompts paired with unsafe responses form the forget set.

Record layouts accepted:

* published PKU-SafeRLHF: ``prompt``, ``response_0``, ``response_1``, ``is_response_0_safe``,
  ``is_response_1_safe`` (booleans) — every unsafe response gives one forget pair;
* simple: ``prompt``, ``response`` and optionally ``is_safe`` (bool; missing means unsafe) — one pair per
  unsafe record.

Output records are in the QA schema so `QADataset` and the objectives use them unchanged:
``{"question": prompt, "answer": unsafe response, "source_index": i, "source_field": "response_k"}`` plus ``"safe_answer"`` when the
other response of a published pair is safe (usable as a preferred answer).

Sources: a local ``.json``/``.jsonl``/``.parquet`` file, a directory holding ``<split>.*`` (or ``<split>/``),
or a hub id ``PKU-Alignment/PKU-SafeRLHF`` / ``hf:owner/name`` via ``datasets.load_dataset(id, split=split)``
(never used by the tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from soul.data.io import find_split_file, read_record_path
from soul.data.validate import DataError, check_records, check_str

PKU_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
HUB_PREFIX = "hf:"


def _check_bool(record: dict, field: str, file: str, index: int, required: bool) -> None:
    if field not in record or record[field] is None:
        if required:
            raise DataError(file, "missing (expected true or false)", index=index, field=field)
        return
    if not isinstance(record[field], bool):
        raise DataError(file, f"expected true or false, got {type(record[field]).__name__} {record[field]!r:.40}",
                        index=index, field=field)


def detox_pairs(records: Sequence, file: str) -> list[dict]:
    """Validate `records` (either layout, decided per record) and return the unsafe (prompt, response) pairs."""
    check_records(records, file)
    out = []
    for i, r in enumerate(records):
        check_str(r, "prompt", file, i)
        if "response_0" in r or "response_1" in r:
            for k in (0, 1):
                check_str(r, f"response_{k}", file, i)
                _check_bool(r, f"is_response_{k}_safe", file, i, required=True)
            for k in (0, 1):
                if not r[f"is_response_{k}_safe"]:
                    pair = {"question": r["prompt"], "answer": r[f"response_{k}"], "source_index": i,
                            "source_field": f"response_{k}"}
                    if r[f"is_response_{1 - k}_safe"]:
                        pair["safe_answer"] = r[f"response_{1 - k}"]
                    out.append(pair)
        else:
            check_str(r, "response", file, i)
            _check_bool(r, "is_safe", file, i, required=False)
            if not r.get("is_safe", False):
                out.append({"question": r["prompt"], "answer": r["response"], "source_index": i,
                            "source_field": "response"})
    if not out:
        raise DataError(file, "empty split: no unsafe responses to forget")
    return out


def load_detox(source: str | os.PathLike, split: str = "train", *, tokenizer=None) -> list[dict]:
    """Forget pairs (prompt, unsafe response) from `source`; with a `tokenizer`, empty answers are errors."""
    src = str(source)
    path = Path(src)
    if path.is_file():
        records, where = read_record_path(path), str(path)
    elif path.is_dir():
        found = find_split_file(path, split)
        records, where = read_record_path(found), str(found)
    elif src == PKU_HUB_ID or src.startswith(HUB_PREFIX):
        from datasets import load_dataset

        hub_id = src.removeprefix(HUB_PREFIX)
        records, where = [dict(r) for r in load_dataset(hub_id, split=split)], f"{hub_id}[{split}]"
    else:
        raise FileNotFoundError(
            f"detox source {src!r} is not an existing file or directory, or a hub id "
            f"({PKU_HUB_ID} or '{HUB_PREFIX}owner/name')"
        )
    pairs = detox_pairs(records, where)
    if tokenizer is not None:
        for p in pairs:  # report the position in the source file, not in the pair list
            if not tokenizer(p["answer"], add_special_tokens=False)["input_ids"]:
                raise DataError(where, f"tokenises to no tokens ({p['answer']!r:.60})", index=p["source_index"],
                                field=p["source_field"])
    return pairs
