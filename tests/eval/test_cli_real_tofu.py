"""`soul eval` on TOFU's published files as they are (no paraphrase in real_authors/world_facts_perturbed)."""

from __future__ import annotations

import json

import pytest

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model


def test_soul_eval_on_the_real_tofu_files(real_tofu_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", seed=1)
    save_model(model, tok, tmp_path / "model")
    ratios = {str(i): 0.3 + i / 50 for i in range(40)}  # a retain model's forget01 truth ratios, from elsewhere
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(
        {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {k: {"score": v} for k, v in ratios.items()}}}))
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(real_tofu_dir), "--forget-split", "forget01",
            "--retain-reference", str(tmp_path / "TOFU_EVAL.json"), "--max-new-tokens", "2", "--batch-size", "64",
            "--out", str(tmp_path / "res.json"), "--open-unlearning-dir", str(tmp_path / "ou"),
            "--report-to", "tensorboard", "--max-length", "256"]  # the tiny tokenizer makes ~300-token answers
    assert main(argv) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["meta"]["splits"]["forget"]["n"] == 40 and res["meta"]["forget_split"] == "forget01_perturbed"
    assert res["meta"]["splits"]["ra"]["n"] == 100
    assert res["meta"]["splits"]["wf"]["n"] == 117
    assert res["meta"]["splits"]["retain"]["n"] == 400
    assert len(res["ra_Truth_Ratio"]["value_by_index"]) == 100
    assert 0 <= res["forget_quality"]["agg_value"] <= 1 and res["model_utility"]["agg_value"] is not None
    assert "holdout01" in capsys.readouterr().err  # TOFU publishes no holdout file: MIA is skipped, said so
    summary = json.loads((tmp_path / "ou" / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] == res["forget_quality"]["agg_value"]
    assert summary["ra_Truth_Ratio"] == res["ra_Truth_Ratio"]["agg_value"]
    from tests.train.test_trackers import read_scalars

    logged = read_scalars(tmp_path / "trackers")
    assert logged["eval/forget_quality"] == {0: pytest.approx(res["forget_quality"]["agg_value"])}
    assert logged["eval/ra_Truth_Ratio"] == {0: pytest.approx(res["ra_Truth_Ratio"]["agg_value"])}
