"""Prompt formatting and tokenisation of question-answer records — the one place training and evaluation
agree on what the model sees.

Formats:

* ``chat`` — the tokenizer's chat template: one user turn holding the question, then the generation prompt;
  the answer follows, closed by the EOS token (for ChatML models ``<|im_end|>``).
* ``plain`` — ``"Question: {question}\\nAnswer:"`` and the answer as ``" {answer}"`` + EOS, for tokenizers
  without a chat template (and for short prompts on CPU).
* ``raw`` — raw text continuation (copyright / WMDP-style text forgetting): the prompt is the question text
  as is (with the tokenizer's usual leading special tokens, e.g. BOS) and the answer is ``" {answer}"``
  with **no** EOS, since the answer is the middle of a running text, not the end of a reply.
* ``auto`` (default) — ``chat`` when the tokenizer has a chat template, else ``plain``.

The prompt and the answer are tokenised separately and concatenated, so the answer's tokens are the same
whether the model is scored (teacher forcing) or generates after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from soul.losses import IGNORE_INDEX

PROMPT_FORMATS = ("auto", "chat", "plain", "raw")


def resolve_format(tokenizer, prompt_format: str = "auto") -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat' but the tokenizer has no chat template; use 'plain'")
    return prompt_format


def prompt_ids(tokenizer, question: str, prompt_format: str = "auto") -> list[int]:
    """Token ids of the prompt for `question`, ending where the answer starts."""
    fmt = resolve_format(tokenizer, prompt_format)
    if fmt == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if fmt == "raw":
        return tokenizer(question, add_special_tokens=True)["input_ids"]
    return tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer, answer: str, prompt_format: str = "auto") -> list[int]:
    """Token ids of the answer, closed by EOS (except in the ``raw`` format: a continuation of running text)."""
    fmt = resolve_format(tokenizer, prompt_format)
    text = answer if fmt == "chat" else f" {answer}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if fmt == "raw" else [*ids, tokenizer.eos_token_id]


def encode_qa(
    tokenizer, question: str, answer: str, *, prompt_format: str = "auto", max_length: int | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (prompt masked with -100) for one question-answer pair.

    Truncation, when `max_length` is given, cuts the end of the answer; at least one answer token is kept.
    """
    p = prompt_ids(tokenizer, question, prompt_format)
    a = answer_ids(tokenizer, answer, prompt_format)
    if max_length is not None and len(p) + len(a) > max_length:
        keep = max(1, max_length - len(p))
        a = a[:keep]
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


def pad_batch(features: Sequence[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad `input_ids`/`labels` lists to one tensor batch with an attention mask."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[row, sl] = torch.tensor(f["labels"], dtype=torch.long)
        mask[row, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class QACollator:
    """Collate encoded records into a right-padded batch.

    Each feature is ``{"input_ids", "labels", "index", optional "refusal": {"input_ids", "labels"}}``;
    the batch carries ``index`` and, when present, the nested ``refusal`` batch (own padding and mask).
    """

    def __init__(self, tokenizer, padding_side: str = "right") -> None:
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = pad_batch(features, self.pad_token_id, self.padding_side)
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if "refusal" in features[0]:
            batch["refusal"] = pad_batch([f["refusal"] for f in features], self.pad_token_id, self.padding_side)
        return batch
