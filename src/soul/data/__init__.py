"""Benchmarks, loaders, validation and tokenisation (records in TOFU's schema).

* `make_benchmark` / `load_split` — the bundled fictitious-author benchmark and TOFU splits (bundled, local
  directory, or ``locuslab/TOFU``); `tofu_subset` — a TOFU run on a subset of its authors;
* `QADataset`, `load_refusals`, `LengthBucketBatchSampler`, `qa_dataloader` — tokenised training data;
* `load_copyright` / `TextDataset` (text forgetting), `load_multiple_choice` (WMDP-style),
  `load_detox` (PKU-SafeRLHF-style);
* `DataError`, `validate_qa`, `check_disjoint` — validation with file / record / field in every message.
"""

from soul.data.dataset import (
    LengthBucketBatchSampler,
    QADataset,
    load_refusals,
    padding_fraction,
    qa_dataloader,
    refusal_choices,
)
from soul.data.detox import load_detox
from soul.data.format import QACollator, encode_qa, pad_batch
from soul.data.generate import build_splits, make_benchmark
from soul.data.mcq import load_multiple_choice, mcq_from_qa, validate_mcq
from soul.data.summary import describe_benchmark, describe_split
from soul.data.text import TextDataset, continuation_items, load_copyright, load_passages
from soul.data.tofu import bundled_dir, load_forget_retain, load_split, matching_retain
from soul.data.tofu_authors import author_table, authors_of, expand_source, find_tofu_dir, tofu_subset
from soul.data.validate import DataError, check_disjoint, validate_qa

__all__ = [
    "DataError", "LengthBucketBatchSampler", "QACollator", "QADataset", "TextDataset", "author_table", "authors_of",
    "build_splits",
    "bundled_dir", "check_disjoint", "continuation_items", "describe_benchmark", "describe_split",
    "encode_qa", "expand_source", "find_tofu_dir", "load_copyright", "load_detox", "load_forget_retain", "load_multiple_choice",
    "load_passages", "load_refusals", "load_split", "make_benchmark", "matching_retain", "mcq_from_qa",
    "pad_batch", "padding_fraction", "qa_dataloader", "refusal_choices", "tofu_subset", "validate_mcq",
    "validate_qa",
]
