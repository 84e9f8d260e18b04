"""Only answer tokens count: padding (extra columns, junk ids under a zero mask) and the logits at prompt or
padding positions never change any objective's loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from soul.objectives import OBJECTIVES, build_objective

from .objectives_helpers import FORGET, REFUSALS, RETAIN, TOL, make_batch, sharp_model


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_extra_padding_and_junk_pad_ids_do_not_change_the_loss(name, family, tokenizer):
    model, ref = sharp_model(family), sharp_model(family, seed=1)
    obj = build_objective(name)
    base = obj(model, make_batch(tokenizer, FORGET, REFUSALS), make_batch(tokenizer, RETAIN), ref).loss.item()
    padded_f = make_batch(tokenizer, FORGET, REFUSALS, extra_pad=7, junk_seed=1)
    padded_r = make_batch(tokenizer, RETAIN, extra_pad=3, junk_seed=2)
    assert obj(model, padded_f, padded_r, ref).loss.item() == pytest.approx(base, rel=TOL, abs=TOL)


class GarbageOutsideAnswers(torch.nn.Module):
    """Wraps a model; replaces the logits at every position that does not predict an answer token (prompt,
    padding, the last position) with large random numbers."""

    def __init__(self, model: torch.nn.Module, batches: list[dict]) -> None:
        super().__init__()
        self.model = model
        self.labels = {b["input_ids"].data_ptr(): b["labels"] for b in batches}
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, input_ids, attention_mask):
        lg = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        labels = self.labels[input_ids.data_ptr()]
        predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
        predicts_answer[:, :-1] = labels[:, 1:] != -100
        garbage = torch.randn(lg.shape, generator=self.gen) * 30
        return SimpleNamespace(logits=torch.where(predicts_answer[..., None], lg, garbage))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_logits_at_prompt_and_padding_positions_do_not_count(name, tokenizer):
    model, ref = sharp_model(), sharp_model(seed=1)
    forget, retain = make_batch(tokenizer, FORGET, REFUSALS), make_batch(tokenizer, RETAIN)
    everything = [forget, forget["refusal"], retain]
    obj = build_objective(name)
    clean = obj(model, forget, retain, ref)
    noisy = obj(GarbageOutsideAnswers(model, everything), forget, retain, GarbageOutsideAnswers(ref, everything))
    assert noisy.loss.item() == pytest.approx(clean.loss.item(), rel=TOL, abs=TOL)
    assert noisy.parts == pytest.approx(clean.parts, rel=TOL, abs=TOL)
