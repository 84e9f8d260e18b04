"""Robustness in the report: attack recoveries aggregated over seeds like any column, signed values not
flagged, the recovery plot and the robustness verdict (same test as the forget-quality verdict),
on synthetic results with hand-checkable numbers."""

from __future__ import annotations

import json
import math

import pytest

from soul.report import table_rows, write_report
from soul.report.results import ROBUSTNESS_COLUMNS, check_row_ranges, visible_columns
from soul.report.verdict import (
    LESS_RECOVERED,
    MORE_RECOVERED,
    NO_DIFFERENCE,
    compare_recovery,
    robustness_verdicts,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(obj, opt, seed, relearn, quant4, fq=0.3):
    return {"name": f"{obj}-{opt}-s{seed}", "group": f"{obj}-{opt}", "seed": seed, "role": "unlearned",
            "objective": obj, "optimizer": opt, "optimizer_type": opt, "config": {"seed": seed},
            "metrics": {"forget_quality": {"agg_value": fq}, "model_utility": {"agg_value": 0.5}},
            "attacks": {"relearn_recovery_prob": relearn, "relearn_recovery_rouge": None,
                        "relearn_excess_prob": None if relearn is None else relearn - 0.2,
                        "quant4_recovery_prob": quant4, "quant4_recovery_rouge": None}}


def attacked_results(seeds=(0, 1, 2)):
    runs = [{"name": "target", "role": "target", "metrics": {"model_utility": {"agg_value": 0.6}},
             "attacks": {"relearn_recovery_prob": None, "quant4_recovery_prob": 0.01}},
            {"name": "retain", "role": "retain", "metrics": {"model_utility": {"agg_value": 0.6}},
             "attacks": {"relearn_recovery_prob": 0.2, "quant4_recovery_prob": None}}]
    # AdamW: 4-bit 0.30 ± 0.05; Sophia: 0.10 ± 0.05, 0.2 lower on every seed give or take ~0.005 (a constant
    # shift would be "no spread": the three values are AdamW's, shifted and turned by 0.1 rad on the circle of
    # triples with that mean and std), paired p ≈ 1e-4; relearning 0.5 ± 0.1 for both, identical: p = 1.
    r_ = 2 * 0.05 / math.sqrt(3)
    quant_so = [0.10 + r_ * math.cos(5 * math.pi / 6 + 0.1 + 2 * math.pi * k / 3) for k in range(3)]
    for s, (qa, qs, r) in enumerate(list(zip((0.25, 0.30, 0.35), quant_so, (0.4, 0.5, 0.6)))[:len(seeds)]):
        runs.append(_run("graddiff", "adamw", s, r, qa))
        runs.append(_run("graddiff", "sophia", s, r, qs))
    runs.append(_run("npo", "adamw", 0, -0.5, 0.02))  # a negative recovery: a result, not a range problem
    runs.append(_run("npo", "sophia", 0, -0.4, 0.03))
    return {"meta": {}, "runs": runs}


def test_quantization_columns_cover_every_bit_width_the_attack_allows():
    from soul.attack.quantization import MAX_BITS, MIN_BITS

    keys = {c.key for c in ROBUSTNESS_COLUMNS}
    assert {f"quant{b}_recovery_prob" for b in range(MIN_BITS, MAX_BITS + 1)} <= keys
    assert all(c.group == "robustness" and not c.bounded for c in ROBUSTNESS_COLUMNS)


def test_recoveries_are_mean_and_std_over_seeds_and_only_measured_columns_show():
    rows = {r["name"]: r for r in table_rows(attacked_results())}
    so = rows["graddiff-sophia"]
    assert so["quant4_recovery_prob"] == pytest.approx(0.10) and so["quant4_recovery_prob_std"] == pytest.approx(0.05)
    assert so["relearn_excess_prob"] == pytest.approx(0.3) and so["relearn_recovery_rouge"] is None
    assert rows["retain"]["relearn_recovery_prob"] == 0.2 and rows["target"]["quant4_recovery_prob"] == 0.01
    shown = [c.key for c in visible_columns(list(rows.values()))]
    assert "quant4_recovery_prob" in shown and "relearn_excess_prob" in shown
    assert "quant8_recovery_prob" not in shown and "relearn_recovery_rouge" not in shown  # no values
    assert shown[-1] == "wall_time_s"


def test_negative_recoveries_are_not_range_problems_but_non_finite_ones_are():
    rows = table_rows(attacked_results())
    assert rows[-2]["relearn_recovery_prob"] == -0.5 and check_row_ranges(rows) == []
    rows[-2]["quant4_recovery_prob"] = float("inf")
    assert any("4-bit recovery (prob.) is inf" in p for p in check_row_ranges(rows))


def _row(opt, mean, std, n=3, key="quant4_recovery_prob"):
    return {"name": f"graddiff-{opt}", "label": opt, "optimizer_label": opt, "role": "unlearned",
            "objective": "graddiff", "optimizer": opt, "optimizer_type": opt, "n": n, key: mean, f"{key}_std": std}


def test_recovery_verdict_uses_the_interval_rule():
    key = "quant4_recovery_prob"
    assert compare_recovery(_row("sophia", 0.10, 0.05), _row("adamw", 0.30, 0.05), key)["verdict"] == LESS_RECOVERED
    assert compare_recovery(_row("sophia", 0.50, 0.05), _row("adamw", 0.30, 0.05), key)["verdict"] == MORE_RECOVERED
    # [0.15, 0.35] overlaps [0.25, 0.35]: a mean difference, not separated.
    v = compare_recovery(_row("sophia", 0.25, 0.10), _row("adamw", 0.30, 0.05), key)
    assert v["verdict"] == NO_DIFFERENCE and v["attack"] == key
    one = compare_recovery(_row("sophia", 0.0, None, n=1), _row("adamw", 0.9, None, n=1), key)
    assert one["verdict"] == NO_DIFFERENCE and "fewer than two seeds" in one["sentence"]
    assert v["sentence"].startswith("GradDiff: 4-bit recovery (prob.) of sophia 0.25 ± 0.1 vs adamw 0.3 ± 0.05")


def test_robustness_verdicts_per_objective_optimizer_and_attack():
    out = robustness_verdicts(table_rows(attacked_results()))
    got = {(v["objective"], v["optimizer"], v["attack"]): v["verdict"] for v in out}
    assert got == {("graddiff", "sophia", "relearn_recovery_prob"): NO_DIFFERENCE,
                   ("graddiff", "sophia", "quant4_recovery_prob"): LESS_RECOVERED,
                   ("npo", "sophia", "relearn_recovery_prob"): NO_DIFFERENCE,
                   ("npo", "sophia", "quant4_recovery_prob"): NO_DIFFERENCE}
    assert all(v["baseline"] == "adamw" for v in out)


def test_report_has_robustness_section_plot_and_verdicts(tmp_path, capsys):
    files = write_report(attacked_results(), tmp_path, stream="stdout")
    assert files["recovery.png"].read_bytes().startswith(PNG_MAGIC)
    data = json.loads(files["results.json"].read_text())
    assert data["problems"] == []
    [v] = [v for v in data["robustness_verdicts"] if v["attack"] == "quant4_recovery_prob"
           and v["objective"] == "graddiff"]
    assert v["verdict"] == LESS_RECOVERED and "0.1 ± 0.05 vs AdamW (FO) 0.3 ± 0.05" in v["sentence"]
    html = files["report.html"].read_text()
    assert "<h2>Robustness</h2>" in html and v["sentence"] in html.replace("&#x27;", "'")
    assert "4-bit recovery (prob.)" in html
    md = files["table.md"].read_text()
    assert "## Robustness" in md and "less recovered (more robust)" in md
    assert v["sentence"] in capsys.readouterr().out
    # The robustness columns are redrawn from results.json alone (runs keep their `attacks`).
    again = write_report(json.loads(files["results.json"].read_text()), tmp_path / "again", stream=None)
    assert json.loads(again["results.json"].read_text())["robustness_verdicts"] == data["robustness_verdicts"]


def test_a_report_without_attacks_has_no_robustness():
    results = attacked_results()
    for run in results["runs"]:
        run.pop("attacks")
    rows = table_rows(results)
    assert not any(c.group == "robustness" for c in visible_columns(rows))
    assert robustness_verdicts(rows) == []
