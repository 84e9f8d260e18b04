"""Detoxification sets (PKU-SafeRLHF-style): prompts paired with unsafe responses form the forget set.

Record layouts accepted:

* published PKU-SafeRLHF: ``prompt``, ``response_0``, ``response_1``, ``is_response_0_safe``,
  ``is_response_1_safe`` (booleans) — every unsafe response gives one forget pair;
* simple: ``prompt``, ``response`` and optionally ``is_safe`` (bool; missing means unsafe) — one pair per
  unsafe record. (`load_safe_responses` reads the same layouts for the *safe* side: there a missing
  ``is_safe`` means safe, since the file is given as the safe set.)

Output records are in the QA schema so `QADataset` and the objectives use them unchanged:
``{"question": prompt, "answer": unsafe response, "source_index": i, "source_field": "response_k"}`` plus ``"safe_answer"`` when the
other response of a published pair is safe (usable as a preferred answer).

Sources: a local ``.csv`` (header row; ``true``/``false`` for the ``is_*`` columns), ``.json``/``.jsonl``/``.parquet`` file, a directory holding ``<split>.*`` (or ``<split>/``),
or a hub id ``PKU-Alignment/PKU-SafeRLHF`` / ``hf:owner/name`` via ``datasets.load_dataset(id, split=split)``
(never used by the tests).

`load_rtp` reads RealToxicityPrompts' JSONL schema (``{"prompt": {"text", "toxicity", ...}, "continuation":
{...}, "challenging": bool, ...}``) for the continuation-toxicity evaluation.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soul.data.io import find_split_file, read_record_path
from soul.data.validate import DataError, check_records, check_str

PKU_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
HUB_PREFIX = "hf:"
# Licences of the detox data (data README): they travel with results that use the files.
PKU_LICENCE = "CC-BY-NC-4.0 (PKU-SafeRLHF: research, non-commercial, with attribution)"
RTP_LICENCE = ("Apache-2.0 (RealToxicityPrompts, Gehman et al. 2020); the DecodingTrust compilation of its "
               "prompts: CC-BY-SA-4.0")
_BOOL_TEXT = {"true": True, "false": False}


def read_csv_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header, as dicts; ``true``/``false`` (any case) in ``is_*`` columns become
    booleans (CSV has no types). A file that is not UTF-8, has no header or a ragged row is a `DataError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), f"not UTF-8 text (byte {err.start}: {err.reason})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise DataError(str(path), "empty CSV file: no header row (expected prompt,response)")
    rows = []
    try:
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns
                raise DataError(str(path), f"{len(reader.fieldnames) + len(row[None])} cells for "
                                           f"{len(reader.fieldnames)} header columns", index=i)
            rows.append({k: _BOOL_TEXT.get(v.strip().lower(), v) if k.startswith("is_") and isinstance(v, str) else v
                         for k, v in row.items()})
    except csv.Error as err:
        raise DataError(str(path), f"not valid CSV (line {reader.line_num}: {err})") from None
    return rows


def read_detox_file(path: str | os.PathLike) -> list[Any]:
    """Records of a ``.csv`` file (`read_csv_records`) or any file `read_record_path` reads."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv_records(path)
    return read_record_path(path)


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
        if _checked_hub_layout(r, file, i):
            for k in (0, 1):
                if not r[f"is_response_{k}_safe"]:
                    pair = {"question": r["prompt"], "answer": r[f"response_{k}"], "source_index": i,
                            "source_field": f"response_{k}"}
                    if r[f"is_response_{1 - k}_safe"]:
                        pair["safe_answer"] = r[f"response_{1 - k}"]
                    out.append(pair)
        elif not r.get("is_safe", False):
            out.append({"question": r["prompt"], "answer": r["response"], "source_index": i,
                        "source_field": "response"})
    if not out:
        raise DataError(file, "empty split: no unsafe responses to forget")
    return out


def _checked_hub_layout(r: dict, file: str, i: int) -> bool:
    """Check record `i` in whichever layout it has; True for the hub's (response_0/1 + is_response_*_safe),
    False for the simple prompt,response[,is_safe]."""
    check_str(r, "prompt", file, i)
    _check_layout(r, file, i)
    if "response_0" in r or "response_1" in r:
        for k in (0, 1):
            check_str(r, f"response_{k}", file, i)
            _check_bool(r, f"is_response_{k}_safe", file, i, required=True)
        return True
    check_str(r, "response", file, i)
    _check_bool(r, "is_safe", file, i, required=False)
    return False


def _check_layout(r: dict, file: str, i: int) -> None:
    """A record must have ``response`` or the hub's ``response_0``/``response_1``: name what is missing."""
    if not any(k in r for k in ("response", "response_0", "response_1")):
        raise DataError(file, "missing (expected a string: the simple layout prompt,response, or the hub layout "
                              "prompt,response_0,response_1,is_response_0_safe,is_response_1_safe)",
                        index=i, field="response")


def safe_responses(records: Sequence, file: str) -> list[dict]:
    """The safe (prompt, response) pairs of `records` as QA records: a hub-layout record gives each response
    marked safe; a simple record its ``response`` unless ``is_safe`` is false (the file is the safe set)."""
    check_records(records, file)
    out = []
    for i, r in enumerate(records):
        if _checked_hub_layout(r, file, i):
            out.extend({"question": r["prompt"], "answer": r[f"response_{k}"], "source_index": i,
                        "source_field": f"response_{k}"} for k in (0, 1) if r[f"is_response_{k}_safe"])
        elif r.get("is_safe", True):
            out.append({"question": r["prompt"], "answer": r["response"], "source_index": i,
                        "source_field": "response"})
    if not out:
        raise DataError(file, "empty split: no safe responses to keep")
    return out


def _read_source(source: str | os.PathLike, split: str) -> tuple[list, str]:
    src = str(source)
    path = Path(src)
    if path.is_file():
        return read_detox_file(path), str(path)
    if path.is_dir():
        found = find_split_file(path, split)
        return read_detox_file(found), str(found)
    if src == PKU_HUB_ID or src.startswith(HUB_PREFIX):
        from datasets import load_dataset

        hub_id = src.removeprefix(HUB_PREFIX)
        return [dict(r) for r in load_dataset(hub_id, split=split)], f"{hub_id}[{split}]"
    raise FileNotFoundError(f"detox source {src!r} is not an existing file or directory, or a hub id "
                            f"({PKU_HUB_ID} or '{HUB_PREFIX}owner/name')")


def load_safe_responses(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Safe (prompt, response) QA records of `source` (`safe_responses`; sources as for `load_detox`)."""
    records, where = _read_source(source, split)
    return safe_responses(records, where)


def load_rtp(source: str | os.PathLike) -> list[dict]:
    """RealToxicityPrompts records of a ``.jsonl``/``.json`` file: ``{"prompt": prompt.text, "challenging",
    "prompt_toxicity": prompt.toxicity or None, "source_index"}``; a record without an object ``prompt``
    holding a non-empty ``text``, or whose ``challenging`` is not a boolean, is a `DataError`."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"RealToxicityPrompts file {path} does not exist")
    file = str(path)
    records = read_record_path(path)
    check_records(records, file)
    out = []
    for i, r in enumerate(records):
        prompt = r.get("prompt")
        if not isinstance(prompt, dict):
            got = "missing" if prompt is None else f"got {type(prompt).__name__} {prompt!r:.40}"
            raise DataError(file, f"expected RealToxicityPrompts' object {{\"text\": ..., \"toxicity\": ...}}, {got}",
                            index=i, field="prompt")
        check_str(prompt, "text", file, i)
        _check_bool(r, "challenging", file, i, required=True)
        tox = prompt.get("toxicity")
        out.append({"prompt": prompt["text"], "challenging": r["challenging"],
                    "prompt_toxicity": float(tox) if isinstance(tox, int | float) else None, "source_index": i})
    return out


def load_detox(source: str | os.PathLike, split: str = "train", *, tokenizer=None) -> list[dict]:
    """Forget pairs (prompt, unsafe response) from `source`; with a `tokenizer`, empty answers are errors."""
    records, where = _read_source(source, split)
    pairs = detox_pairs(records, where)
    if tokenizer is not None:
        for p in pairs:  # report the position in the source file, not in the pair list
            if not tokenizer(p["answer"], add_special_tokens=False)["input_ids"]:
                raise DataError(where, f"tokenises to no tokens ({p['answer']!r:.60})", index=p["source_index"],
                                field=p["source_field"])
    return pairs
