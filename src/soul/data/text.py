"""Copyright / text forgetting: a corpus cut into passages, and prefix → continuation items.

Sources: ``"bundled"`` (``soul/assets/book.txt``, a short novel written for this project), a ``.txt`` file
(one document), a ``.json``/``.jsonl`` file of objects with a text field (one document each), or a directory
of such files (sorted by name).

Passages are consecutive runs of `passage_words` whitespace-separated words of one document (a short final
run is kept when it has at least `min_words`). For evaluation, passage i gives the item
``{"prompt": first prefix_words words, "continuation": the next continuation_words words, "passage": i}``;
the model's greedy continuation of the prompt is scored against ``continuation`` (BLEU / ROUGE-L).
For training (gradient ascent on the text), `TextDataset` encodes whole passages with every token a label.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from soul.data.dataset import read_asset
from soul.data.io import read_json_records
from soul.data.validate import DataError, check_records, check_str

BOOK_ASSET = "book.txt"
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


def _read_documents(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(str(path), "empty text file")
        return [text]
    records = read_json_records(path)
    check_records(records, str(path))
    for i, r in enumerate(records):
        check_str(r, text_field, str(path), i)
    return [r[text_field] for r in records]


def load_documents(source: str | os.PathLike = "bundled", *, text_field: str = "text") -> list[str]:
    """Documents of a text corpus (see the module docstring), each checked to be non-empty text."""
    if str(source) == "bundled":
        return [read_asset(BOOK_ASSET)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files in this directory")
        return [d for f in files for d in _read_documents(f, text_field)]
    if not path.is_file():
        raise FileNotFoundError(f"text corpus {path} does not exist")
    return _read_documents(path, text_field)


def split_passages(documents: Sequence[str], passage_words: int = 64, min_words: int | None = None) -> list[str]:
    """Cut each document into runs of `passage_words` words (whitespace normalised to single spaces)."""
    if passage_words < 2:
        raise ValueError(f"passage_words must be >= 2, got {passage_words}")
    min_words = passage_words // 2 if min_words is None else min_words
    passages = []
    for doc in documents:
        words = doc.split()
        for start in range(0, len(words), passage_words):
            chunk = words[start:start + passage_words]
            if len(chunk) >= max(1, min_words):
                passages.append(" ".join(chunk))
    return passages


def load_passages(source: str | os.PathLike = "bundled", passage_words: int = 64, *,
                  text_field: str = "text") -> list[str]:
    """Passages of a corpus; an error names the source when none is long enough."""
    passages = split_passages(load_documents(source, text_field=text_field), passage_words)
    if not passages:
        raise DataError(str(source), f"no passage of at least {passage_words // 2} words")
    return passages


def continuation_items(passages: Sequence[str], prefix_words: int = 32, continuation_words: int = 32, *,
                       source: str = "passages") -> list[dict[str, Any]]:
    """Prompt-prefix → continuation items from passages with more than `prefix_words` words."""
    items = []
    for i, p in enumerate(passages):
        words = p.split()
        if len(words) > prefix_words:
            items.append({"prompt": " ".join(words[:prefix_words]),
                          "continuation": " ".join(words[prefix_words:prefix_words + continuation_words]),
                          "passage": i})
    if not items:
        raise DataError(source, f"no passage longer than prefix_words={prefix_words} words")
    return items


def load_copyright(source: str | os.PathLike = "bundled", *, passage_words: int = 64, prefix_words: int = 32,
                   continuation_words: int = 32, text_field: str = "text") -> tuple[list[str], list[dict]]:
    """(forget passages, prefix → continuation items) for a text-forgetting run."""
    passages = load_passages(source, passage_words, text_field=text_field)
    return passages, continuation_items(passages, prefix_words, continuation_words, source=str(source))


class TextDataset(Dataset):
    """Passages tokenised for language modelling: labels = input_ids (`soul.losses` shifts them).

    Items match `soul.data.format.QACollator`: ``{"input_ids", "labels", "index"}``; a BOS token is prepended
    when the tokenizer has one, and `max_length` truncates the end.
    """

    def __init__(self, passages: Sequence[str], tokenizer, max_length: int | None = None) -> None:
        self.features = []
        for i, p in enumerate(passages):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            if not ids:
                raise DataError("passages", "tokenises to no tokens", index=i, field="text")
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id, *ids]
            if max_length is not None:
                ids = ids[:max_length]
            self.features.append({"input_ids": ids, "labels": list(ids), "index": i})
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]
