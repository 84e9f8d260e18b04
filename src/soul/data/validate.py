"""Validation of loaded records: one error per problem, naming the file, the record index and the field.

Every loader in `soul.data` runs these checks before it returns, so a bad file fails before any model is
loaded or trained. Errors are `DataError` (a `ValueError`, so ``soul`` prints them as one line) with the
message ``"{file}: record {index}: field {field!r}: {problem}"``; a missing file is a `FileNotFoundError`
that names every path that was tried.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# Fields of TOFU's schema and what each must hold.
STR_FIELD = "a non-empty string"
LIST_FIELD = "a non-empty list of non-empty strings"


class DataError(ValueError):
    """A record (or a whole split) that cannot be used; `file`, `index` and `field` say where."""

    def __init__(self, file: str, problem: str, *, index: int | None = None, field: str | None = None) -> None:
        self.file, self.index, self.field, self.problem = str(file), index, field, problem
        where = [self.file]
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, problem]))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_str(record: dict, field: str, file: str, index: int, *, required: bool = True) -> None:
    """`record[field]` must be a string with at least one non-space character."""
    if field not in record or record[field] is None:
        if required:
            raise DataError(file, f"missing (expected {STR_FIELD})", index=index, field=field)
        return
    value = record[field]
    if not isinstance(value, str):
        raise DataError(file, f"expected {STR_FIELD}, got {_type_name(value)} {value!r:.60}", index=index,
                        field=field)
    if not value.strip():
        raise DataError(file, f"expected {STR_FIELD}, got an empty string", index=index, field=field)


def check_str_list(record: dict, field: str, file: str, index: int, *, required: bool = True,
                   min_len: int = 1) -> None:
    """`record[field]` must be a list of at least `min_len` non-empty strings."""
    if field not in record or record[field] is None:
        if required:
            raise DataError(file, f"missing (expected {LIST_FIELD})", index=index, field=field)
        return
    value = record[field]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DataError(file, f"expected {LIST_FIELD}, got {_type_name(value)}", index=index, field=field)
    if len(value) < min_len:
        raise DataError(file, f"expected at least {min_len} item(s), got {len(value)}", index=index, field=field)
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(file, f"item {j}: expected a non-empty string, got {_type_name(item)} {item!r:.60}",
                            index=index, field=field)


def check_records(records: Sequence[Any], file: str) -> None:
    """The split must be a non-empty list of JSON objects."""
    if len(records) == 0:
        raise DataError(file, "empty split: no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(file, f"expected a JSON object, got {_type_name(record)}", index=i)


def check_tokenises(records: Sequence[dict], field: str, tokenizer, file: str) -> None:
    """Every `record[field]` must give at least one token (without special tokens) under `tokenizer`."""
    for i, record in enumerate(records):
        value = record.get(field)
        if isinstance(value, str) and not tokenizer(value, add_special_tokens=False)["input_ids"]:
            raise DataError(file, f"tokenises to no tokens ({value!r:.60})", index=i, field=field)


# Splits of real-world questions (TOFU's real_authors*, world_facts*): the truth ratio compares the answer itself
# with its perturbations, so TOFU publishes them without paraphrases.
NO_PARAPHRASE_PREFIXES = ("real_authors", "world_facts")


def qa_required_fields(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required string fields, required list fields) for a TOFU split called `name`, as TOFU publishes them.

    Every split needs ``question`` and ``answer``. The ``*_perturbed`` splits (used for the truth ratio) also
    need ``perturbed_answer``; those of the fictitious authors (``forget*``, ``retain*``, ``holdout*``) need
    ``paraphrased_answer`` too, while ``real_authors_perturbed`` and ``world_facts_perturbed`` carry none (their
    truth ratio uses the answer itself).
    """
    if name.endswith("_perturbed"):
        if name.startswith(NO_PARAPHRASE_PREFIXES):
            return ("question", "answer"), ("perturbed_answer",)
        return ("question", "answer", "paraphrased_answer"), ("perturbed_answer",)
    return ("question", "answer"), ()


def validate_qa(records: Sequence[Any], file: str, name: str = "", tokenizer=None) -> list[dict]:
    """Check a split in TOFU's schema; return it as a list of dicts.

    Required fields depend on the split (`qa_required_fields`); optional TOFU fields, when present, must
    have the right type too. With a `tokenizer`, answers that tokenise to nothing are errors.
    """
    check_records(records, file)
    req_str, req_list = qa_required_fields(name)
    for i, r in enumerate(records):
        for field in ("question", "answer", "paraphrased_question", "paraphrased_answer", "author"):
            check_str(r, field, file, i, required=field in req_str)
        check_str_list(r, "perturbed_answer", file, i, required="perturbed_answer" in req_list)
    if tokenizer is not None:
        check_tokenises(records, "answer", tokenizer, file)
    return list(records)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().casefold())


def check_disjoint(forget: Iterable[dict], retain: Iterable[dict], *, forget_name: str = "forget",
                   retain_name: str = "retain", key: str = "question") -> None:
    """Raise `DataError` when a forget record's `key` (case- and space-normalised) also appears in retain.

    Unlearning a question that the retain set also trains on makes both objectives fight over it.
    """
    seen = {}
    for j, r in enumerate(retain):
        seen.setdefault(_norm(str(r.get(key, ""))), j)
    for i, r in enumerate(forget):
        k = _norm(str(r.get(key, "")))
        if k and k in seen:
            raise DataError(
                forget_name, f"also in {retain_name} (record {seen[k]}): {r.get(key)!r}; forget and retain "
                "must not overlap", index=i, field=key,
            )
