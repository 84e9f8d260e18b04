"""Forget quality on the real SmolLM2 with the bundled benchmark (slow: minutes on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


def test_forget_quality_of_model_finetuned_on_forget_set_is_low(smollm2):
    data = pytest.importorskip("soul.data", reason="needs soul.data (bundled benchmark generator and loaders)")
    from soul.data.format import QACollator, encode_qa
    from soul.eval import evaluate, reference_stats

    base, tok = smollm2
    forget = data.load_split("bundled", "forget10_perturbed")
    holdout = data.load_split("bundled", "holdout10")
    # The bundled authors are invented, so the base model was never trained on the forget set: it is a retain
    # model in TOFU's sense for this check (a model fine-tuned on the retain split would be one too).
    reference = reference_stats(base, tok, forget, holdout, batch_size=8)
    same = evaluate(base, tok, {"forget": forget}, retain_reference=reference, generate=False, batch_size=8)
    assert same["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)

    # Fine-tune a copy on the forget set (plain AdamW loop, so this test needs nothing from soul.train).
    model = copy.deepcopy(base).train()
    feats = [encode_qa(tok, r["question"], r["answer"]) for r in forget]
    collate = QACollator(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for chunk in torch.randperm(len(feats), generator=gen).split(4):
            batch = collate([feats[i] for i in chunk.tolist()])
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    res = evaluate(model, tok, {"forget": forget}, holdout=holdout, retain_reference=reference, generate=False,
                   batch_size=8)
    assert res["forget_quality"]["agg_value"] < 0.05
    assert res["mia_loss"]["agg_value"] > reference["mia_loss"]["agg_value"]
