"""The report functions on synthetic results with hand-checkable numbers."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from soul.report import best_at_utility, markdown_table, pareto_front, table_rows, write_report
from soul.report.results import COLUMNS, check_row_ranges, extract_examples, read_loss_curve
from soul.report.table import format_value, text_table
from soul.report.write import best_marks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _m(fq, rouge, prob, tr, mia, mu, rrouge, gens=None):
    rouge_entry = {"agg_value": rouge, "value_by_index": {}}
    for i, (q, a, g) in enumerate(gens or []):
        rouge_entry["value_by_index"][str(i)] = {"score": 0.5, "question": q, "ground_truth": a, "generation": g}
    return {"forget_quality": {"agg_value": fq, "value_by_index": {}}, "forget_Q_A_ROUGE": rouge_entry,
            "forget_Q_A_Prob": {"agg_value": prob}, "forget_truth_ratio": {"agg_value": tr},
            "mia_min_k": {"agg_value": mia}, "model_utility": {"agg_value": mu},
            "retain_Q_A_ROUGE": {"agg_value": rrouge}}


def synthetic_results(tmp_path=None):
    """Runs deliberately listed out of table order."""
    runs = [
        {"name": "npo-sophia", "role": "unlearned", "objective": "npo", "optimizer": "sophia", "wall_time_s": 30.0,
         "metrics": _m(0.5, 0.2, 0.1, 0.7, 0.55, 0.60, 0.5)},
        {"name": "influence", "role": "influence", "wall_time_s": 5.0,
         "metrics": _m(1e-4, 0.6, 0.5, 0.5, 0.8, 0.62, 0.6)},
        {"name": "graddiff-sophia", "role": "unlearned", "objective": "graddiff", "optimizer": "sophia",
         "wall_time_s": 95.0, "metrics": _m(0.2, 0.3, 0.2, 0.6, 0.6, 0.58, 0.55),
         "curve": [[1, 3.0], [2, 2.0], [3, 1.0]]},
        {"name": "retain", "role": "retain", "wall_time_s": 100.0, "metrics": _m(1.0, 0.4, 0.3, 0.65, 0.5, 0.61, 0.7)},
        {"name": "graddiff-adamw", "role": "unlearned", "objective": "graddiff", "optimizer": "adamw",
         "wall_time_s": 60.0, "metrics": _m(0.01, 0.5, 0.4, 0.55, 0.7, 0.59, 0.6),
         "curve": [[1, 3.0], [2, 2.5], [3, 2.2]]},
        {"name": "npo-adamw", "role": "unlearned", "objective": "npo", "optimizer": "adamw", "wall_time_s": 31.0,
         "metrics": _m(0.3, 0.25, 0.15, 0.66, 0.52, 0.40, 0.3)},
        {"name": "target", "role": "target", "wall_time_s": 120.0,
         "metrics": _m(2e-6, 0.9, 0.9, 0.4, 0.95, 0.60, 0.9,
                       gens=[("Who is <A&B>?", "An author.", "A <b>writer</b>."), ("Q2", "A2", "G2"),
                             ("Q3", "A3", "G3"), ("Q4", "A4", "G4")])},
    ]
    return {"meta": {"preset": "synthetic"}, "runs": runs}


def test_table_order_labels_and_values():
    rows = table_rows(synthetic_results())
    assert [r["label"] for r in rows] == [
        "Original (target)", "Retain", "NPO + AdamW (FO)", "NPO + Sophia (SO)",
        "GradDiff + AdamW (FO)", "GradDiff + Sophia (SO)", "Influence (one-shot)"]
    npo_so = rows[3]
    assert npo_so["forget_quality"] == 0.5 and npo_so["mia_auc"] == 0.55 and npo_so["wall_time_s"] == 30.0
    assert npo_so["retain_rouge"] == 0.5 and npo_so["forget_truth_ratio"] == 0.7


def test_mia_falls_back_to_loss_attack_and_missing_is_none():
    res = {"runs": [{"name": "t", "role": "target", "metrics": {"mia_loss": {"agg_value": 0.7}}}]}
    row = table_rows(res)[0]
    assert row["mia_auc"] == 0.7 and row["forget_quality"] is None and row["wall_time_s"] is None


def test_markdown_table_contents():
    md = markdown_table(table_rows(synthetic_results()))
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 7
    assert lines[0].startswith("| Method | Forget quality | KS stat. | Forget ROUGE-L |")
    target = lines[2].split("|")
    assert target[1].strip() == "Original (target)"
    assert target[2].strip() == "2.00e-06"  # p-values below 0.01 in scientific notation
    assert target[3].strip() == "–"  # no KS statistic recorded
    assert target[8].strip() == "0.600"
    assert target[10].strip() == "2m00s"
    assert lines[6].split("|")[10].strip() == "1m00s" and lines[4].split("|")[10].strip() == "31.0 s"
    assert "Clip frac." not in lines[0]  # no run recorded diagnostics: no diagnostics columns


def test_text_table_aligned():
    text = text_table(table_rows(synthetic_results()))
    lines = text.rstrip("\n").splitlines()
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert "GradDiff + Sophia (SO)" in text


def test_format_value():
    fq = COLUMNS[0]
    assert format_value(fq, 0.0) == "0.000" and format_value(fq, 0.005) == "5.00e-03"
    assert format_value(fq, None) == "–"


def test_bad_results_named_clearly():
    with pytest.raises(ValueError, match=r"runs\[0\].role"):
        table_rows({"runs": [{"role": "teacher"}]})
    with pytest.raises(ValueError, match=r"runs\[1\].*objective"):
        table_rows({"runs": [{"role": "target"}, {"name": "x", "role": "unlearned", "optimizer": "adamw"}]})


def test_range_check():
    rows = [{"label": "x", "forget_quality": 1.5, "mia_auc": float("nan"), "wall_time_s": -1.0}]
    problems = check_row_ranges(rows)
    assert len(problems) == 3 and "Forget quality = 1.5 is outside [0, 1]" in problems[0]
    assert check_row_ranges(table_rows(synthetic_results())) == []


def test_pareto_front_hand_checked():
    pts = [{"forget_quality": fq, "model_utility": mu} for fq, mu in
           [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.05, 0.95), (0.1, 0.8)]]
    # (0.4,0.4) is dominated by (0.5,0.5); (0.1,0.8) by (0.1,0.9); duplicates both stay.
    assert pareto_front(pts) == [3, 1, 4, 0, 5]
    assert pareto_front([]) == []
    with pytest.raises(ValueError, match=r"point 0.*forget_quality"):
        pareto_front([{"model_utility": 0.3}])


def test_best_at_utility_hand_checked():
    pts = [
        {"optimizer": "adamw", "forget_quality": 0.9, "model_utility": 0.70},   # below the floor 0.76
        {"optimizer": "adamw", "forget_quality": 0.3, "model_utility": 0.76},   # exactly at the floor
        {"optimizer": "adamw", "forget_quality": 0.2, "model_utility": 0.79},
        {"optimizer": "sophia", "forget_quality": 0.4, "model_utility": 0.77},
        {"optimizer": "sophia", "forget_quality": 0.4, "model_utility": 0.80},  # tie on FQ: higher utility
        {"optimizer": "sgd", "forget_quality": 0.99, "model_utility": 0.10},
    ]
    assert best_at_utility(pts, target_utility=0.8) == {"adamw": 1, "sophia": 4, "sgd": None}
    # with fraction 0.1 the floor is 0.08: adamw's best FQ is point 0; sophia tie -> higher utility (4).
    assert best_at_utility(pts, target_utility=0.8, fraction=0.1) == {"adamw": 0, "sophia": 4, "sgd": 5}


def test_best_marks_per_optimizer_in_table():
    rows = table_rows(synthetic_results())
    # target utility 0.60 -> floor 0.57. AdamW: graddiff (0.01, 0.59) qualifies, npo (0.3, 0.40) does not.
    # Sophia: npo (0.5, 0.60) beats graddiff (0.2, 0.58). Influence (1e-4, 0.62) is its own group.
    assert best_marks(rows) == {"graddiff-adamw": "★", "npo-sophia": "★", "influence": "★"}


def test_extract_examples_and_loss_curve(tmp_path):
    metrics = synthetic_results()["runs"][-1]["metrics"]
    ex = extract_examples(metrics, "forget", n=3)
    assert [e["question"] for e in ex] == ["Who is <A&B>?", "Q2", "Q3"]
    assert extract_examples(metrics, "retain") == []
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.5, "lr": 1e-5}\n{"event": "eval"}\n\n{"step": 2, "loss": 2.0}\n')
    assert read_loss_curve(log) == [[1.0, 2.5], [2.0, 2.0]]
    log.write_text('{"step": 1, "loss": 2.5}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_loss_curve(log)


def test_write_report_files_and_html_embeds_images(tmp_path):
    results = synthetic_results()
    results["sweep"] = {"objective": "graddiff", "points": [
        {"optimizer": "adamw", "lr": 1e-5, "forget_quality": 0.1, "model_utility": 0.59},
        {"optimizer": "adamw", "lr": 1e-4, "forget_quality": 0.6, "model_utility": 0.3},
        {"optimizer": "sophia", "lr": 1e-5, "forget_quality": 0.3, "model_utility": 0.58},
    ]}
    files = write_report(results, tmp_path / "rep", stream=None)
    assert set(files) == {"results.json", "table.md", "fq_vs_utility.png", "loss_curves.png", "metric_bars.png",
                          "pareto.png", "report.html"}
    for name, path in files.items():
        assert path.is_file() and path.stat().st_size > 0
        if name.endswith(".png"):
            assert path.read_bytes().startswith(PNG_MAGIC)
    assert not list((tmp_path / "rep").glob(".*tmp"))  # no temp files left behind
    html = files["report.html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 4
    embedded = {base64.b64decode(u) for u in uris}
    assert files["pareto.png"].read_bytes() in embedded and files["fq_vs_utility.png"].read_bytes() in embedded
    assert "<script" not in html and 'src="http' not in html  # self-contained
    assert "Who is &lt;A&amp;B&gt;?" in html and "A &lt;b&gt;writer&lt;/b&gt;." in html  # escaped
    assert "<td>GradDiff + Sophia (SO)</td>" in html and "<td>NPO + Sophia (SO) ★</td>" in html
    data = json.loads(files["results.json"].read_text())
    assert [r["label"] for r in data["table"]][:2] == ["Original (target)", "Retain"]
    assert data["sweep"]["best"] == {"adamw": 0, "sophia": 2}  # floor 0.57: lr=1e-4 (utility 0.3) excluded
    assert sorted(data["sweep"]["fronts"]["adamw"]) == [0, 1]
    assert data["runs"][2]["curve"] == [[1, 3.0], [2, 2.0], [3, 1.0]]
    assert data["runs"][-1]["examples"]["forget"][0]["generation"] == "A <b>writer</b>."
    assert "value_by_index" not in json.dumps(data)  # compact: aggregates only
    assert "★" in files["table.md"].read_text()


def test_report_redraws_from_its_own_results_json(tmp_path):
    files = write_report(synthetic_results(), tmp_path / "a", stream=None)
    again = write_report(json.loads(files["results.json"].read_text()), tmp_path / "b", stream=None)
    assert again["table.md"].read_text() == files["table.md"].read_text()
    assert set(again) == set(files)


def test_report_nonfinite_numbers_become_null_and_warn(tmp_path, capsys):
    results = synthetic_results()
    results["runs"][0]["metrics"]["forget_quality"]["agg_value"] = math.nan
    files = write_report(results, tmp_path, stream=None)
    data = json.loads(files["results.json"].read_text())  # strict JSON despite the NaN
    # the NaN is left out of the mean (no seed has a value) and named
    assert any(p.startswith("NPO + Sophia (SO): Forget quality missing (null/NaN) for npo-sophia (nan)")
               for p in data["problems"])


def test_labels_with_dollar_signs_and_backslashes_are_drawn_as_text(tmp_path):
    """Method labels with `$` (and backslashes) were parsed as matplotlib mathtext: a pair of `$` around text that
    is not valid TeX made `soul report` fail and write nothing. Labels are literal text: every file is written."""
    results = synthetic_results()
    # invalid as TeX: "x^" lacks its superscript, \notacommand is no symbol; "_" alone is a syntax error
    for run, label in zip(results["runs"], ["cost $x^$ run", "a $\\notacommand$ b", "odd $ one", "x $_$ y"]):
        run["label"] = label
    results["runs"][0]["optimizer"] = "so$phia"  # drawn in the loss-curve legend (an unknown optimizer name)
    files = write_report(results, tmp_path, stream=None)
    for name in ("report.html", "table.md", "results.json", "fq_vs_utility.png", "metric_bars.png"):
        assert (tmp_path / name).is_file(), name
    assert files["fq_vs_utility.png"].read_bytes().startswith(PNG_MAGIC)
    assert "odd $ one" in files["table.md"].read_text()


def test_soul_report_command(tmp_path, capsys):
    from soul.cli import main

    files = write_report(synthetic_results(), tmp_path / "a", stream=None)
    assert main(["report", str(files["results.json"]), "--out", str(tmp_path / "b")]) == 0
    assert "GradDiff + Sophia (SO)" in capsys.readouterr().out
    assert (tmp_path / "b" / "report.html").is_file()
    bad = tmp_path / "eval.json"
    bad.write_text('{"forget_quality": {"agg_value": 0.5}}')
    assert main(["report", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "not a soul results.json" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown reproduce preset 'nope'" in capsys.readouterr().err
