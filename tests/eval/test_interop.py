"""Retain references from open-unlearning's TOFU_EVAL.json and TOFU's eval_log_forget.json, and soul's results
written in open-unlearning's layout."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import ks_2samp

from soul.eval import evaluate, reference_stats
from soul.eval.interop import (
    normalise_reference,
    reference_format,
    tofu_truth_ratios,
    write_open_unlearning,
)
from soul.testing import tiny_model
from tests.eval.conftest import make_records


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", seed=1), tiny_model("llama", seed=2)


@pytest.fixture(scope="module")
def forget():
    return make_records(8, seed=3)


def tofu_log(ratios: dict[str, float], as_list: bool = False) -> dict:
    """A TOFU eval_log_forget.json whose losses give `ratios`: L_para = 0.7 + i/10 and five perturbed losses
    spread around the mean that TR = exp(L_para - mean L_pert) asks for."""
    para, pert = {}, {}
    for i, (idx, tr) in enumerate(sorted(ratios.items(), key=lambda kv: int(kv[0]))):
        para[idx] = 0.7 + i / 10
        mean = para[idx] - math.log(tr)
        pert[idx] = [mean - 0.4, mean - 0.1, mean, mean + 0.2, mean + 0.3]
    if as_list:
        para, pert = list(para.values()), list(pert.values())
    return {"avg_gt_loss": {k: 1.0 for k in ratios}, "avg_paraphrased_loss": para, "average_perturb_loss": pert,
            "rougeL_recall": {k: 0.5 for k in ratios}}


def test_tofu_truth_ratio_formula():
    log = {"avg_paraphrased_loss": {"0": 1.0, "1": 2.0}, "average_perturb_loss": {"0": [2.0, 3.0], "1": [1.0, 2.0]}}
    assert tofu_truth_ratios(log) == pytest.approx({"0": math.exp(-1.5), "1": math.exp(0.5)})
    # TOFU's aggregate script tests the reciprocal; the KS p-value does not change under it.
    a, b = [0.2, 0.5, 0.9, 1.3, 2.0], [0.4, 0.45, 1.1, 1.7, 3.0, 0.1]
    assert ks_2samp(a, b).pvalue == pytest.approx(ks_2samp([1 / x for x in a], [1 / x for x in b]).pvalue)


def test_forget_quality_from_each_reference_format_equals_the_direct_one(models, forget, tmp_path):
    (retain_model, tok), (model, _) = models
    ref = reference_stats(retain_model, tok, forget, holdout=forget[:4])
    ratios = {k: v["score"] for k, v in ref["forget_truth_ratio"]["value_by_index"].items()}
    direct = {"forget_truth_ratio": {"agg_value": None, "value_by_index": {k: {"score": v} for k, v in ratios.items()}}}
    files = {
        "open-unlearning": {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": direct["forget_truth_ratio"]
                                                   ["value_by_index"]},
                            "mia_min_k": {"agg_value": ref["mia_min_k"]["agg_value"], "auc": 0.5}},
        "tofu": tofu_log(ratios),
        "tofu-list": tofu_log(ratios, as_list=True),
        "tofu-ratio-only": {"truth_ratio": ratios, "avg_gt_loss": {k: 1.0 for k in ratios}},
        "tofu-aggregated": {"eval_log_forget.json": tofu_log(ratios), "eval_real_author_wo_options.json": {}},
    }
    want = evaluate(model, tok, {"forget": forget}, retain_reference=direct, generate=False)["forget_quality"]
    assert want["agg_value"] is not None and 0 < want["agg_value"] <= 1
    for name, content in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        got = evaluate(model, tok, {"forget": forget}, retain_reference=path, generate=False)
        assert got["forget_quality"]["agg_value"] == pytest.approx(want["agg_value"], rel=1e-9), name
        assert got["forget_quality"]["ks_statistic"] == pytest.approx(want["ks_statistic"], rel=1e-9), name
    assert reference_format(files["open-unlearning"]) == "open-unlearning"
    assert reference_format(files["tofu-aggregated"]) == "tofu"
    assert reference_format(ref) == "soul"


def test_open_unlearning_reference_gives_privleak(models, forget, tmp_path):
    (retain_model, tok), (model, _) = models
    ref = reference_stats(retain_model, tok, forget, holdout=forget[4:])
    ou = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": ref["forget_truth_ratio"]["value_by_index"]},
          "mia_min_k": {"agg_value": ref["mia_min_k"]["agg_value"]}}
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(ou))
    a = evaluate(model, tok, {"forget": forget}, holdout=forget[4:], retain_reference=ref, generate=False)
    b = evaluate(model, tok, {"forget": forget}, holdout=forget[4:], retain_reference=tmp_path / "TOFU_EVAL.json",
                 generate=False)
    assert b["privleak"]["agg_value"] == pytest.approx(a["privleak"]["agg_value"])
    assert b["forget_quality"]["agg_value"] == pytest.approx(a["forget_quality"]["agg_value"])


@pytest.mark.parametrize(("content", "message"), [
    ({"rougeL_recall": {}, "avg_gt_loss": {}}, r"bad\.json: not a retain reference: needs 'forget_truth_ratio\."
     r"value_by_index'.*'avg_paraphrased_loss' \+ 'average_perturb_loss'.*has: avg_gt_loss, rougeL_recall"),
    ({"avg_paraphrased_loss": {"0": 1.0}, "average_perturb_loss": {"1": [1.0]}}, "cover different question indices"),
    ({"avg_paraphrased_loss": {"0": 1.0}, "average_perturb_loss": {"0": []}}, r"average_perturb_loss\['0'\] must be a "
     "non-empty list"),
    ({"truth_ratio": {"0": "high"}}, r"truth_ratio\['0'\] must be a finite number"),
    ({"forget_truth_ratio": {"value_by_index": {"3": {"score": None}}}},
     r"forget_truth_ratio\.value_by_index\['3'\] must be a finite number"),
])
def test_reference_errors_name_the_file_and_the_key(tmp_path, content, message):
    from soul.eval.results import load_reference

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_reference(path)


OU_ENTRY_KEYS = {
    "forget_Q_A_Prob": {"prob", "avg_loss"}, "retain_Q_A_Prob": {"prob", "avg_loss"},
    "ra_Q_A_Prob_normalised": {"prob"}, "wf_Q_A_Prob_normalised": {"prob"},
    **{f"{r}_Q_A_ROUGE": {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
       for r in ("forget", "retain", "ra", "wf")},
    "forget_truth_ratio": {"score"}, "retain_Truth_Ratio": {"score"}, "ra_Truth_Ratio": {"score"},
    "wf_Truth_Ratio": {"score"}, "exact_memorization": {"score"}, "extraction_strength": {"score"},
}


def test_open_unlearning_layout_key_names_and_shape(models, record_factory, tmp_path):
    (retain_model, tok), (model, _) = models
    recs = record_factory(6, seed=5)
    splits = {"forget": recs[:3], "retain": recs[3:], "real_authors": recs[:2], "world_facts": recs[2:4]}
    ref = reference_stats(retain_model, tok, recs[:3], holdout=recs[3:])
    results = evaluate(model, tok, splits, holdout=recs[3:], retain_reference=ref, max_new_tokens=3)
    eval_path, summary_path = write_open_unlearning(results, tmp_path / "ou")
    evals, summary = json.loads(eval_path.read_text()), json.loads(summary_path.read_text())
    assert (eval_path.name, summary_path.name) == ("TOFU_EVAL.json", "TOFU_SUMMARY.json")
    assert set(evals) == set(OU_ENTRY_KEYS) | {"forget_quality", "model_utility", "privleak", "mia_loss", "mia_zlib",
                                               "mia_min_k", "mia_min_k_plus_plus"}
    assert summary == {k: v["agg_value"] for k, v in evals.items()}
    for name, keys in OU_ENTRY_KEYS.items():
        n = len(results[name]["value_by_index"])
        assert set(evals[name]) == {"agg_value", "value_by_index"}, name
        assert len(evals[name]["value_by_index"]) == n and n > 0
        assert all(set(v) == keys for v in evals[name]["value_by_index"].values()), name
        assert evals[name]["agg_value"] == pytest.approx(results[name]["agg_value"])
    for name in ("forget_quality", "model_utility", "privleak"):
        assert evals[name] == {"agg_value": results[name]["agg_value"]}
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        mia = evals[name]
        assert set(mia) == {"agg_value", "auc", "forget", "holdout"} and mia["auc"] == mia["agg_value"]
        f = [v["score"] for v in mia["forget"]["value_by_index"].values()]
        h = [v["score"] for v in mia["holdout"]["value_by_index"].values()]
        # open-unlearning's convention: loss-like scores, AUC of holdout (label 1) over forget (label 0).
        auc = sum((x > y) + 0.5 * (x == y) for x in h for y in f) / (len(f) * len(h))
        assert auc == pytest.approx(results[name]["agg_value"])
    rouge = evals["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    assert rouge["input"] == recs[0]["question"] and rouge["ground_truth"] == recs[0]["answer"]
    # the written file round-trips as a retain reference, in open-unlearning's format
    assert normalise_reference(evals)["meta"]["reference_format"] == "open-unlearning"
