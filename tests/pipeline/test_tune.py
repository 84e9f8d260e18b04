"""The tuning protocol of `soul reproduce` (preset ``tune:``): the selection rule and its guards, the grid-edge
extension, disjoint tuning / evaluation seeds, bad blocks refused in one line before anything exists, resume
of a half-done tuning stage from its records, and only evaluation seeds in the table. No model is trained:
`reference_models`, `unlearning_run` and `evaluate_run` are stubbed with hand-set metrics."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import yaml

from soul.pipeline import PresetError, load_preset, read_preset
from soul.pipeline.preset_types import TuneRule
from soul.pipeline.tune import admissibility, choose, summarize

TARGET = {"model_utility": 0.6, "retain_rouge": 0.9}


# ------------------------------------------------------------------------------------------- the rule alone
def fake_run(seed, fq, mu=0.6, privleak=0.0, rouge=0.9, norm=1.0):
    return {"name": f"r-s{seed}", "seed": seed, "role": "unlearned",
            "metrics": {"forget_quality": {"agg_value": fq}, "model_utility": {"agg_value": mu},
                        "privleak": {"agg_value": privleak}, "retain_Q_A_ROUGE": {"agg_value": rouge}},
            "diagnostics": {"update_norm_total": norm}}


def points(specs, rule):
    """Summaries of hand-made points: each spec is (lr, [run kwargs per seed])."""
    out = []
    for lr, runs in specs:
        p = summarize({"lr": lr}, [fake_run(s, **kw) for s, kw in enumerate(runs)], rule)
        p["admissible"], p["reason"] = admissibility(p, rule, TARGET)
        out.append(p)
    return out


def test_the_utility_guard_refuses_a_point_that_bought_forgetting_with_utility():
    rule = TuneRule()  # defaults: forget quality, utility >= 0.95 x target's (0.57)
    pts = points([(1e-5, [{"fq": 0.1, "mu": 0.58}, {"fq": 0.3, "mu": 0.58}]),    # mean fq 0.2, admissible
                  (1e-4, [{"fq": 0.9, "mu": 0.50}, {"fq": 0.9, "mu": 0.52}])], rule)  # best fq, utility 0.51
    assert pts[0]["metric"] == {"per_seed": {"0": 0.1, "1": 0.3}, "mean": pytest.approx(0.2)}
    assert pts[1]["admissible"] is False and "model utility 0.51 < 0.95 × target's 0.6" in pts[1]["reason"]
    assert choose(pts, rule) == 0
    assert choose(points([(1e-5, [{"fq": 0.2}]), (1e-4, [{"fq": 0.9, "mu": 0.5}])],
                         TuneRule(utility_fraction=None)), TuneRule(utility_fraction=None)) == 1  # guard off


def test_the_privleak_guard_refuses_over_unlearning():
    rule = TuneRule(max_abs_privleak=50.0)
    pts = points([(1e-5, [{"fq": 0.2, "privleak": 5.0}]), (1e-4, [{"fq": 0.9, "privleak": -80.0}])], rule)
    assert pts[1]["admissible"] is False and pts[1]["reason"] == "|PrivLeak| 80 > 50"
    assert choose(pts, rule) == 0
    missing = summarize({"lr": 1.0}, [{**fake_run(0, 0.5), "metrics": {"forget_quality": {"agg_value": 0.5},
                                                                       "model_utility": {"agg_value": 0.6}}}], rule)
    assert admissibility(missing, rule, TARGET) == (False, "PrivLeak not measured")


def test_the_retain_rouge_guard():
    rule = TuneRule(min_retain_rouge_fraction=0.8)  # retain ROUGE-L >= 0.72
    pts = points([(1e-5, [{"fq": 0.2, "rouge": 0.8}]), (1e-4, [{"fq": 0.9, "rouge": 0.4}])], rule)
    assert not pts[1]["admissible"] and "retain ROUGE-L 0.4 < 0.8 × target's 0.9" in pts[1]["reason"]
    assert choose(pts, rule) == 0


def test_metric_ties_go_to_the_smaller_total_update_norm():
    rule = TuneRule()
    tied = points([(1e-5, [{"fq": 0.5, "norm": 4.0}]), (1e-4, [{"fq": 0.5 * (1 + 1e-12), "norm": 1.0}]),
                   (1e-3, [{"fq": 0.1, "norm": 0.1}])], rule)
    assert choose(tied, rule) == 1  # equal within rel 1e-9: the one that moved the model less
    apart = points([(1e-5, [{"fq": 0.5 * (1 + 1e-6), "norm": 4.0}]), (1e-4, [{"fq": 0.5, "norm": 1.0}])], rule)
    assert choose(apart, rule) == 0  # not a tie: the higher metric wins whatever the norm


def test_no_admissible_point_is_none():
    rule = TuneRule()
    assert choose(points([(1e-5, [{"fq": 0.2, "mu": 0.1}]), (1e-4, [{"fq": 0.9, "mu": 0.2}])], rule), rule) is None


# ------------------------------------------------------------------------------------- the stubbed pipeline
def preset_dict(**tune):
    raw = read_preset("tiny")
    raw["seeds"] = [1, 2]
    raw["unlearn"]["objectives"] = {"graddiff": {"gamma": 1.0, "alpha": 1.0}}
    raw["influence"] = None
    raw.pop("sweep")
    raw["tune"] = {"seeds": [0], "grid": {"adamw": {"lr": [1.0e-4, 1.0e-3, 1.0e-2]}}, **tune}
    return raw


class Stub:
    """Stands in for the model stages: each run's metrics come from `metrics(lr, seed)`; `fail_after` makes
    the (n+1)-th unlearning run raise (a killed tuning stage)."""

    def __init__(self, metrics, fail_after=None):
        self.metrics, self.fail_after, self.calls = metrics, fail_after, []

    def install(self, monkeypatch, tmp_path):
        import soul.pipeline.api as api

        monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(api, "base_model", lambda spec: contextlib.nullcontext(spec))
        monkeypatch.setattr(api, "reference_models", self.reference_models)
        monkeypatch.setattr(api, "unlearning_run", self.unlearning_run)
        monkeypatch.setattr(api, "evaluate_run", self.evaluate_run)
        return self

    def reference_models(self, preset, out, progress, base, **kwargs):
        data = preset.task_impl.load_data(preset)
        ref = {"forget_truth_ratio": {"agg_value": 0.7}}
        runs = [{"name": "target", "role": "target", "metrics": {"forget_quality": {"agg_value": 1e-4},
                                                                 "model_utility": {"agg_value": 0.6},
                                                                 "retain_Q_A_ROUGE": {"agg_value": 0.9}}},
                {"name": "retain", "role": "retain", "metrics": {"forget_quality": {"agg_value": 1.0},
                                                                 "model_utility": {"agg_value": 0.6}}}]
        return {"data": data, "target_path": "stub", "target_fingerprint": "fp", "reference": ref, "runs": runs}

    def unlearning_run(self, spec, target_path, preset, data, run_dir, keep_model):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed")
        self.calls.append(spec["name"])
        run = {"name": spec["name"], "group": spec["group"], "seed": spec["seed"], "role": "unlearned",
               "objective": spec["objective"], "optimizer": spec["optimizer"],
               "optimizer_type": spec["optimizer_type"], "wall_time_s": 1.0, "config": spec["config"],
               "diagnostics": {"update_norm_total": 1000 * spec["config"]["lr"]}}
        return spec, None, run

    def evaluate_run(self, model, tokenizer, preset, data, reference, out):
        fq, mu = self.metrics(model["config"]["lr"], model["seed"])
        return {"forget_quality": {"agg_value": fq}, "model_utility": {"agg_value": mu},
                "privleak": {"agg_value": 0.0}, "retain_Q_A_ROUGE": {"agg_value": 0.9}}


def peaked(lr, seed):
    """Forget quality peaks at lr 1e-3 (inside the grid); utility always admissible."""
    return {1e-4: 0.1, 1e-3: 0.5, 1e-2: 0.2}.get(lr, 0.05) + 0.01 * seed, 0.6


def tune_calls(stub):
    return [c for c in stub.calls if c.startswith("tune-")]


def test_the_chosen_setting_runs_on_held_out_seeds_only(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    stub = Stub(peaked).install(monkeypatch, tmp_path)
    out = tmp_path / "out"
    results = reproduce(preset_dict(), out, stream=None)

    # Tuning: adamw's three lrs on tuning seed 0 only; sophia is not in the grid and is not tuned.
    assert tune_calls(stub) == [f"tune-graddiff-adamw-lr{lr}-s0" for lr in (0.0001, 0.001, 0.01)]
    evals = [c for c in stub.calls if not c.startswith("tune-")]
    assert evals == ["graddiff-adamw-s1", "graddiff-adamw-s2", "graddiff-sophia-s1", "graddiff-sophia-s2"]
    tuning = results["tuning"]
    adamw = tuning["settings"]["graddiff/adamw"]
    assert adamw["chosen"] == {"lr": 0.001} and adamw["flags"] == [] and adamw["extension"] is None
    assert [p["admissible"] for p in adamw["points"]] == [True] * 3
    assert adamw["points"][1]["metric"] == {"per_seed": {"0": 0.5}, "mean": 0.5}
    assert tuning["settings"]["graddiff/sophia"]["tuned"] is False
    assert (tuning["tune_seeds"], tuning["eval_seeds"]) == ([0], [1, 2])

    # The evaluation runs use the chosen lr; only the evaluation seeds reach runs, table and verdicts.
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["graddiff-adamw-s1"]["config"]["lr"] == 0.001 and runs["graddiff-adamw-s1"]["config"]["seed"] == 1
    assert runs["graddiff-sophia-s1"]["config"]["lr"] == 1.0e-3  # its preset lr
    saved = json.loads((out / "results.json").read_text())
    assert not any(r.get("seed") == 0 for r in saved["runs"])
    rows = {r["name"]: r for r in saved["table"]}
    assert rows["graddiff-adamw"]["seeds"] == [1, 2] and rows["graddiff-adamw"]["n"] == 2
    assert rows["graddiff-adamw"]["forget_quality"] == pytest.approx(0.515)  # (0.51 + 0.52) / 2, not seed 0's
    assert "lr 0.001 (tuned)" in rows["graddiff-adamw"]["label"] and "(not tuned)" in rows["graddiff-sophia"]["label"]
    assert all(v["objective"] == "graddiff" for v in saved["verdicts"])
    assert saved["tuning"]["settings"]["graddiff/adamw"]["chosen"] == {"lr": 0.001}
    html = (out / "report.html").read_text()
    assert "<h2>Tuning</h2>" in html and "graddiff/adamw: lr 0.001" in html and (out / "tuning.png").is_file()
    assert "## Tuning" in (out / "table.md").read_text()


def test_a_choice_on_the_grid_edge_is_extended_once_and_flagged_when_still_there(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    def rising(lr, seed):  # the larger the lr the better: the optimum lies past the grid
        return min(lr, 1.0), 0.6

    stub = Stub(rising).install(monkeypatch, tmp_path)
    results = reproduce(preset_dict(), tmp_path / "out", stream=None)
    adamw = results["tuning"]["settings"]["graddiff/adamw"]
    lrs = [p["options"]["lr"] for p in adamw["points"]]
    assert lrs[:3] == [1e-4, 1e-3, 1e-2] and lrs[3] == pytest.approx(0.1)  # 1e-2 × (1e-2 / 1e-3), once
    assert [p["extension"] for p in adamw["points"]] == [False, False, False, True]
    assert len(tune_calls(stub)) == 4  # the extension ran on the tuning seed, nothing more
    assert adamw["chosen"]["lr"] == pytest.approx(0.1) and "extended once to lr 0.1" in adamw["extension"]
    assert adamw["flags"] == ["at grid edge after one extension (lr 0.1)"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "WARNING: tuning graddiff/adamw: at grid edge" in (tmp_path / "out" / "report.html").read_text()
    assert saved["runs"][2]["config"]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize(("lrs", "side", "expected"), [
    ([1e-4, 2e-4, 3e-4], "low", 5e-5),   # 1e-4 * 1e-4 / 2e-4 is 4.9999999999999996e-05 in floats
    ([1e-5, 3e-5, 1e-4], "high", 1e-4 * 1e-4 / 3e-5),
    ([3e-4, 1e-4], "high", 9e-4),
])
def test_the_extended_lr_is_the_edge_times_its_ratio_without_float_noise_in_the_run_name(lrs, side, expected):
    from soul.pipeline.tune import extended_lr

    lr = extended_lr(lrs, side)
    assert lr == pytest.approx(expected, rel=1e-11)
    assert len(repr(lr)) <= len("3.33333333333e-04")  # the lr names the run: no 17-digit float repr


def test_an_extension_that_does_worse_keeps_the_edge_choice_without_a_flag(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    def low_best(lr, seed):  # best at the smallest grid lr, worse below it
        return {1e-4: 0.5, 1e-3: 0.2, 1e-2: 0.1}.get(lr, 0.3), 0.6

    stub = Stub(low_best).install(monkeypatch, tmp_path)
    adamw = reproduce(preset_dict(), tmp_path / "out", stream=None)["tuning"]["settings"]["graddiff/adamw"]
    assert adamw["points"][3]["options"]["lr"] == pytest.approx(1e-5) and len(tune_calls(stub)) == 4
    assert adamw["chosen"] == {"lr": 1e-4} and adamw["flags"] == [] and "smallest" in adamw["extension"]


def test_a_one_point_grid_cannot_be_extended_and_says_so(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    stub = Stub(peaked).install(monkeypatch, tmp_path)
    raw = preset_dict(grid={"adamw": {"lr": [1.0e-3], "max_steps": [2]}})
    adamw = reproduce(raw, tmp_path / "out", stream=None)["tuning"]["settings"]["graddiff/adamw"]
    assert len(tune_calls(stub)) == 1 and adamw["chosen"] == {"lr": 1e-3, "max_steps": 2}
    assert adamw["flags"] == ["only lr 0.001 was tried: a one-point lr grid cannot be extended; the best lr is unknown"]


def test_no_admissible_setting_takes_the_highest_utility_point_and_is_flagged(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    def damaging(lr, seed):  # every lr costs more than 5 % utility; the smallest the least
        return 0.5, {1e-4: 0.5, 1e-3: 0.4, 1e-2: 0.3}.get(lr, 0.1)

    Stub(damaging).install(monkeypatch, tmp_path)
    adamw = reproduce(preset_dict(extend_edges=False), tmp_path / "out",
                      stream=None)["tuning"]["settings"]["graddiff/adamw"]
    assert adamw["chosen"] == {"lr": 1e-4} and adamw["admissible_found"] is False
    assert adamw["flags"][0] == "no admissible setting: chose the point with the highest model utility"
    assert "extend_edges is off" in adamw["flags"][1] and len(adamw["points"]) == 3


def test_a_killed_tuning_stage_resumes_from_its_records(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    out = tmp_path / "out"
    first = Stub(peaked, fail_after=2).install(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce(preset_dict(), out, stream=None)
    assert len(first.calls) == 2 and sorted(p.name for p in (out / "tune").glob("*.json")) == [
        "tune-graddiff-adamw-lr0.0001-s0.json", "tune-graddiff-adamw-lr0.001-s0.json"]

    second = Stub(peaked).install(monkeypatch, tmp_path)
    results = reproduce(preset_dict(), out, stream=None)
    assert tune_calls(second) == ["tune-graddiff-adamw-lr0.01-s0"]  # only the run the kill left undone
    assert results["tuning"]["settings"]["graddiff/adamw"]["chosen"] == {"lr": 0.001}

    # A record made for another setting (here: a different key) is soul's own file: rerun and replaced.
    path = out / "tune" / "tune-graddiff-adamw-lr0.001-s0.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "key": "0" * 64}))
    third = Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(preset_dict(), out, stream=None)
    assert tune_calls(third) == ["tune-graddiff-adamw-lr0.001-s0"]
    assert json.loads(path.read_text())["key"] == record["key"]

    # Another evaluation setting changes the key of every record: all rerun.
    fourth = Stub(peaked).install(monkeypatch, tmp_path)
    raw = preset_dict()
    raw["eval"]["max_new_tokens"] = 4
    reproduce(raw, out, stream=None)
    assert len(tune_calls(fourth)) == 3


def test_no_tune_and_tune_seeds_flags(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    stub = Stub(peaked).install(monkeypatch, tmp_path)
    results = reproduce(preset_dict(), tmp_path / "a", stream=None, no_tune=True)
    assert tune_calls(stub) == [] and "tuning" not in results
    assert results["runs"][2]["config"]["lr"] == 1.0e-3 and "tuned" not in results["runs"][2].get("label", "")
    stub.calls.clear()
    results = reproduce(preset_dict(), tmp_path / "b", stream=None, tune_seeds=[0, 4])
    assert {c.rsplit("-", 1)[1] for c in tune_calls(stub)} == {"s0", "s4"}
    assert results["tuning"]["tune_seeds"] == [0, 4]


# ---------------------------------------------------------------------------------------- refused presets
def write(tmp_path, raw, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def with_tune(path, value):
    raw = preset_dict()
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()


@pytest.mark.parametrize(("key", "value", "where", "problem"), [
    ("tune.sedes", [3], "tune.sedes", "unknown key (did you mean 'seeds'?)"),
    ("tune.seeds", DELETE, "tune.seeds", "missing"),
    ("tune.seeds", [1], "tune.seeds", "seed(s) [1] are both tuning seeds [1] and evaluation seeds [1, 2]"),
    ("tune.grid", {}, "tune.grid", "missing or empty"),
    ("tune.grid.adamw.lr", [], "tune.grid.adamw.lr", "must be a non-empty list"),
    ("tune.grid.adamw.lr", [1.0e-4, 0], "tune.grid.adamw.lr[1]", "must be > 0"),
    ("tune.grid.adamw.lr", [-1.0e-5], "tune.grid.adamw.lr[0]", "must be > 0"),
    ("tune.grid.adamw.lr", ["fast"], "tune.grid.adamw.lr[0]", "must be number"),
    ("tune.grid.adamw.lr", [1.0e-4, 1.0e-4], "tune.grid.adamw.lr", "repeated value"),
    ("tune.grid.adamw", {"max_steps": [2]}, "tune.grid.adamw", "needs lr"),
    ("tune.grid.adamw.rho", [0.1], "tune.grid.adamw.rho", "unknown option"),
    ("tune.grid.adamw.max_steps", [0], "tune.grid.adamw.max_steps[0]", "must be >= 1"),
    ("tune.grid.lion", {"lr": [1.0e-4]}, "tune.grid.lion", "not an optimizer entry of unlearn.optimizers"),
    ("tune.rule", {"metric": "forget_qualty"}, "tune.rule.metric", "expected one of ['forget_quality', "),
    ("tune.rule", {"metric": "mia_auc"}, "tune.rule.metric", "expected one of"),  # lower is better
    ("tune.rule", {"utility_fraction": "high"}, "tune.rule.utility_fraction", "must be number"),
    ("tune.rule", {"utility_fraction": 1.5}, "tune.rule.utility_fraction", "must be <= 1"),
    ("tune.rule", {"utility_fraction": True}, "tune.rule.utility_fraction", "must be number"),
    ("tune.rule", {"max_abs_privleak": -1}, "tune.rule.max_abs_privleak", "must be >= 0"),
    ("tune.rule", {"min_retain_rouge_fraction": 0}, "tune.rule.min_retain_rouge_fraction", "must be > 0"),
    ("tune.rule", {"tie": "wall_time_s"}, "tune.rule.tie", "expected one of ['update_norm_total'"),
    ("tune.rule", {"metrc": "forget_quality"}, "tune.rule.metrc", "unknown key"),
    ("tune.extend_edges", "yes", "tune.extend_edges", "must be bool"),
])
def test_a_bad_tune_block_is_one_line_before_anything_exists(tmp_path, capsys, no_models, key, value, where,
                                                             problem):
    from soul.cli import main

    path = write(tmp_path, with_tune(key, value))
    assert main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"preset {path}: {where}: " in err[0] and problem in err[0], err
    assert not (tmp_path / "out").exists()


def test_tuning_needs_a_task_with_the_rules_metrics(tmp_path):
    raw = read_preset("tiny-copyright")
    raw["tune"] = {"seeds": [9], "grid": {next(iter(raw["unlearn"]["optimizers"])): {"lr": [1.0e-4]}}}
    with pytest.raises(PresetError, match=r": tune: task 'copyright' cannot be tuned"):
        load_preset(raw)


def test_disjointness_is_checked_after_the_flags(tmp_path, capsys, no_models):
    from soul.cli import main

    path = write(tmp_path, preset_dict())
    for flags, overlap in ((["--seeds", "0,5"], "[0]"), (["--tune-seeds", "2,7"], "[2]")):
        assert main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"preset {path}: tune.seeds: seed(s) {overlap} are both" in err[0], err
        assert f"(after {flags[0]})" in err[0]
    raw = preset_dict()
    del raw["tune"]
    assert main(["reproduce", "--preset", str(write(tmp_path, raw, "untuned.yaml")), "--out", str(tmp_path / "out"),
                 "--tune-seeds", "3"]) == 2
    assert "--tune-seeds needs a tune: block" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # --no-tune lifts the constraint (no tuning seeds), and --seeds disjoint from tune.seeds passes.
    from soul.pipeline.api import plan_reproduce

    assert plan_reproduce(str(path), seeds=[0], no_tune=True)[0].tune is None
    assert plan_reproduce(str(path), seeds=[3, 4])[0].tune.seeds == [0]


def test_old_results_without_tuning_still_report(tmp_path):
    """`soul report` on results.json written before tuning existed: no Tuning section, no tuning.png."""
    from soul.report import write_report

    results = {"meta": {}, "runs": [
        {"name": "target", "role": "target", "metrics": {"forget_quality": {"agg_value": 1e-3},
                                                         "model_utility": {"agg_value": 0.6}}},
        {"name": "graddiff-adamw", "role": "unlearned", "objective": "graddiff", "optimizer": "adamw",
         "metrics": {"forget_quality": {"agg_value": 0.1}, "model_utility": {"agg_value": 0.59}}}]}
    files = write_report(copy.deepcopy(results), tmp_path / "r", stream=None)
    assert "tuning.png" not in files and "<h2>Tuning</h2>" not in (tmp_path / "r" / "report.html").read_text()
    bad = {**results, "tuning": {"settings": {"graddiff/adamw": {"tuned": True, "points": [], "chosen_index": 0}}}}
    with pytest.raises(ValueError, match=r"tuning\.settings\.graddiff/adamw: expected 'points'"):
        write_report(bad, tmp_path / "r2", stream=None)
