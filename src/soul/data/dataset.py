"""Torch datasets over validated records, refusal answers, and a length-bucketing batch sampler.

`QADataset` tokenises every record once, up front (`soul.data.format.encode_qa`), so lengths are known for
bucketing and a record that cannot be encoded fails at construction, before training. Its items are the
features `soul.data.format.QACollator` expects.

Padding cost: a right-padded batch of lengths l_1..l_B costs B · max_i l_i positions for sum_i l_i useful
ones. `LengthBucketBatchSampler` sorts indices by length inside windows of ``batch_size · bucket_batches``
randomly shuffled indices, cuts batches from the sorted order, then shuffles the batches — neighbours have
similar lengths (less padding) while batch composition and order stay random (seeded, per epoch).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from soul.data.format import QACollator, encode_qa
from soul.data.validate import DataError, check_str, check_tokenises, validate_qa

REFUSALS_ASSET = "refusals.txt"


def read_asset(name: str) -> str:
    """Text of a file shipped in ``soul/assets``."""
    return resources.files("soul").joinpath("assets", name).read_text(encoding="utf-8")


def load_refusals() -> list[str]:
    """The bundled "I don't know"-style answers (``soul/assets/refusals.txt``; blank lines and ``#`` skipped)."""
    lines = [ln.strip() for ln in read_asset(REFUSALS_ASSET).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def refusal_choices(n_records: int, n_refusals: int, seed: int = 0) -> list[int]:
    """Which refusal each record gets: a seeded uniform draw per record (same seed and order, same choice)."""
    if n_refusals < 1:
        raise ValueError("refusals must hold at least one answer")
    rng = random.Random(seed)
    return [rng.randrange(n_refusals) for _ in range(n_records)]


class QADataset(Dataset):
    """Encoded question-answer records.

    Item i is ``{"input_ids", "labels", "index": i}`` (labels are -100 on the prompt) and, when `refusals` are
    given, ``"refusal": {"input_ids", "labels"}`` — the same question answered with
    ``refusals[refusal_choices(...)[i]]``. `answer_field` picks which answer to train on (e.g.
    ``"paraphrased_answer"``).
    """

    def __init__(self, records: Sequence[dict], tokenizer, prompt_format: str = "auto",
                 max_length: int | None = None, refusals: Sequence[str] | None = None, *,
                 answer_field: str = "answer", refusal_seed: int = 0, source: str = "records") -> None:
        self.records = validate_qa(records, source, tokenizer=tokenizer)
        if answer_field != "answer":
            for i, r in enumerate(self.records):
                check_str(r, answer_field, source, i)
            check_tokenises(self.records, answer_field, tokenizer, source)
        self.tokenizer, self.prompt_format, self.max_length = tokenizer, prompt_format, max_length
        self.features: list[dict[str, Any]] = [
            {**encode_qa(tokenizer, r["question"], r[answer_field], prompt_format=prompt_format,
                         max_length=max_length), "index": i}
            for i, r in enumerate(self.records)
        ]
        if refusals is not None:
            refusals = list(refusals)
            for j, text in enumerate(refusals):
                if not isinstance(text, str) or not text.strip():
                    raise DataError("refusals", "expected a non-empty string", index=j)
            self.refusal_index = refusal_choices(len(self.records), len(refusals), refusal_seed)
            for f, r, k in zip(self.features, self.records, self.refusal_index):
                f["refusal"] = encode_qa(tokenizer, r["question"], refusals[k], prompt_format=prompt_format,
                                         max_length=max_length)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    @property
    def lengths(self) -> list[int]:
        """Token count of each item (prompt + answer), for bucketing."""
        return [len(f["input_ids"]) for f in self.features]


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths, in random order (see the module docstring).

    ``bucket_batches`` batches share one sorting window: 1 gives plain random batches, ``len // batch_size``
    sorts the whole epoch (least padding, least randomness). Call `set_epoch` to reshuffle per epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 bucket_batches: int = 16, drop_last: bool = False) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.shuffle, self.seed, self.bucket_batches, self.drop_last = shuffle, seed, bucket_batches, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        window = self.batch_size * self.bucket_batches
        ordered: list[int] = []
        for start in range(0, len(order), window):
            # Stable sort: equal lengths keep the shuffled order.
            ordered.extend(sorted(order[start:start + window], key=self.lengths.__getitem__))
        out = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions: 1 - sum_i l_i / sum_batches (|batch| · max length in batch)."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    used = sum(lengths[i] for b in batches for i in b)
    return 0.0 if total == 0 else 1.0 - used / total


def qa_dataloader(dataset: QADataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  bucket: bool = True, drop_last: bool = False, padding_side: str = "right") -> DataLoader:
    """A DataLoader over `dataset` with `QACollator`; length-bucketed batches when `bucket`, else plain ones."""
    collate = QACollator(dataset.tokenizer, padding_side=padding_side)
    if bucket:
        sampler = LengthBucketBatchSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed,
                                           drop_last=drop_last)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      generator=gen)
