"""The attacks' parts: author split, recovery, the quantizer, forget metrics against `soul.eval.evaluate`,
configuration checks."""

from __future__ import annotations

import pytest
import torch

from soul.attack.metrics import forget_metrics, recovery
from soul.attack.quantization import quantize_dequantize, quantize_model_
from soul.attack.relearning import split_relearn
from soul.attack.run import normalize_config
from soul.testing import tiny_model
from tests.attack.conftest import DATA, FACTS


# --- split ---------------------------------------------------------------------------------------------------
def test_split_by_author_keeps_authors_whole_and_is_deterministic():
    s = split_relearn(FACTS, heldout_fraction=0.5, seed=3)
    assert s.by == "author" and s.groups == 8 and len(s.heldout_groups) == 4
    assert sorted(s.relearn + s.heldout) == list(range(len(FACTS)))
    held_authors = {FACTS[i]["author"] for i in s.heldout}
    assert held_authors == set(s.heldout_groups)
    assert not held_authors & {FACTS[i]["author"] for i in s.relearn}
    assert split_relearn(FACTS, heldout_fraction=0.5, seed=3) == s
    others = {tuple(split_relearn(FACTS, seed=k).heldout) for k in range(6)}
    assert len(others) > 1  # the seed picks the authors


def test_split_without_author_uses_blocks_and_keeps_one_to_relearn():
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(45)]
    s = split_relearn(records, questions_per_author=20, heldout_fraction=0.5, seed=0)
    assert s.by == "block" and s.groups == 3  # 20 + 20 + a shorter last block of 5
    blocks = [set(range(0, 20)), set(range(20, 40)), set(range(40, 45))]
    assert all(b <= set(s.heldout) or b <= set(s.relearn) for b in blocks)
    s2 = split_relearn(records[:40], questions_per_author=20, heldout_fraction=0.9)
    assert len(s2.relearn) == 20 and len(s2.heldout) == 20  # at least one block is left to relearn
    # one record without an author: the whole split falls back to blocks
    mixed = [dict(r) for r in FACTS]
    del mixed[3]["author"]
    assert split_relearn(mixed, questions_per_author=2).by == "block"


def test_split_refuses_a_single_author_and_bad_options():
    with pytest.raises(ValueError, match="at least two authors"):
        split_relearn(FACTS[:2])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_relearn(FACTS, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="questions_per_author"):
        split_relearn(FACTS, questions_per_author=0)


# --- recovery ------------------------------------------------------------------------------------------------
def test_recovery_formula_and_guard():
    assert recovery(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert recovery(0.5, 0.1, 0.5) == pytest.approx(1.0)
    assert recovery(0.05, 0.1, 0.5) == pytest.approx(-0.125)
    assert recovery(0.2, 0.6, 0.2) == pytest.approx(1.0)  # metrics that fall towards the target work too
    assert recovery(0.3, 0.1, 0.1 + 1e-8) is None  # no gap to recover
    assert recovery(None, 0.1, 0.5) is None and recovery(0.3, 0.1, float("nan")) is None


def test_recovery_of_a_gap_too_small_to_measure_is_none_with_a_note():
    """A target–unlearned gap of 2e-6 on metrics near 0.4 is noise: it gave a recovery of 1.5e5 (the absolute
    epsilon was 1e-6). Relative to the metric's size it is too small to measure."""
    from soul.attack.metrics import recoveries

    assert recovery(0.4, 0.1, 0.1 + 2e-6) is None
    assert recovery(0.4, 0.1, 0.1 + 2e-4) == pytest.approx(1500.0)  # 0.2 % of the metric: measured
    notes: list[str] = []
    out = recoveries({"prob": 0.4}, {"prob": 0.1}, {"prob": 0.1 + 2e-6}, notes, "relearn")
    assert out["prob"] is None and any("gap too small to measure" in n for n in notes)


# --- quantizer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_dequantize_levels_and_error(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    q = quantize_dequantize(w, bits, group_size=16, symmetric=symmetric)  # groups 16, 16 and a last one of 8
    assert q.shape == w.shape and q.dtype == w.dtype
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        for row in range(6):
            g, gq = w[row, lo:hi], q[row, lo:hi]
            assert gq.unique().numel() <= 2**bits
            if symmetric:
                step = g.abs().max() / (2 ** (bits - 1) - 1)
            else:
                step = (g.max() - g.min()) / (2**bits - 1)
            assert (gq - g).abs().max() <= step / 2 + 1e-5  # round to nearest: at most half a step off
    assert torch.allclose(quantize_dequantize(q, bits, 16, symmetric=symmetric), q, atol=1e-5)  # idempotent


def test_quantize_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        quantize_dequantize(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="group_size"):
        quantize_dequantize(torch.ones(2, 2), 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_dequantize(torch.ones(2, 2, 2), 4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantize_model_touches_linear_layers_only_by_default(family):
    model, _ = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embed = model.get_input_embeddings().weight.detach().clone()
    info = quantize_model_(model, bits=3, group_size=8)
    after = model.state_dict()
    assert torch.equal(model.get_input_embeddings().weight, embed)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    assert not any("emb" in k or "wte" in k or "wpe" in k or "lm_head" in k for k in changed), changed
    assert info["tensors"] == len(changed) and 0 < info["relative_error"] < 1
    # GPT-2's Conv1D keeps [in, out]: each output column is grouped along its inputs
    if family == "gpt2":
        w = before["transformer.h.0.mlp.c_fc.weight"]
        expected = quantize_dequantize(w.t(), 3, 8).t()
        assert torch.equal(after["transformer.h.0.mlp.c_fc.weight"], expected)
    model2, _ = tiny_model(family)
    quantize_model_(model2, bits=3, group_size=8, include_embeddings=True)
    assert not torch.equal(model2.get_input_embeddings().weight, embed)


# --- forget metrics -----------------------------------------------------------------------------------------
def test_forget_metrics_match_soul_eval(llama):
    from soul.eval import evaluate

    llama, tokenizer = llama

    records = DATA["forget10"]
    ours = forget_metrics(llama, tokenizer, records, max_new_tokens=6, batch_size=4)
    ref = evaluate(llama, tokenizer, {"forget": records}, max_new_tokens=6, batch_size=4)
    assert ours["prob"] == pytest.approx(ref["forget_Q_A_Prob"]["agg_value"], rel=1e-6)
    assert ours["rouge"] == pytest.approx(ref["forget_Q_A_ROUGE"]["agg_value"], rel=1e-6)
    assert ours["truth_ratio"] == pytest.approx(ref["forget_truth_ratio"]["agg_value"], rel=1e-6)
    bare = [{"question": r["question"], "answer": r["answer"]} for r in records]
    no_gen = forget_metrics(llama, tokenizer, bare, generate=False)
    assert no_gen["rouge"] is None and no_gen["truth_ratio"] is None
    # Another batch size (the default, not 4): float32 sums in another order. prob = mean of exp(-nll), so its
    # relative error is the absolute error of a mean token NLL (<= log|vocab| ~ 6 nats here), a few float32 eps of
    # it: 16 * eps32 * 8 nats = 1.5e-5 bounds that with room (measured: 1.4e-8).
    assert no_gen["prob"] == pytest.approx(ours["prob"], rel=16 * torch.finfo(torch.float32).eps * 8)
    with pytest.raises(ValueError, match="record 1: field 'answer'"):
        forget_metrics(llama, tokenizer, [bare[0], {"question": "q", "answer": ""}])
    # the attacks score in the evaluation's precision: bf16 autocast matches soul eval's bf16 numbers
    ours16 = forget_metrics(llama, tokenizer, records, max_new_tokens=6, batch_size=4, mixed_precision="bf16")
    ref16 = evaluate(llama, tokenizer, {"forget": records}, max_new_tokens=6, batch_size=4, mixed_precision="bf16")
    assert ours16["prob"] == pytest.approx(ref16["forget_Q_A_Prob"]["agg_value"], rel=1e-6)
    assert ours16["truth_ratio"] == pytest.approx(ref16["forget_truth_ratio"]["agg_value"], rel=1e-6)
    assert ours16["prob"] != ours["prob"]


# --- configuration -------------------------------------------------------------------------------------------
def test_normalize_config_defaults_and_errors():
    cfg = normalize_config(["relearn", "paraphrase"])
    assert cfg["relearn"]["steps"] == 10 and cfg["paraphrase"] == {} and "quantize" not in cfg
    assert normalize_config({"quantize": {"bits": 8}})["quantize"]["bits"] == [8]
    assert normalize_config({"relearn": {"lr": "3e-4"}})["relearn"]["lr"] == pytest.approx(3e-4)
    bad = [({"relearn": {"steps": 0}}, "attacks.relearn.steps"), ({"quantize": {"bits": [4, 9]}}, "bits"),
           ({"relearn": {"optimiser": "adamw"}}, "unknown option"), ({"jailbreak": {}}, "unknown key"),
           ({"relearn": {"optimizer": "adam"}}, "optimizer"), ({}, "no attack"),
           ({"relearn": {"heldout_fraction": 0}}, "heldout_fraction"), ({"relearn": None, "generate": "yes"},
                                                                        "generate"),
           ({"relearn": {"train_options": {"lr": 1.0}}}, "set by the attack"),
           ({"relearn": {"train_options": {"nonsense": 1}}}, "unknown training option")]
    for cfg, message in bad:
        with pytest.raises(ValueError, match=message):
            normalize_config(cfg)


def test_several_influence_rows_keep_a_bar_each_and_a_best_mark_each():
    """With influence rows for GNB, K-FAC and EK-FAC in one report, the robustness figure gives each its own bar
    (one shared "one-shot" bar would show only one of them) and the ★ is chosen per row, as per optimizer."""
    from soul.attack.report import bar_rows
    from soul.report.write import best_marks

    rows = [{"name": "target", "role": "target", "forget_quality": 0.01, "model_utility": 0.5},
            {"name": "graddiff-adamw", "role": "unlearned", "objective": "graddiff", "optimizer": "adamw",
             "forget_quality": 0.2, "model_utility": 0.49}]
    rows += [{"name": n, "role": "influence", "forget_quality": fq, "model_utility": 0.49}
             for n, fq in (("influence", 0.3), ("influence-kfac", 0.1), ("influence-ekfac", 0.05))]
    bars = bar_rows(rows)
    assert [(r["objective"], r["optimizer"]) for r in bars] == [
        ("graddiff", "adamw"), ("influence", "one-shot GNB"), ("influence", "one-shot K-FAC"),
        ("influence", "one-shot EK-FAC")]
    assert set(best_marks(rows)) == {"graddiff-adamw", "influence", "influence-kfac", "influence-ekfac"}
    # one influence row keeps the figure it always had
    assert [r["optimizer"] for r in bar_rows(rows[:3])] == ["adamw", "one-shot"]
