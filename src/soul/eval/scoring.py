"""Teacher-forced token statistics and greedy generation, batched and one-at-a-time.

Every metric of the evaluation suite is computed from two primitives:

* `score`: for each (prompt, answer) sequence, per answer token t (the closing EOS included, as trained):

  - ``logp[t]  = log p(a_t | prompt, a_<t)``
  - ``hit[t]   = [argmax_v p(v | prompt, a_<t) == a_t]``                       (exact memorisation)
  - ``mu[t]    = E_{v~p(.|ctx)} log p(v|ctx) = Σ_v p(v) log p(v)``             (Min-K%++)
  - ``sigma[t] = sqrt(Σ_v p(v) (log p(v) − mu[t])²)``                         (Min-K%++)

* `generate`: greedy decoding of up to ``max_new_tokens`` tokens after the prompt, cut at the first EOS.

Each exists twice: the fast path (`score_batched`, `generate_batched`: length-bucketed batches under
``torch.inference_mode()``, right padding for scoring, left padding + KV cache for generation) and the
reference path (`score_reference`, `generate_reference`: one sequence at a time, no padding), which is the
correctness oracle for the fast one in tests and the baseline of ``bench/eval_speed.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from soul.data.format import pad_batch
from soul.losses import IGNORE_INDEX


@dataclass
class TokenStats:
    """Per-answer-token statistics of one sequence (plain Python lists, one entry per answer token)."""

    logp: list[float]
    hit: list[bool]
    mu: list[float]
    sigma: list[float]

    @property
    def n(self) -> int:
        return len(self.logp)

    @property
    def mean_nll(self) -> float:
        """Per-token mean negative log-likelihood of the answer: −(1/|a|) Σ_t logp[t]."""
        return -sum(self.logp) / len(self.logp)


Feature = dict[str, list[int]]


def _check_feature(i: int, f: Feature) -> None:
    if not any(label != IGNORE_INDEX for label in f["labels"]):
        raise ValueError(f"sequence {i} to score has no answer tokens (all labels are -100)")


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stats_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logp, hit, mu, sigma for answer positions of `logits` [N, V] (already gathered) and `labels` [N]."""
    logprobs = logits.float().log_softmax(-1)
    logp = logprobs.gather(1, labels[:, None]).squeeze(1)
    hit = logits.argmax(-1) == labels
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    # Two-pass variance Σ p (log p − μ)²: E[log² p] − μ² cancels catastrophically for flat distributions.
    sigma = (probs * (logprobs - mu[:, None]).square()).sum(-1).sqrt()
    return logp, hit, mu, sigma


def score_batched(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                  batch_size: int = 16) -> list[TokenStats]:
    """Token statistics of every feature (``input_ids``/``labels``), in length-bucketed right-padded batches.

    Right padding never changes the answer positions' logits (attention is causal and the pads come after),
    and only the answer positions' logits go through the vocabulary softmax.
    """
    for i, f in enumerate(features):
        _check_feature(i, f)
    device = _model_device(model)
    out: list[TokenStats | None] = [None] * len(features)
    with torch.inference_mode():
        for bucket in length_buckets([len(f["input_ids"]) for f in features], batch_size):
            batch = pad_batch([features[i] for i in bucket], pad_token_id, "right")
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            shift_labels = labels[:, 1:]
            keep = shift_labels != IGNORE_INDEX
            logp, hit, mu, sigma = (t.cpu().tolist() for t in _stats_from_logits(logits[keep], shift_labels[keep]))
            start = 0
            for row, count in zip(bucket, keep.sum(1).tolist()):
                sl = slice(start, start + count)
                out[row] = TokenStats(logp[sl], hit[sl], mu[sl], sigma[sl])
                start += count
    return out  # type: ignore[return-value]


def score_reference(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                    batch_size: int = 1) -> list[TokenStats]:
    """One sequence at a time, no padding, token by token: the oracle for `score_batched`."""
    del pad_token_id, batch_size  # same signature as the batched path; nothing is padded here
    device = _model_device(model)
    out = []
    with torch.inference_mode():
        for i, f in enumerate(features):
            _check_feature(i, f)
            ids = torch.tensor([f["input_ids"]], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            stats = TokenStats([], [], [], [])
            for t in range(1, len(f["labels"])):
                label = f["labels"][t]
                if label == IGNORE_INDEX:
                    continue
                lp, hit, mu, sigma = _stats_from_logits(logits[t - 1:t], torch.tensor([label], device=device))
                stats.logp.append(float(lp))
                stats.hit.append(bool(hit))
                stats.mu.append(float(mu))
                stats.sigma.append(float(sigma))
            out.append(stats)
    return out


def _greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    # A fresh config: the model's own generation_config may ask for sampling or a repetition penalty.
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def cut_at_eos(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    """Tokens before the first EOS (the EOS itself and anything after it are dropped)."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def _decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(cut_at_eos(tokens, tokenizer.eos_token_id), skip_special_tokens=True).strip()


def generate_batched(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                     max_new_tokens: int = 200, batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id `prompts`: left-padded length buckets, KV cache, cut at EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    config = _greedy_config(tokenizer, max_new_tokens)
    out: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for bucket in length_buckets([len(p) for p in prompts], batch_size):
            feats = [{"input_ids": prompts[i], "labels": prompts[i]} for i in bucket]
            batch = pad_batch(feats, tokenizer.pad_token_id, "left")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, i in enumerate(bucket):
                out[i] = _decode(tokenizer, gen[row, ids.shape[1]:].tolist())
    return out


def generate_reference(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                       max_new_tokens: int = 200, batch_size: int = 1) -> list[str]:
    """One prompt at a time, unpadded: the oracle for `generate_batched`."""
    del batch_size
    device = _model_device(model)
    config = _greedy_config(tokenizer, max_new_tokens)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            out.append(_decode(tokenizer, gen[0, ids.shape[1]:].tolist()))
    return out


Scorer = Callable[..., list[TokenStats]]
Generator = Callable[..., list[str]]

IMPLEMENTATIONS: dict[str, tuple[Scorer, Generator]] = {
    "batched": (score_batched, generate_batched),
    "reference": (score_reference, generate_reference),
}


def get_implementation(name: str) -> tuple[Scorer, Generator]:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; expected one of {sorted(IMPLEMENTATIONS)}") from None
