"""The attacks on tiny trained models: relearning against the retain baseline, quantization noise bounds,
the paraphrase probe, reference reuse, report columns and plot."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import soul.attack as attack
from soul.attack.metrics import forget_metrics
from soul.attack.quantization import quantized_copy
from soul.attack.report import attack_columns, recovery_plot, result_bits, row_values
from soul.eval.scoring import score_batched
from tests.attack.conftest import DATA, FACTS


def _refs(models):
    tok = models["tokenizer"]
    return {"target": (models["target"], tok), "retain": (models["retain"], tok)}


def test_relearning_recovers_unlearned_facts_more_than_learning_from_scratch(toy_models):
    tok, unlearned = toy_models["tokenizer"], toy_models["unlearned"]
    weights = {k: v.clone() for k, v in unlearned.state_dict().items()}
    res = attack.relearn(unlearned, tok, data=DATA, forget_split="forget10", references=_refs(toy_models),
                         steps=10, lr=3e-3, batch_size=4, generate=False)
    rel = res["relearn"]
    held = {FACTS[i]["author"] for i in rel["split"]["heldout"]}
    assert held and not held & {FACTS[i]["author"] for i in rel["split"]["relearn"]}
    m = rel["models"]
    assert m["unlearned"]["before"]["prob"] < 0.5 * m["target"]["before"]["prob"]  # the unlearning did work
    # The unlearned model gets the held-out authors back; the retain model, which never saw them, does not.
    assert rel["recovery"]["prob"] > 0.25, rel
    assert rel["recovery"]["prob"] > rel["baseline_recovery"]["prob"] + 0.2, rel
    assert rel["excess_recovery"]["prob"] == pytest.approx(rel["recovery"]["prob"] - rel["baseline_recovery"]["prob"])
    assert rel["recovery"]["rouge"] is None  # no generation asked
    for k, v in unlearned.state_dict().items():  # the attack worked on a copy
        assert torch.equal(v, weights[k]), k


def _answer_logprobs(model, tok) -> torch.Tensor:
    from soul.data.format import encode_qa

    feats = [encode_qa(tok, r["question"], r["answer"]) for r in FACTS]
    return torch.tensor([lp for s in score_batched(model, feats, tok.pad_token_id) for lp in s.logp])


def test_quantization_changes_logprobs_little_at_8_bits_and_much_more_at_2(toy_models):
    tok, target = toy_models["tokenizer"], toy_models["target"]
    base = _answer_logprobs(target, tok)
    delta = {}
    for bits in (8, 4, 2):
        quantized, _ = quantized_copy(target, bits, group_size=16)
        delta[bits] = (_answer_logprobs(quantized, tok) - base).abs()
    assert delta[8].max() < 0.05, delta[8].max()
    assert delta[2].mean() > 20 * delta[8].mean(), (delta[2].mean(), delta[8].mean())
    assert delta[8].mean() < delta[4].mean() < delta[2].mean()


def test_quantize_attack_reports_recovery_and_target_noise(toy_models, tmp_path):
    tok = toy_models["tokenizer"]
    res = attack.quantize(toy_models["unlearned"], tok, data=DATA, references={"target": (toy_models["target"], tok)},
                          bits=[8, 2], group_size=16, max_new_tokens=6, out=tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text()) == json.loads(json.dumps(res))
    assert result_bits(res) == [8, 2]
    q8 = res["quantize"]["by_bits"]["8"]
    # 8 bits: the target barely moves (noise well under the unlearning gap), nothing is recovered.
    assert q8["target_shift"]["prob"] < 0.02 and abs(q8["recovery"]["prob"]) < 0.05, q8
    q2 = res["quantize"]["by_bits"]["2"]
    assert q2["target_shift"]["prob"] > q8["target_shift"]["prob"]
    assert q2["quantized"]["relative_error"] > 10 * q8["quantized"]["relative_error"]
    m = q2["models"]
    expected = (m["unlearned"]["after"]["prob"] - m["unlearned"]["before"]["prob"]) / (
        m["target"]["before"]["prob"] - m["unlearned"]["before"]["prob"])
    assert q2["recovery"]["prob"] == pytest.approx(expected)
    assert "relearn" not in res and "paraphrase" not in res


def test_paraphrase_probe_scores_the_reworded_questions(toy_models):
    tok, unlearned = toy_models["tokenizer"], toy_models["unlearned"]
    forget = copy.deepcopy(DATA["forget10"])
    for r in forget[::2]:
        del r["paraphrased_question"]  # only records with a paraphrase are probed
    res = attack.paraphrase(unlearned, tok, data={"forget10": forget}, references=_refs(toy_models),
                            max_new_tokens=6)
    para = res["paraphrase"]
    assert para["n"] == 4 and para["indices"] == [1, 3, 5, 7]
    reworded = [{**forget[i], "question": forget[i]["paraphrased_question"]} for i in para["indices"]]
    oracle = forget_metrics(unlearned, tok, reworded, max_new_tokens=6)
    got = para["models"]["unlearned"]["paraphrased"]
    assert got["prob"] == pytest.approx(oracle["prob"]) and got["rouge"] == pytest.approx(oracle["rouge"])
    orig = para["models"]["unlearned"]["original"]["prob"]
    assert orig != pytest.approx(got["prob"])  # another question, other numbers
    target_para = para["models"]["target"]["paraphrased"]["prob"]
    assert para["recovery"]["prob"] == pytest.approx((got["prob"] - orig) / (target_para - orig))
    with pytest.raises(ValueError, match="paraphrased_question"):
        attack.paraphrase(unlearned, tok, data={"forget10": [forget[0], forget[2]]})


def test_references_computed_once_give_the_same_result(toy_models):
    tok = toy_models["tokenizer"]
    cfg = {"relearn": {"steps": 2, "lr": 3e-3, "batch_size": 4}, "paraphrase": None, "generate": False}
    refs = attack.attack_references(_refs(toy_models), tok, attacks_cfg=cfg, data=DATA)
    a = attack.run_attacks(toy_models["unlearned"], tok, attacks_cfg=cfg, data=DATA, reference_results=refs)
    b = attack.run_attacks(toy_models["unlearned"], tok, attacks_cfg=cfg, data=DATA, references=_refs(toy_models))
    for key in ("relearn", "paraphrase"):
        assert a[key]["models"] == b[key]["models"] and a[key]["recovery"] == b[key]["recovery"]
    with pytest.raises(ValueError, match="reference_results"):
        attack.run_attacks(toy_models["unlearned"], tok, attacks_cfg={**cfg, "max_questions": 2}, data=DATA,
                           reference_results=refs)
    # without references: the attacked model's numbers, no recovery, and a note saying why
    c = attack.run_attacks(toy_models["unlearned"], tok, attacks_cfg=cfg, data=DATA)
    assert c["relearn"]["models"]["unlearned"] == a["relearn"]["models"]["unlearned"]
    assert c["relearn"]["recovery"]["prob"] is None and any("no target" in n for n in c["relearn"]["notes"])


def test_columns_rows_and_recovery_plot():
    result = {
        "relearn": {"recovery": {"prob": 0.6, "rouge": 0.5}, "baseline_recovery": {"prob": 0.1, "rouge": 0.0},
                    "excess_recovery": {"prob": 0.5, "rouge": 0.5}},
        "quantize": {"by_bits": {"4": {"recovery": {"prob": 0.2, "rouge": None},
                                       "target_shift": {"prob": 0.01, "rouge": 0.0}}}},
        "paraphrase": {"recovery": {"prob": -0.1, "rouge": 0.3}},
    }
    keys = {c.key for c in attack_columns(result_bits(result))}
    rows = []
    for role in ("target", "retain", "unlearned"):
        values = row_values(result, role)
        assert set(values) <= keys
        rows.append({"role": role, **values})
    target, retain, unl = rows
    assert unl["relearn_recovery_prob"] == 0.6 and unl["quant4_recovery_prob"] == 0.2
    assert retain["relearn_recovery_prob"] == 0.1 and retain["relearn_excess_prob"] is None
    assert target["relearn_recovery_prob"] is None and target["quant4_recovery_prob"] == 0.01
    grid = [*rows[:2]] + [{**unl, "objective": o, "optimizer": p, "relearn_recovery_prob": 0.2 * i}
                          for i, (o, p) in enumerate([("graddiff", "adamw"), ("graddiff", "sophia"), ("npo", "sophia")])]
    grid.append({**unl, "role": "influence", "objective": None, "optimizer": None})
    png = recovery_plot(grid)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    with pytest.raises(ValueError, match="no prob recovery"):
        recovery_plot([{"role": "unlearned", "objective": "ga", "optimizer": "adamw"}])
    with pytest.raises(ValueError, match="role"):
        row_values(result, "influence")
