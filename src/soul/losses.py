"""Token-level log-likelihood helpers shared by objectives, optimizers and evaluation.

Batches are dicts with ``input_ids`` and ``attention_mask`` of shape [B, T] and ``labels`` where every
position that must not count (prompt, padding) is -100. Labels are *not* pre-shifted: the logit at
position t predicts the label at position t + 1, as in Hugging Face causal LMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` (logits, gradients) in at least float32 for softmaxes and sums: half precision is upcast, float64
    stays float64 -- a float64 model is trained and scored in float64 throughout, which the tests use as a
    reference free of float32's summation-order rounding (a plain ``.float()`` would round it to float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next-token label and the mask of positions that count.

    Returns ``(logp, mask)``, both [B, T-1]; ``logp`` is 0 where ``mask`` is False.
    """
    shift_logits = upcast(logits[:, :-1, :])
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0)
    logp = -F.cross_entropy(shift_logits.transpose(1, 2), safe, reduction="none")
    return logp * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log p(answer | prompt) and the number of answer tokens, both [B]."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(-1), mask.sum(-1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token NLL over answer tokens, [B]. A sequence without answer tokens is an error."""
    total, count = sequence_logprob(logits, labels)
    if bool((count == 0).any()):
        raise ValueError("a sequence in the batch has no answer tokens (all labels are -100)")
    return -total / count


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean answer-token NLL (padding never counts)."""
    return sequence_nll(model_logits(model, batch), batch["labels"]).mean()
