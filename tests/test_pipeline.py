"""`soul.pipeline`: preset handling and grids (fast), and the whole `tiny` pipeline end to end (CI smoke)."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import pytest

from soul import pipeline
from soul.pipeline import hash_records, load_preset, read_preset, sweep_grid, unlearn_configs


def test_shipped_presets_load_and_every_run_config_is_valid():
    from soul.objectives import build_objective
    from soul.train import make_config

    names = pipeline.list_presets()
    assert {"demo", "paper-cpu", "tiny", "tofu-forget01", "tofu-forget05", "tofu-forget10"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.where.endswith(f"reproduce-{name}.yaml")
        specs = unlearn_configs(preset)
        objectives = {s["objective"] for s in specs}
        # tofu-cpu, the demo and curvature run GradDiff only, to fit their time budgets (NPO is one line away;
        # paper-cpu runs it with the demo's optimizers)
        graddiff_only = name in ("tofu-cpu", "demo", "curvature")
        assert ({"graddiff"} if graddiff_only else {"graddiff", "npo"}) <= objectives, name
        assert {s["optimizer_type"] for s in specs} >= {"adamw", "sophia"}, name
        budgets = {(s["config"].get("max_steps"), s["config"].get("epochs")) for s in specs}
        assert len(budgets) == 1, f"{name}: unequal step budgets {budgets}"
        # `soul sweep` is TOFU-only (forget quality vs model utility); the other tasks' presets have no grid.
        for spec in [*specs, *(sweep_grid(preset) if preset.sweep else [])]:
            cfg = {k: v for k, v in spec["config"].items() if not (k == "rho" and v == "auto")}
            make_config(cfg, objective=spec["objective"], optimizer=spec["optimizer_type"])  # raises on a bad option
            coeffs = {k: cfg[k] for k in ("gamma", "alpha", "beta", "delta") if k in cfg}
            build_objective(spec["objective"], **coeffs)  # raises on a coefficient the objective lacks
        if preset.target.finetune:
            make_config(preset.target.finetune, objective="finetune")
    assert "po" in {s["objective"] for s in unlearn_configs(load_preset("paper-cpu"))}


@pytest.mark.parametrize("name", ["demo", "tofu-cpu"])
def test_cpu_comparison_presets_tune_each_optimizer_on_seeds_they_report_none_of(name):
    """The demo and tofu-cpu answer "first vs second order" the fair way (issue 24): AdamW against calibrated
    Sophia, each at the lr its own grid chose on tuning seeds, reported on three other seeds, with the rule
    guarding against over- and under-unlearning (PrivLeak) and an lr grid per optimizer."""
    preset = load_preset(name)
    entries = preset.unlearn.optimizers
    assert {n: e.optimizer for n, e in entries.items()} == {"adamw": "adamw", "sophia-auto": "sophia"}
    assert entries["sophia-auto"].options["rho"] == "auto"
    tune = preset.tune
    assert tune is not None and set(tune.grid) == set(entries)
    assert len(preset.seeds) >= 3 and not set(preset.seeds) & set(tune.seeds)
    assert all(len(axes["lr"]) >= 2 for axes in tune.grid.values())
    assert tune.rule.metric == "forget_quality" and tune.rule.utility_fraction >= 0.9
    assert tune.rule.max_abs_privleak is not None
    specs = unlearn_configs(preset)
    assert len(specs) == 2 * len(preset.seeds) and {s["seed"] for s in specs} == set(preset.seeds)


def test_the_demo_sweep_still_spans_adamws_lr_range_up_to_1e_3():
    """`soul sweep --preset demo` is the one-seed lr picture beside the tuned table: AdamW's grid must reach
    1e-3 in at least five points, so a curve that turns over past the tuned grid's edge shows."""
    lrs = load_preset("demo").sweep.grid["adamw"]["lr"]
    assert max(lrs) >= 1e-3 and len(lrs) >= 5


@pytest.mark.parametrize("name", ["demo", "paper-cpu", "tofu-cpu"])
def test_cpu_presets_pin_float32_for_everything_that_makes_their_table(name):
    """A README table must come out the same on any CPU: no block of a CPU preset may leave its precision to
    "auto" (bf16 on CPUs with native bf16, float32 elsewhere) or ask for bf16."""
    from soul.train import make_config

    raw = read_preset(name)
    blocks = {"eval": raw["eval"], "unlearn.common": raw["unlearn"]["common"],
              **{f"{ref}.finetune": raw[ref]["finetune"] for ref in ("target", "retain") if ref in raw}}
    for where, block in blocks.items():
        assert block.get("mixed_precision") == "no", where
    preset = load_preset(name)
    assert {s["config"]["mixed_precision"] for s in unlearn_configs(preset)} == {"no"}
    assert make_config(preset.target.finetune, objective="finetune").mixed_precision == "no"


def test_unlearn_grid_precedence():
    preset = load_preset({"unlearn": {
        "common": {"max_steps": 7, "lr": 1.0, "batch_size": 2},
        "objectives": {"graddiff": {"gamma": 2.0}, "npo": {"beta": 0.5, "lr": 3.0}},
        "optimizers": {"adamw": {"lr": 4.0}, "sophia": {}},
        "overrides": {"npo/sophia": {"lr": 9.0}}}})
    specs = {s["group"]: s["config"] for s in unlearn_configs(preset)}
    assert list(specs) == ["graddiff-adamw", "graddiff-sophia", "npo-adamw", "npo-sophia"]
    assert specs["graddiff-adamw"]["lr"] == 4.0 and specs["graddiff-sophia"]["lr"] == 1.0
    assert specs["npo-adamw"]["lr"] == 4.0 and specs["npo-sophia"]["lr"] == 9.0
    assert all(c["max_steps"] == 7 and c["seed"] == 0 for c in specs.values())
    assert specs["graddiff-sophia"]["gamma"] == 2.0 and "gamma" not in specs["npo-adamw"]


def test_sweep_grid_is_the_product_per_optimizer():
    preset = load_preset({"unlearn": {"common": {"max_steps": 5}}, "sweep": {"objective": "graddiff", "grid": {
        "adamw": {"lr": [1, 2, 3], "gamma": [0.5, 1.0]}, "sophia": {"lr": [1], "max_steps": [2, 4]}}}})
    specs = sweep_grid(preset)
    assert len(specs) == 3 * 2 + 1 * 2
    assert {(s["config"]["lr"], s["config"]["gamma"]) for s in specs if s["optimizer"] == "adamw"} == {
        (a, b) for a in (1, 2, 3) for b in (0.5, 1.0)}
    assert sorted(s["config"]["max_steps"] for s in specs if s["optimizer"] == "sophia") == [2, 4]
    assert all(s["config"]["max_steps"] == 5 for s in specs if s["optimizer"] == "adamw")
    assert len({s["name"] for s in specs}) == len(specs)
    with pytest.raises(ValueError, match=r"sweep\.grid"):
        sweep_grid(load_preset({}))


def test_bad_presets_are_named():
    with pytest.raises(ValueError, match="unknown reproduce preset 'nope'"):
        load_preset("nope")
    with pytest.raises(ValueError, match=r"preset dict: epochs: unknown key"):
        load_preset({"epochs": 3})
    with pytest.raises(ValueError, match="task 'nope'"):
        load_preset({"task": "nope"})


def test_hashes_see_content_not_layout(tmp_path, llama):
    a = [{"question": "q", "answer": "a"}]
    assert hash_records(a) == hash_records([{"answer": "a", "question": "q"}])
    assert hash_records(a) != hash_records([{"question": "q", "answer": "b"}])
    from soul.models import save_model

    model, tok = llama
    save_model(model, tok, tmp_path / "m1")
    save_model(model, tok, tmp_path / "m2")
    fp = pipeline.model_fingerprint(tmp_path / "m1")
    assert fp == pipeline.model_fingerprint(tmp_path / "m2")  # same bytes, other place: same key
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    save_model(model, tok, tmp_path / "m2")
    assert pipeline.model_fingerprint(tmp_path / "m2") != fp
    assert pipeline.model_fingerprint("locuslab/tofu_ft_llama2-7b") == "hub:locuslab/tofu_ft_llama2-7b"


# ------------------------------------------------------------------------------------------- end to end
BOUNDED = re.compile(r"Prob|ROUGE|Truth_Ratio|truth_ratio|quality|utility|^mia_|memorization|extraction")


@pytest.mark.slow
@pytest.mark.smoke
def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch):
    """The whole `tiny` preset over two seeds: every file written, every number finite and in range, forget
    quality against the retain model (checked against a recomputation), equal step budgets, per-seed runs
    that differ and table cells that are their mean ± std, diagnostics per run, cached reruns."""
    from scipy.stats import ks_2samp

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    log = io.StringIO()
    pipeline.reproduce("tiny", out, stream=log, seeds=[0, 1])

    groups = [f"{o}-{p}" for o in ("graddiff", "po", "npo") for p in ("adamw", "sophia")]
    names = ["target", "retain", *groups, "influence"]
    run_names = [f"{g}-s{s}" for g in groups for s in (0, 1)]
    for f in ("results.json", "table.md", "report.html", "fq_vs_utility.png", "loss_curves.png", "metric_bars.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for name in ["target", "retain", *run_names, "influence"]:
        assert (out / "eval" / f"{name}.json").is_file(), name
    data = json.loads((out / "results.json").read_text())
    table = data["table"]
    assert [r["name"] for r in table] == names
    for row in table:
        for key, value in row.items():
            if isinstance(value, float) and not key.endswith("_std") and key not in (
                    "rho", "update_norm_mean", "update_norm_total", "displacement"):
                assert math.isfinite(value), (row["name"], key)
                if key != "wall_time_s":
                    assert 0.0 <= value <= 1.0, (row["name"], key, value)
                else:
                    assert value >= 0
        for key in ("forget_quality", "ks_statistic", "forget_prob", "forget_truth_ratio", "mia_auc", "model_utility"):
            assert row[key] is not None, (row["name"], key)
    assert data["problems"] == []

    # Seeds: one run per objective x optimizer x seed, differing per seed; the table is their mean / std.
    runs = {r["name"]: r for r in data["runs"]}
    assert set(run_names) <= set(runs)
    for g in groups:
        a, b = runs[f"{g}-s0"], runs[f"{g}-s1"]
        assert (a["seed"], b["seed"]) == (0, 1) and a["config"]["seed"] == 0 and b["config"]["seed"] == 1
        assert a["curve"] != b["curve"], g  # another data order: other losses
        row = next(r for r in table if r["name"] == g)
        assert row["n"] == 2 and row["runs"] == [f"{g}-s0", f"{g}-s1"]
        for key in ("forget_prob", "model_utility"):
            values = [runs[f"{g}-s{s}"]["metrics"][{"forget_prob": "forget_Q_A_Prob"}.get(key, key)]["agg_value"]
                      for s in (0, 1)]
            assert row[key] == pytest.approx(sum(values) / 2)
            assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        agg = next(e for e in data["aggregate"] if e["name"] == g)
        assert agg["values"]["model_utility"]["n"] == 2
        assert agg["values"]["model_utility"]["mean"] == pytest.approx(row["model_utility"])
        # Diagnostics are per run; Sophia logs its clip fraction on this branch already.
        assert set(a["diagnostics"]) >= {"mean_clip_fraction", "rho", "update_norm_mean", "update_norm_total",
                                         "displacement"}
        if g.endswith("sophia"):
            assert 0.0 <= a["diagnostics"]["mean_clip_fraction"] <= 1.0
    assert runs["influence"].get("seed") is None  # one-shot, deterministic: run once
    assert all(v["sentence"] for v in data["verdicts"]) and len(data["verdicts"]) == 3
    assert "mean ± std over seeds" in (out / "table.md").read_text()

    # Forget quality is the KS p-value against the *retain* model's per-question truth ratios.
    ref = json.loads((out / "eval" / "retain.json").read_text())["forget_truth_ratio"]["value_by_index"]
    tgt = json.loads((out / "eval" / "target.json").read_text())
    mine = tgt["forget_truth_ratio"]["value_by_index"]
    expected = ks_2samp([mine[k]["score"] for k in sorted(mine, key=int)],
                        [ref[k]["score"] for k in sorted(ref, key=int)])
    assert tgt["forget_quality"]["agg_value"] == pytest.approx(expected.pvalue, abs=1e-12)
    assert table[0]["ks_statistic"] == pytest.approx(expected.statistic, abs=1e-12)
    assert table[1]["forget_quality"] == 1.0  # the retain model against itself

    # Equal step budgets: every unlearned run logged the preset's max_steps steps, with finite losses.
    steps = {}
    for name in run_names:
        lines = [json.loads(x) for x in (out / "runs" / name / "train_log.jsonl").read_text().splitlines()]
        steps[name] = [r["step"] for r in lines]
        assert all(math.isfinite(r["loss"]) for r in lines)
    assert all(s == [1, 2, 3] for s in steps.values()), steps

    html = (out / "report.html").read_text()
    embedded = [base64.b64decode(u) for u in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert (out / "fq_vs_utility.png").read_bytes() in embedded and len(embedded) == 3
    assert "GradDiff + Sophia (SO)" in html and "Influence (one-shot)" in html and " ± " in html
    assert "Clip frac." in html and "KS stat." in html and "<h2>Verdict</h2>" in html

    # Rerun (a sweep over one setting per optimizer): fine-tuned models and reference evaluations are cached.
    preset = read_preset("tiny")
    preset["sweep"]["grid"] = {"adamw": {"lr": [1.0e-3], "max_steps": [2]},
                               "sophia": {"lr": [1.0e-3], "max_steps": [2]}}
    log2 = io.StringIO()
    results = pipeline.sweep(preset, tmp_path / "sweep", stream=log2)
    text = log2.getvalue()
    assert "target model: cached" in text and "retain model: cached" in text
    assert "evaluating target: cached" in text and ": fine-tuning" not in text
    assert len(list((tmp_path / "cache" / "finetuned").iterdir())) == 2
    assert (tmp_path / "sweep" / "pareto.png").is_file()
    sweep_data = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(results["sweep"]["points"]) == 2 and set(sweep_data["sweep"]["fronts"]) == {"adamw", "sophia"}
    assert any("only lr=0.001 was tried" in w for w in sweep_data["sweep"]["edge_warnings"])
