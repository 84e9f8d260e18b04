"""QADataset items, refusals, length-bucketing sampler, padding accounting."""

from __future__ import annotations

import pytest
import torch

from soul.data.dataset import (
    LengthBucketBatchSampler,
    QADataset,
    load_refusals,
    padding_fraction,
    qa_dataloader,
    refusal_choices,
)
from soul.data.format import encode_qa
from soul.data.generate import build_splits
from soul.data.validate import DataError
from soul.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def records():
    return build_splits(n_authors=4, qas_per_author=5, seed=0)["full"]


def test_refusals_asset_is_large_varied_and_clean():
    refusals = load_refusals()
    assert len(refusals) >= 30
    assert len(set(refusals)) == len(refusals)
    assert all(r.strip() == r and not r.startswith("#") for r in refusals)


def test_items_match_encode_qa_and_carry_index(records, tokenizer):
    ds = QADataset(records, tokenizer)
    assert len(ds) == len(records)
    for i in (0, 7, len(records) - 1):
        want = encode_qa(tokenizer, records[i]["question"], records[i]["answer"])
        assert ds[i]["input_ids"] == want["input_ids"] and ds[i]["labels"] == want["labels"]
        assert ds[i]["index"] == i and "refusal" not in ds[i]
    assert ds.lengths == [len(f["input_ids"]) for f in ds.features]


def test_refusal_is_a_deterministic_choice_per_record(records, tokenizer):
    refusals = load_refusals()
    a = QADataset(records, tokenizer, refusals=refusals)
    b = QADataset(records, tokenizer, refusals=refusals)
    assert a.refusal_index == b.refusal_index == refusal_choices(len(records), len(refusals), 0)
    assert len(set(a.refusal_index)) > 1  # varied, not one refusal for all
    for i in (0, 5):
        k = a.refusal_index[i]
        want = encode_qa(tokenizer, records[i]["question"], refusals[k])
        assert a[i]["refusal"]["input_ids"] == want["input_ids"]
        # Same prompt as the real answer, different answer tokens.
        n_prompt = sum(1 for t in a[i]["labels"] if t == IGNORE_INDEX)
        assert a[i]["refusal"]["input_ids"][:n_prompt] == a[i]["input_ids"][:n_prompt]
    c = QADataset(records, tokenizer, refusals=refusals, refusal_seed=1)
    assert c.refusal_index != a.refusal_index


def test_collated_batch_has_refusal_and_index(records, tokenizer):
    ds = QADataset(records, tokenizer, refusals=load_refusals())
    batch = next(iter(qa_dataloader(ds, batch_size=4, seed=0)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index", "refusal"}
    for j, i in enumerate(batch["index"].tolist()):
        n = len(ds[i]["input_ids"])
        assert batch["input_ids"][j, :n].tolist() == ds[i]["input_ids"]
        assert batch["attention_mask"][j].sum().item() == n
        assert (batch["labels"][j, n:] == IGNORE_INDEX).all()
    assert batch["refusal"]["input_ids"].shape[0] == 4


def test_max_length_truncates_answer_and_answer_field(records, tokenizer):
    short = QADataset(records, tokenizer, max_length=24)
    for r, f in zip(records, short):
        full = encode_qa(tokenizer, r["question"], r["answer"])
        n_prompt = full["labels"].count(IGNORE_INDEX)
        # The answer's end is cut to fit; at least one answer token always survives.
        assert len(f["input_ids"]) == min(len(full["input_ids"]), max(24, n_prompt + 1))
        assert f["input_ids"] == full["input_ids"][: len(f["input_ids"])]
    assert any(len(f["input_ids"]) < len(encode_qa(tokenizer, r["question"], r["answer"])["input_ids"])
               for r, f in zip(records, short))
    para = QADataset(records, tokenizer, answer_field="paraphrased_answer")
    assert para[0]["input_ids"] == encode_qa(tokenizer, records[0]["question"],
                                             records[0]["paraphrased_answer"])["input_ids"]
    with pytest.raises(DataError, match=r"records: record 0: field 'nope': missing"):
        QADataset(records, tokenizer, answer_field="nope")


def test_bad_records_and_refusals_fail_at_construction(tokenizer):
    with pytest.raises(DataError, match=r"records: record 1: field 'question': missing"):
        QADataset([{"question": "a?", "answer": "b"}, {"answer": "c"}], tokenizer)
    with pytest.raises(DataError, match=r"refusals: record 1: expected a non-empty string"):
        QADataset([{"question": "a?", "answer": "b"}], tokenizer, refusals=["I don't know.", " "])


def test_bucket_sampler_is_a_seeded_partition():
    lengths = [5, 40, 7, 33, 12, 3, 28, 19, 8, 41, 2, 16, 25]
    s = LengthBucketBatchSampler(lengths, batch_size=4, seed=1, bucket_batches=2)
    batches = list(s)
    assert len(batches) == len(s) == 4
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == list(LengthBucketBatchSampler(lengths, batch_size=4, seed=1, bucket_batches=2))
    s.set_epoch(1)
    assert list(s) != batches  # new epoch, new order
    dropped = LengthBucketBatchSampler(lengths, batch_size=4, seed=1, drop_last=True)
    assert len(dropped) == 3 and all(len(b) == 4 for b in dropped)


def test_full_window_sorting_gives_minimum_padding():
    lengths = [5, 40, 7, 33, 12, 3, 28, 19]
    s = LengthBucketBatchSampler(lengths, batch_size=2, shuffle=True, seed=0, bucket_batches=4)
    batches = list(s)
    # One window covers everything: batches are adjacent pairs of the sorted lengths.
    got = sorted(tuple(sorted(lengths[i] for i in b)) for b in batches)
    assert got == [(3, 5), (7, 12), (19, 28), (33, 40)]
    # Hand-computed: padded positions 2*(5+12+28+40)=170 for sum 147 useful -> 1 - 147/170.
    assert padding_fraction(lengths, batches) == pytest.approx(1 - 147 / 170)


def test_bucketing_saves_padding_on_the_benchmark(tokenizer):
    recs = build_splits(n_authors=20, qas_per_author=14, seed=0)["full"]
    ds = QADataset(recs, tokenizer)
    bucketed = padding_fraction(ds.lengths, list(LengthBucketBatchSampler(ds.lengths, 8, seed=0)))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(ds), generator=g).tolist()
    plain = padding_fraction(ds.lengths, [perm[i:i + 8] for i in range(0, len(perm), 8)])
    assert bucketed < plain / 2
