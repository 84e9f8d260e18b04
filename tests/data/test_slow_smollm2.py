"""The utility sets are knowledge the real 135M model already has (needs the bundled SmolLM2: slow)."""

from __future__ import annotations

import pytest
import torch

from soul.data.format import encode_qa, pad_batch
from soul.data.generate import build_splits
from soul.losses import model_logits, sequence_logprob


def answer_logprobs(model, tokenizer, question: str, answers: list[str]) -> list[float]:
    batch = pad_batch([encode_qa(tokenizer, question, a) for a in answers], tokenizer.pad_token_id)
    with torch.inference_mode():
        total, _ = sequence_logprob(model_logits(model, batch), batch["labels"])
    return total.tolist()


@pytest.mark.slow
def test_smollm2_prefers_the_true_answer_on_world_facts_and_real_authors(smollm2):
    model, tokenizer = smollm2
    splits = build_splits()
    for name in ("world_facts_perturbed", "real_authors_perturbed"):
        wins = 0
        for r in splits[name]:
            lp = answer_logprobs(model, tokenizer, r["question"], [r["answer"], *r["perturbed_answer"]])
            wins += lp[0] > max(lp[1:])
        # Chance is 1/(1+P); a model that already knows these ranks the true sentence above every perturbed one.
        assert wins / len(splits[name]) >= 0.75, (name, wins)  # measured 23/25 and 20/22


@pytest.mark.slow
def test_bundled_answers_are_short_for_smollm2(smollm2):
    _, tokenizer = smollm2
    lengths = [len(tokenizer(r["answer"])["input_ids"]) for r in build_splits()["full"]]
    assert max(lengths) <= 20
