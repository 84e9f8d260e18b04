"""Building blocks shared by the objectives: forwards, answer log-likelihoods, answer NLL, answer-token KL.

All quantities count answer tokens only: a position counts when its (unshifted) label is not -100, so
prompt and padding never enter a loss (see `soul.losses`). Every per-sequence quantity is reduced per
sequence first and then averaged over the batch, so a long answer does not outweigh a short one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from soul.losses import IGNORE_INDEX, sequence_logprob, upcast


def logits_of(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """[B, T, V] logits of a causal LM on a batch (extra keys such as ``index``/``refusal`` are not passed)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_logits(ref_model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Logits of the frozen reference model, computed without building a graph."""
    with torch.no_grad():
        return logits_of(ref_model, batch).detach()


def _check_answers(count: torch.Tensor, role: str) -> None:
    """A sequence without answer tokens has nothing to raise or lower: an error naming its rows."""
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{role}: row(s) {empty} have no answer tokens (every label after position 0 is -100)")


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log p(answer | prompt), [B], and the answer length |y| in tokens, [B].

    A sequence without answer tokens has no likelihood to raise or lower; it is an error, naming its row.
    """
    total, count = sequence_logprob(logits, labels.to(logits.device))
    _check_answers(count, role)
    return total, count


def mean_answer_nll(logits: torch.Tensor, labels: torch.Tensor, role: str) -> torch.Tensor:
    """NLL(batch) = mean over sequences of −(1/|y|)·Σ_t log p(y_t | x, y_<t)."""
    total, count = answer_logprob(logits, labels, role)
    return (-total / count).mean()


def retain_nll_term(model: torch.nn.Module, retain_batch: Mapping[str, Any], parts: dict[str, float]) -> torch.Tensor:
    """NLL(retain) of `model`, the retain term every retain-regularised objective adds (times α); recorded
    in `parts` as ``retain_nll``."""
    retain_nll = mean_answer_nll(logits_of(model, retain_batch), retain_batch["labels"], "retain batch")
    parts["retain_nll"] = retain_nll.item()
    return retain_nll


def mean_answer_kl(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, role: str) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) on answer tokens: Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v)) at every position that
    predicts an answer token, averaged over a sequence's answer positions, then over the batch.
    """
    labels = labels.to(logits.device)
    mask = labels[:, 1:] != IGNORE_INDEX
    count = mask.sum(-1)
    _check_answers(count, role)
    log_q = F.log_softmax(upcast(logits[:, :-1, :]), dim=-1)
    log_p = F.log_softmax(upcast(ref_logits[:, :-1, :].to(logits.device)), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token.masked_fill(~mask, 0.0).sum(-1) / count).mean()
