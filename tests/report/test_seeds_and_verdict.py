"""Seeds in the report (mean ± std per setting), optimizer diagnostics, optimizer labels, the computed
verdict and the sweep's best learning rate, on synthetic results with hand-checkable numbers."""

from __future__ import annotations

import json
import math

import pytest

from soul.report import table_rows, write_report
from soul.report.diagnostics import diagnostics_from_log, run_diagnostics
from soul.report.results import aggregate, optimizer_label
from soul.report.verdict import BEATS, MIXED, NO_DIFFERENCE, WORSE, compare, verdicts
from soul.report.write import edge_warnings, sweep_summary


# --------------------------------------------------------------------------------------------- diagnostics
def test_diagnostics_from_step_log():
    log = [{"kind": "train", "step": 1, "loss": 1.0, "clip_fraction": 0.2, "update_norm": 1.0, "rho": 0.04,
            "update_rms_over_lr": 0.5},
           {"kind": "probe", "step": 1, "forget_prob": 0.3},  # not a training step
           {"kind": "train", "step": 2, "loss": 0.9, "clip_fraction": 0.6, "update_norm": 3.0, "rho": 0.02,
            "update_rms_over_lr": 1.0, "displacement": 3.5}]
    d = diagnostics_from_log(log)
    assert d == {"mean_clip_fraction": pytest.approx(0.4), "rho": 0.02, "update_norm_mean": 2.0,
                 "update_norm_total": 4.0, "displacement": 3.5, "update_rms_over_lr_mean": 0.75}
    # AdamW logs none of these: every diagnostic is missing, not zero.
    assert set(diagnostics_from_log([{"kind": "train", "step": 1, "loss": 1.0}]).values()) == {None}


def test_the_loops_summary_wins_and_rho_falls_back_to_the_config():
    log = [{"step": 1, "loss": 1.0, "update_norm": 2.0, "clip_fraction": math.nan}]
    d = run_diagnostics({"update_norm_total": 10.0, "displacement": 4.0, "mean_clip_fraction": None}, log,
                        {"rho": 0.04})
    assert d["update_norm_total"] == 10.0 and d["displacement"] == 4.0 and d["update_norm_mean"] == 2.0
    assert d["mean_clip_fraction"] is None  # NaN in the log, None in the summary: unknown
    assert d["rho"] == 0.04
    assert run_diagnostics(None, [], {"rho": "auto"})["rho"] is None  # "auto" without a logged value


# ------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(("run", "label"), [
    ({"optimizer": "adamw"}, "AdamW (FO)"),
    ({"optimizer": "sophia", "config": {"rho": 0.04}}, "Sophia ρ=0.04 (SO)"),
    ({"optimizer": "sophia-auto", "optimizer_type": "sophia", "config": {"rho": "auto"}}, "Sophia ρ=auto (SO)"),
    ({"optimizer": "sophia"}, "Sophia (SO)"),
    # Rows that differ only in the curvature estimator must not read alike (the curvature preset's table).
    ({"optimizer": "sophia-diag", "optimizer_type": "sophia", "config": {"rho": "auto", "estimator": "gnb"}},
     "Sophia ρ=auto (SO)"),
    ({"optimizer": "sophia-kfac", "optimizer_type": "sophia", "config": {"rho": "auto", "estimator": "kfac"}},
     "Sophia K-FAC ρ=auto (SO)"),
    ({"optimizer": "sophia-ekfac", "optimizer_type": "sophia", "config": {"rho": "auto", "estimator": "ekfac"}},
     "Sophia EK-FAC ρ=auto (SO)"),
    ({"optimizer": "sophia", "config": {"estimator": "hutchinson"}},
     "Sophia Hutchinson (SO)"),
    ({"optimizer": "signum", "optimizer_type": "signum"}, "Signum (sign, no curvature)"),
    ({"optimizer": "lion"}, "Lion (sign, no curvature)"),
    ({"optimizer": "lamb", "optimizer_type": "pytorch_optimizer:Lamb"}, "Lamb (pytorch_optimizer)"),
    ({"optimizer": "adamw-slow", "optimizer_type": "adamw"}, "AdamW [adamw-slow] (FO)"),
])
def test_optimizer_labels(run, label):
    assert optimizer_label(run) == label


# ------------------------------------------------------------------------------------------------- seeds
def _run(obj, opt, seed, fq, mu, total=None, kind=None, rho=None):
    run = {"name": f"{obj}-{opt}-s{seed}", "group": f"{obj}-{opt}", "seed": seed, "role": "unlearned",
           "objective": obj, "optimizer": opt, "optimizer_type": kind or opt, "wall_time_s": 10.0 + seed,
           "config": {"seed": seed, **({"rho": rho} if rho is not None else {})},
           "metrics": {"forget_quality": {"agg_value": fq, "ks_statistic": 1 - fq},
                       "model_utility": {"agg_value": mu}},
           "diagnostics": {"mean_clip_fraction": 0.5 if (kind or opt) == "sophia" else None,
                           "rho": rho if isinstance(rho, float) else None,
                           "update_norm_mean": None if total is None else total / 4,
                           "update_norm_total": total, "displacement": None if total is None else total / 2}}
    return run


def seeded_results():
    target = {"name": "target", "role": "target", "metrics": {"forget_quality": {"agg_value": 1e-5},
                                                             "model_utility": {"agg_value": 0.6}}}
    runs = [target]
    # Sophia's seeds differ from AdamW's by 0.4, 0.2, 0.3 (not one constant shift, which the paired test
    # treats as no spread): paired t over 3 seeds, p = 0.035.
    for s, (fa, fs) in enumerate([(0.10, 0.50), (0.20, 0.40), (0.30, 0.60)]):
        runs.append(_run("graddiff", "adamw", s, fa, 0.57 + 0.01 * s, total=1.0))
        runs.append(_run("graddiff", "sophia", s, fs, 0.56 + 0.01 * s, total=4.0, rho=0.04))
    return {"meta": {}, "runs": runs}


def test_table_cells_are_mean_and_std_over_seeds():
    rows = {r["name"]: r for r in table_rows(seeded_results())}
    so = rows["graddiff-sophia"]
    assert so["n"] == 3 and so["runs"] == ["graddiff-sophia-s0", "graddiff-sophia-s1", "graddiff-sophia-s2"]
    assert so["forget_quality"] == pytest.approx(0.5) and so["forget_quality_std"] == pytest.approx(0.1)
    assert so["ks_statistic"] == pytest.approx(0.5) and so["wall_time_s"] == pytest.approx(11.0)
    assert so["wall_time_s_std"] == pytest.approx(1.0)  # sample std of 10, 11, 12
    assert so["update_norm_total"] == 4.0 and so["update_norm_total_std"] == 0.0
    assert so["label"] == "GradDiff + Sophia ρ=0.04 (SO)"
    assert rows["target"]["n"] == 1 and rows["target"]["forget_quality_std"] is None  # one value: no spread
    entry = next(e for e in aggregate(seeded_results()) if e["name"] == "graddiff-adamw")
    assert entry["values"]["forget_quality"] == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1), "n": 3,
                                                 "by_seed": {"0": 0.1, "1": 0.2, "2": 0.3}}
    assert entry["values"]["mean_clip_fraction"] == {"mean": None, "std": None, "n": 0}


def test_report_files_carry_spread_diagnostics_and_verdict(tmp_path, capsys):
    files = write_report(seeded_results(), tmp_path, stream="stdout")
    data = json.loads(files["results.json"].read_text())
    run = next(r for r in data["runs"] if r["name"] == "graddiff-sophia-s1")
    assert run["seed"] == 1 and run["diagnostics"]["update_norm_total"] == 4.0
    assert run["diagnostics"]["mean_clip_fraction"] == 0.5 and run["diagnostics"]["rho"] == 0.04
    assert run["metrics"]["forget_quality"] == {"agg_value": 0.4, "ks_statistic": 0.6}
    assert [e["name"] for e in data["aggregate"]] == ["target", "graddiff-adamw", "graddiff-sophia"]
    [v] = data["verdicts"]
    assert v["verdict"] == BEATS and v["moved_further"] and v["norm_ratio"] == pytest.approx(4.0)
    md = files["table.md"].read_text()
    assert "0.500 ± 0.100" in md and "0.200 ± 0.100" in md
    assert "## Verdict" in md and "beats AdamW (FO)" in md and "moved further" in md
    html = files["report.html"].read_text()
    for text in ("Clip frac.", "ρ", "mean ‖Δθ‖", "total ‖Δθ‖", "‖θ_T−θ_0‖", "KS stat.", "0.500 ± 0.100",
                 "<h2>Verdict</h2>", "Sophia ρ=0.04 (SO)"):
        assert text in html, text
    sophia_row = next(line for line in html.split("<tr") if "<td>GradDiff + Sophia ρ=0.04 (SO)" in line)
    assert "<td>4 ± 0</td>" in sophia_row and "<td>0.500 ± 0.000</td>" in sophia_row  # total ‖Δθ‖, clip fraction
    out = capsys.readouterr().out
    assert ("GradDiff: Sophia ρ=0.04 (SO) beats AdamW (FO) (paired t over 3 seeds: p = 0.035, Holm 0.035): "
            "forget quality 0.5 ± 0.1 vs 0.2 ± 0.1") in out


# ----------------------------------------------------------------------------------------------- verdict
def _row(opt, fq, fq_std, mu=0.5, mu_std=0.01, n=3, total=None, kind=None):
    return {"name": f"graddiff-{opt}", "label": opt, "role": "unlearned", "objective": "graddiff",
            "optimizer": opt, "optimizer_type": kind or opt, "n": n, "forget_quality": fq,
            "forget_quality_std": fq_std, "model_utility": mu, "model_utility_std": mu_std,
            "update_norm_total": total}


def test_overlapping_intervals_say_no_difference():
    # 0.30 ± 0.10 = [0.2, 0.4] overlaps 0.45 ± 0.10 = [0.35, 0.55]: a mean difference of 0.15, not separated.
    v = compare(_row("sophia", 0.45, 0.10), _row("adamw", 0.30, 0.10))
    assert v["verdict"] == NO_DIFFERENCE and "no difference measured" in v["sentence"]
    assert not v["moved_further"]


def test_separated_intervals_say_beats_or_worse():
    assert compare(_row("sophia", 0.60, 0.05), _row("adamw", 0.30, 0.10))["verdict"] == BEATS
    assert compare(_row("sophia", 0.05, 0.05), _row("adamw", 0.30, 0.10))["verdict"] == WORSE
    # Better forgetting bought with utility whose interval lies below the baseline's: not a win.
    assert compare(_row("sophia", 0.60, 0.05, mu=0.3), _row("adamw", 0.30, 0.10, mu=0.5))["verdict"] == MIXED


def test_one_seed_measures_no_spread():
    v = compare(_row("sophia", 0.9, None, n=1), _row("adamw", 0.1, None, n=1))
    assert v["verdict"] == NO_DIFFERENCE and "fewer than two seeds" in v["sentence"]


def test_moving_further_is_flagged():
    v = compare(_row("sophia", 0.45, 0.10, total=3.1), _row("adamw", 0.30, 0.10, total=2.0))
    assert v["moved_further"] and "moved further" in v["sentence"] and "1.6×" in v["sentence"]
    assert not compare(_row("sophia", 0.45, 0.10, total=2.9), _row("adamw", 0.30, 0.10, total=2.0))["moved_further"]


def test_every_other_optimizer_is_compared_with_adamw_per_objective():
    rows = [_row("sophia", 0.5, 0.1), _row("adamw", 0.3, 0.1), _row("signum", 0.3, 0.1),
            {**_row("adamw", 0.3, 0.1), "objective": "npo"}]
    out = verdicts(rows)
    assert [(v["optimizer"], v["baseline"]) for v in out] == [("sophia", "adamw"), ("signum", "adamw")]


# ------------------------------------------------------------------------------------------ sweep best lr
def test_sweep_best_lr_is_averaged_over_seeds_and_edges_warn():
    points = []
    for lr, fq, mu in [(1e-5, 0.1, 0.6), (1e-4, 0.5, 0.59), (1e-3, 0.9, 0.2)]:
        for seed, jitter in ((0, -0.05), (1, 0.05)):
            points.append({"name": f"a-{lr}-s{seed}", "group": f"a-{lr}", "seed": seed, "optimizer": "adamw",
                           "lr": lr, "forget_quality": fq + jitter, "model_utility": mu})
    for lr, fq in [(1e-5, 0.2), (1e-4, 0.4)]:
        points.append({"name": f"s-{lr}", "group": f"s-{lr}", "seed": 0, "optimizer": "sophia", "lr": lr,
                       "forget_quality": fq, "model_utility": 0.6})
    summary = sweep_summary({"points": points}, t_mu=0.62, fraction=0.95)
    settings = summary["settings"]
    assert len(settings) == 5 and settings[1]["n"] == 2
    assert settings[1]["forget_quality"] == pytest.approx(0.5)
    assert settings[1]["forget_quality_std"] == pytest.approx(0.1 / math.sqrt(2))
    # AdamW: lr 1e-3 forgets best but drops utility below 0.95 x 0.62; its best is 1e-4, inside the grid.
    assert summary["best"] == {"adamw": 1, "sophia": 4}
    assert summary["edge_warnings"] == ["sophia: the best lr (0.0001) is the largest of the grid [1e-05, 0.0001]; "
                                        "widen the grid"]
    assert edge_warnings([{"optimizer": "x", "lr": 1.0}], {"x": 0}) == [
        "x: only lr=1.0 was tried; the best lr is unknown"]


def test_sweep_report_shows_best_lr_and_warning(tmp_path):
    results = seeded_results()
    results["sweep"] = {"objective": "graddiff", "points": [
        {"name": "a1", "group": "a1", "optimizer": "adamw", "lr": 1e-5, "forget_quality": 0.1, "model_utility": 0.59},
        {"name": "a2", "group": "a2", "optimizer": "adamw", "lr": 1e-4, "forget_quality": 0.2, "model_utility": 0.59},
        {"name": "a2s1", "group": "a2", "seed": 1, "optimizer": "adamw", "lr": 1e-4, "forget_quality": 0.3,
         "model_utility": 0.58}]}
    files = write_report(results, tmp_path, stream=None)
    assert json.loads(files["results.json"].read_text())["sweep"]["settings"][1]["n"] == 2
    assert files["pareto.png"].read_bytes().startswith(b"\x89PNG")
    html = files["report.html"].read_text()
    assert "Each optimizer at its best setting" in html and "best lr 0.0001" in html
    assert "WARNING" in html and "largest of the grid" in html


def test_a_sweep_report_has_no_per_setting_verdicts(tmp_path):
    """Sweep rows are lr settings of one objective; comparing each with the first AdamW setting is meaningless."""
    from soul.report import write_report

    runs, points = [], []
    for opt, lr, fq in (("adamw", 1e-5, 0.01), ("adamw", 1e-4, 0.4), ("sophia", 1e-4, 0.8)):
        for seed in (0, 1):
            name = f"sweep-graddiff-{opt}-lr{lr}-s{seed}"
            runs.append({"name": name, "group": name[:-3], "seed": seed, "role": "unlearned",
                         "objective": "graddiff", "optimizer": opt, "optimizer_type": opt, "label": f"{opt} lr={lr}",
                         "metrics": {"forget_quality": {"agg_value": fq + 0.01 * seed},
                                     "model_utility": {"agg_value": 0.47}}})
            points.append({"name": name, "optimizer": opt, "lr": lr, "seed": seed,
                           "forget_quality": fq + 0.01 * seed, "model_utility": 0.47})
    results = {"meta": {"command": "sweep"}, "runs": runs, "sweep": {"objective": "GradDiff", "points": points}}
    write_report(results, tmp_path, stream=None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdicts"] == []
    assert "## Verdict" not in (tmp_path / "table.md").read_text()


def test_a_seed_with_a_nan_metric_is_not_counted_and_is_named():
    """One Sophia seed's forget quality is NaN (stored as null in results.json): the mean, the std and
    the verdict's n use the 2 finite values, and the report says which seed lacked it (it printed n = 3)."""
    for missing in (None, math.nan):
        results = seeded_results()
        sophia_s2 = next(r for r in results["runs"] if r["name"] == "graddiff-sophia-s2")
        sophia_s2["metrics"]["forget_quality"]["agg_value"] = missing
        row = next(r for r in table_rows(results) if r["name"] == "graddiff-sophia")
        assert row["n"] == 3 and row["forget_quality_n"] == 2
        assert row["forget_quality"] == pytest.approx(0.45) and row["forget_quality_std"] == pytest.approx(0.0707, abs=1e-4)
        assert row["forget_quality_missing"] == [f"seed 2 ({'null' if missing is None else 'nan'})"]
        [v] = verdicts(table_rows(results))
        assert "(n = 2 vs 3 seeds; Sophia ρ=0.04 (SO): forget quality missing (null/NaN) for seed 2" in v["sentence"]


def test_the_report_warns_about_a_missing_seed_value(tmp_path):
    results = seeded_results()
    next(r for r in results["runs"] if r["name"] == "graddiff-sophia-s1")["metrics"]["model_utility"]["agg_value"] = None
    files = write_report(results, tmp_path, stream=None)
    data = json.loads(files["results.json"].read_text())
    line = ("GradDiff + Sophia ρ=0.04 (SO): Model utility missing (null/NaN) for seed 1 (null); the mean is over 2 "
            "of 3 seeds")
    assert line in data["problems"]
    assert line in files["report.html"].read_text()
    assert "model utility missing (null/NaN) for seed 1" in files["table.md"].read_text()
