"""The pipeline's one-shot influence run is a function of the preset, not of what ran before it."""

from __future__ import annotations

import torch

from soul.models import save_model
from soul.pipeline import load_preset
from soul.pipeline.preset import read_preset
from soul.pipeline.stages import influence_run
from soul.testing import tiny_model


def test_influence_run_does_not_depend_on_the_global_rng(tmp_path):
    # A fresh `reproduce` fine-tunes before it unlearns, a cached one does not: the global RNG differs, and
    # the GNB label draws of the one-shot step must not follow it (two demo runs once gave FQ 0.79 and 0.17).
    model, tokenizer = tiny_model("llama")
    save_model(model, tokenizer, tmp_path / "target")
    preset = load_preset("tiny")
    data = preset.task_impl.load_data(preset)
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        unlearned, _, run = influence_run(str(tmp_path / "target"), preset, data)
        weights.append({k: v.clone() for k, v in unlearned.state_dict().items()})
        assert run["stats"]["step_norm"] > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    raw = read_preset("tiny")
    raw["seed"] = preset.seed + 1  # the preset's seed does choose the draws
    other, _, _ = influence_run(str(tmp_path / "target"), load_preset(raw), data)
    assert any(not torch.equal(weights[0][k], v) for k, v in other.state_dict().items())


def test_three_influence_rows_gnb_kfac_ekfac_side_by_side(tmp_path, monkeypatch):
    """A preset's named influence rows run one after the other: one table row each, labelled by estimator,
    with the Newton-model diagnostics in every run record."""
    import json

    from soul import pipeline

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    raw = read_preset("tiny")
    common = {"alpha": 1e-5, "damping_relative": 0.1, "batch_size": 4, "max_retain_batches": 2}
    raw["influence"] = {"influence": {**common, "hessian": "gnb"}, "influence-kfac": {**common, "hessian": "kfac"},
                        "influence-ekfac": {**common, "hessian": "ekfac"}}
    names = ["influence", "influence-kfac", "influence-ekfac"]
    out = tmp_path / "report"
    results = pipeline.reproduce(raw, out, stream=None, only=names)
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["table"]] == ["target", "retain", *names]
    labels = {r["name"]: r["label"] for r in data["table"]}
    assert [labels[n] for n in names] == ["Influence (one-shot, GNB)", "Influence (one-shot, K-FAC)",
                                          "Influence (one-shot, EK-FAC)"]
    runs = {r["name"]: r for r in results["runs"]}
    for name in names:
        assert (out / "eval" / f"{name}.json").is_file()
        stats = runs[name]["stats"]
        for key in ("cosine_with_ascent", "cosine_with_diagonal", "step_norm", "predicted_forget_change",
                    "measured_forget_change", "predicted_retain_change", "measured_retain_change"):
            assert isinstance(stats[key], float), (name, key)
    assert runs["influence"]["stats"]["cosine_with_diagonal"] == 1.0
    assert runs["influence-kfac"]["stats"]["cosine_with_diagonal"] < 1.0
