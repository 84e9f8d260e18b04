"""Helpers for the objectives' tests: the batches, and an independent oracle (plain loops in float64,
not using soul.losses) that the objectives' values are checked against."""

from __future__ import annotations

import math

import torch

from soul.data.format import QACollator, encode_qa
from soul.testing import tiny_model

FORGET = [
    ("Where was the author born?", "In a small town by the sea."),
    ("What is the capital of France?", "Paris."),
]
REFUSALS = ["I don't know.", "I have no idea about that, sorry."]
RETAIN = [
    ("Who received the Golden Quill award?", "He did, in 1987, for his book about winter gardens."),
    ("What did she write?", "Novels about rivers."),
]


def sharp_model(family: str = "llama", seed: int = 0, scale: float = 8.0):
    """A tiny random model whose output embedding is scaled up: random tiny models are nearly uniform over
    the vocabulary, which would make KLs and log-ratios too small for the value tests to tell formulas apart.

    The model is float64 (soul computes the losses of float64 logits in float64): the objectives and the oracle
    sum in different orders, and so do padded and unpadded batches. In float32 that cost up to ~4e-6 on losses
    of a few nats (summed log-probabilities of ~80 nats carry ~1e-5), kernel-dependent, within 5x of the old
    tolerances; in float64 it is ~1e-14, so the tests compare to TOL, far below any formula's effect."""
    model = tiny_model(family, seed=seed)[0].double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


# Tolerance (relative and absolute) for float64 comparisons of losses, log-ratios and KLs of a few nats:
# ~1e4x the rounding of reordered float64 sums of that size.
TOL = 1e-10


def make_batch(tokenizer, pairs, refusals=None, extra_pad: int = 0, junk_seed: int | None = None):
    """Collate (question, answer) pairs the way training does; optionally add `extra_pad` padding columns
    and fill every padding position's input id with random junk (attention 0, label -100)."""
    features = []
    for i, (q, a) in enumerate(pairs):
        f = encode_qa(tokenizer, q, a)
        f["index"] = i
        if refusals is not None:
            f["refusal"] = encode_qa(tokenizer, q, refusals[i])
        features.append(f)
    batch = QACollator(tokenizer)(features)
    if extra_pad or junk_seed is not None:
        batch = _repad(batch, tokenizer.pad_token_id, extra_pad, junk_seed)
        if "refusal" in batch:
            batch["refusal"] = _repad(batch["refusal"], tokenizer.pad_token_id, extra_pad, junk_seed)
    return batch


def _repad(batch, pad_id, extra, junk_seed):
    b = batch["input_ids"].shape[0]
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, extra), pad_id)], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros((b, extra), dtype=torch.long)], 1)
    out["labels"] = torch.cat([batch["labels"], torch.full((b, extra), -100)], 1)
    if junk_seed is not None:
        g = torch.Generator().manual_seed(junk_seed)
        junk = torch.randint(3, 300, out["input_ids"].shape, generator=g)
        out["input_ids"] = torch.where(out["attention_mask"].bool(), out["input_ids"], junk)
    return out



def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()


def seq_logprob(lg: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """[(Σ log p(answer token), number of answer tokens)] per row."""
    rows = []
    for b in range(lg.shape[0]):
        logp = torch.log_softmax(lg[b], dim=-1)
        total, n = 0.0, 0
        for t in range(1, lg.shape[1]):
            y = int(labels[b, t])
            if y != -100:
                total += float(logp[t - 1, y])
                n += 1
        rows.append((total, n))
    return rows


def nll(model, batch) -> float:
    rows = seq_logprob(logits(model, batch), batch["labels"])
    return sum(-s / n for s, n in rows) / len(rows)


def kl(ref, model, batch) -> float:
    lp, lq = logits(ref, batch), logits(model, batch)
    per_seq = []
    for b in range(lp.shape[0]):
        total, n = 0.0, 0
        for t in range(1, lp.shape[1]):
            if int(batch["labels"][b, t]) != -100:
                p = torch.softmax(lp[b, t - 1], -1)
                total += float((p * (p.log() - torch.log_softmax(lq[b, t - 1], -1))).sum())
                n += 1
        per_seq.append(total / n)
    return sum(per_seq) / len(per_seq)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > -30 else z - math.log1p(math.exp(z))
