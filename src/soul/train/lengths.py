"""Sequence-length guard of the training data: nothing longer than the model's context reaches a forward pass.

Without ``max_length`` a run's limit is the model's context (`model_context`) and a longer record is an error
naming its file and index (a 10 MB answer would otherwise try to allocate an attention matrix of terabytes).
With an explicit ``max_length`` (at most the context) longer records are truncated as `soul.data.format.encode_qa`
does — the end of the answer is cut — with one warning naming them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Cheap pre-check before tokenising: a token is at least one character in every tokenizer we know of, so a
# record with more characters than this many times the context cannot be made to fit and is not tokenised.
MAX_CHARS_PER_TOKEN = 64


def model_context(model, tokenizer=None) -> int | None:
    """The longest sequence `model` takes (its config's position limit), else the tokenizer's, else None."""
    config = getattr(model, "config", None)
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000_000 else None


class DataPlace(str):
    """Where a role's records came from (a file, a split directory, ``source[split]``), as a string; `record(i)`
    names record `i` — in a split directory of several files, by its file and its index in that file."""

    files: list[tuple[Path, int]]

    def record(self, index: int) -> str:
        for path, count in getattr(self, "files", []):
            if index < count:
                return f"{path}: record {index}"
            index -= count
        return f"{self}: record {index}"


def data_label(data_info: dict[str, Any] | None, role: str) -> DataPlace:
    """Where a role's records came from, for messages: the split's file when the source is a directory."""
    entry = (data_info or {}).get(role) or {}
    source, split = entry.get("source"), entry.get("split")
    if source and split and Path(str(source)).is_dir():
        from soul.data.io import find_split_file, read_record_path
        from soul.data.tofu import split_files

        try:
            path = find_split_file(source, split)
        except FileNotFoundError:
            return DataPlace(f"{source}[{split}]")
        place = DataPlace(str(path))
        if path.is_dir():
            place.files = [(f, len(read_record_path(f))) for f in split_files(path)]
        return place
    if source and split:
        return DataPlace(f"{source}[{split}]")
    return DataPlace(f"{role} records")


def encode_within_context(records: Sequence[dict], tokenizer, cfg, refusals: list[str] | None, *,
                          context: int | None, where: str | DataPlace) -> list[dict]:
    """Features of `records` (as `soul.train.loop.encode_records`), each at most the length limit."""
    from soul.data import QADataset
    from soul.data.validate import DataError

    place = where if isinstance(where, DataPlace) else DataPlace(where)

    if cfg.max_length is not None and context is not None and cfg.max_length > context:
        raise ValueError(f"option 'max_length' is {cfg.max_length}, more than the model's context of {context} tokens")
    limit = cfg.max_length or context
    if limit is not None:
        for i, r in enumerate(records):
            text = f"{r.get('question', '')}{r.get('answer', '')}" if isinstance(r, dict) else ""
            if cfg.max_length is None and len(text) > MAX_CHARS_PER_TOKEN * limit:
                raise ValueError(f"{place.record(i)} has {len(text)} characters, far more than the model's "
                                 f"context of {limit} tokens; shorten it (or set max_length to truncate answers)")
    try:
        ds = QADataset(list(records), tokenizer, prompt_format=cfg.prompt_format, max_length=None,
                       refusals=refusals, source=str(place))
    except DataError as err:  # name the file (and index in it) of a split directory's record
        if err.index is None:
            raise
        field = f": field {err.field!r}" if err.field else ""
        raise ValueError(f"{place.record(err.index)}{field}: {err.problem}") from None
    feats = [ds[i] for i in range(len(ds))]
    if limit is None:
        return feats
    too_long = [i for i, f in enumerate(feats)
                if len(f["input_ids"]) > limit or len(f.get("refusal", {}).get("input_ids", ())) > limit]
    if not too_long:
        return feats
    if cfg.max_length is None:
        i = too_long[0]
        raise ValueError(f"{place.record(i)} is {len(feats[i]['input_ids'])} tokens long, more than the model's "
                         f"context of {limit}" + (f" ({len(too_long)} records are)" if len(too_long) > 1 else "")
                         + "; shorten it or set max_length to truncate answers")
    truncated = QADataset(list(records), tokenizer, prompt_format=cfg.prompt_format, max_length=limit,
                          refusals=refusals, source=where)
    for i in too_long:
        if len(truncated[i]["input_ids"]) > limit:
            raise ValueError(f"{place.record(i)}: its prompt alone is longer than max_length={limit} tokens")
        feats[i] = truncated[i]
    shown = ", ".join(str(i) for i in too_long[:10]) + (" …" if len(too_long) > 10 else "")
    message = f"{place}: truncated {len(too_long)} record(s) to max_length={limit} tokens (records {shown})"
    print(f"soul: warning: {message}", file=sys.stderr)
    return feats
