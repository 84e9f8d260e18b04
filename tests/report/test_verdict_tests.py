"""The verdict is a stated test (issue 24, item 4): paired t by seed where seeds pair, Welch's t otherwise,
Holm's correction over every test of one report (forget quality and robustness), the degenerate cases
(no spread, one constant difference, fewer than two seeds) and the fields the report files carry — on
synthetic results whose p-values are checked against scipy and hand computations."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

import soul.report.verdict as V
from soul.report import table_rows, write_report
from soul.report.results import aggregate


def _run(obj, opt, seed, fq, mu=0.5, relearn=None):
    run = {"name": f"{obj}-{opt}-s{seed}", "group": f"{obj}-{opt}", "role": "unlearned", "objective": obj,
           "optimizer": opt, "optimizer_type": opt,
           "metrics": {"forget_quality": {"agg_value": fq}, "model_utility": {"agg_value": mu}}}
    if seed is not None:
        run["seed"] = seed
    if relearn is not None:
        run["attacks"] = {"relearn_recovery_prob": relearn}
    return run


def _results(*settings):
    """`settings`: (objective, optimizer, seeds, forget qualities[, utilities[, relearning recoveries]])."""
    runs = []
    for obj, opt, seeds, fqs, *rest in settings:
        mus = rest[0] if rest else [0.5] * len(fqs)
        rel = rest[1] if len(rest) > 1 else [None] * len(fqs)
        runs += [_run(obj, opt, s, f, m, r) for s, f, m, r in zip(seeds, fqs, mus, rel)]
    return {"meta": {}, "runs": runs}


def _holm_by_definition(ps):
    """Holm from its definition: sort ascending, p₍ᵢ₎ ↦ max over j ≤ i of min(1, (m − j + 1) p₍ⱼ₎)."""
    m = len(ps)
    ranked = sorted(ps)
    adjusted_sorted = [max(min(1.0, (m - j) * ranked[j]) for j in range(i + 1)) for i in range(m)]
    return [adjusted_sorted[ranked.index(p)] for p in ps]


# ------------------------------------------------------------------------------------------- paired t
def test_overlapping_intervals_with_a_consistent_paired_difference_beat():
    """Sophia is 0.05, 0.06, 0.04 above AdamW on the same seeds: the ±1 std intervals overlap (the old rule
    said no difference), the paired t-test says p = 0.013."""
    adamw, sophia = [0.10, 0.30, 0.50], [0.15, 0.36, 0.54]
    rows = table_rows(_results(("graddiff", "adamw", [0, 1, 2], adamw), ("graddiff", "sophia", [0, 1, 2], sophia)))
    so, ad = rows[1], rows[0]
    assert so["forget_quality"] - so["forget_quality_std"] < ad["forget_quality"] + ad["forget_quality_std"]
    [v] = V.verdicts(rows)
    p = stats.ttest_rel(sophia, adamw).pvalue
    assert p == pytest.approx(0.01307, abs=1e-5)
    assert v["verdict"] == V.BEATS and v["test"] == "paired t" and v["n_pairs"] == 3
    assert v["p_value"] == pytest.approx(p) and v["p_holm"] == pytest.approx(p)  # a family of one
    assert "beats AdamW (FO) (paired t over 3 seeds: p = 0.013, Holm 0.013)" in v["sentence"]


def test_pairs_only_on_the_common_seeds():
    """Seeds 0-2 vs 1-3: the two common seeds pair (the others are left out); one common seed: Welch."""
    results = _results(("graddiff", "adamw", [1, 2, 3], [0.30, 0.50, 0.9]),
                       ("graddiff", "sophia", [0, 1, 2], [0.0, 0.36, 0.54]))
    [v] = V.verdicts(table_rows(results))
    assert v["test"] == "paired t" and v["n_pairs"] == 2
    assert v["p_value"] == pytest.approx(stats.ttest_rel([0.36, 0.54], [0.30, 0.50]).pvalue)
    results = _results(("graddiff", "adamw", [2, 3, 4], [0.30, 0.50, 0.9]),
                       ("graddiff", "sophia", [0, 1, 2], [0.0, 0.36, 0.54]))
    [v] = V.verdicts(table_rows(results))
    assert v["test"] == "Welch t" and v["n_pairs"] is None
    assert v["p_value"] == pytest.approx(stats.ttest_ind([0.0, 0.36, 0.54], [0.30, 0.50, 0.9], equal_var=False).pvalue)


# ------------------------------------------------------------------------------------------- Welch t
@pytest.mark.parametrize("seeds", [([3, 4, 5], [0, 1, 2]), ([None] * 3, [None] * 3)], ids=["disjoint", "no-seed"])
def test_the_readme_example_is_no_difference_by_welch(seeds):
    """The README's "calibrated Sophia is worse than AdamW": forget quality 0.039 ± 0.023 vs 0.129 ± 0.067 at
    n = 3. On seeds that do not pair, or runs that record no seed (an older results.json), Welch's t gives
    p ≈ 0.13: no difference measured."""
    sophia, adamw = [0.016, 0.039, 0.062], [0.062, 0.129, 0.196]  # mean ± (−std, 0, +std): exact mean and std
    rows = table_rows(_results(("graddiff", "adamw", seeds[1], adamw), ("graddiff", "sophia", seeds[0], sophia)))
    assert rows[1]["forget_quality"] == pytest.approx(0.039) and rows[1]["forget_quality_std"] == pytest.approx(0.023)
    assert rows[0]["forget_quality"] == pytest.approx(0.129) and rows[0]["forget_quality_std"] == pytest.approx(0.067)
    [v] = V.verdicts(rows)
    assert v["verdict"] == V.NO_DIFFERENCE and v["test"] == "Welch t" and v["n_pairs"] is None
    assert v["p_value"] == pytest.approx(0.1343, abs=1e-4)
    assert v["p_value"] == pytest.approx(stats.ttest_ind(sophia, adamw, equal_var=False).pvalue)
    assert "shows no difference measured against AdamW (FO) (Welch t: p = 0.13, Holm 0.13)" in v["sentence"]


# ---------------------------------------------------------------------------------------------- Holm
def test_holm_matches_a_hand_computed_sequence():
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 → ×5, ×4, ×3, ×2, ×1 = 0.025, 0.04, 0.09, 0.08, 0.5 → running max
    assert V.holm([0.01, 0.04, 0.03, 0.005, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    assert V.holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1
    assert V.holm([0.02]) == [0.02] and V.holm([]) == []
    ps = [0.2, 0.001, 0.03, 0.03, 0.049]
    assert V.holm(ps) == pytest.approx(_holm_by_definition(ps))


def test_one_family_over_forget_quality_and_robustness_and_holm_decides():
    """Two objectives × (forget quality, relearning recovery) = 4 tests in one family. GradDiff's forget
    quality stays a win after Holm; NPO's has raw p = 0.047 but Holm 0.14: no difference measured, with both
    p's in the sentence."""
    seeds = [0, 1, 2]
    gd_a, gd_s = [0.10, 0.30, 0.50], [0.15, 0.355, 0.55]
    npo_a, npo_s = [0.10, 0.30, 0.50], [0.16, 0.33, 0.57]
    rel_gd_a, rel_gd_s = [0.4, 0.5, 0.6], [0.1, 0.5, 0.55]
    rel_npo_a, rel_npo_s = [0.4, 0.5, 0.6], [0.41, 0.52, 0.6]
    results = _results(("graddiff", "adamw", seeds, gd_a, [0.5] * 3, rel_gd_a),
                       ("graddiff", "sophia", seeds, gd_s, [0.5] * 3, rel_gd_s),
                       ("npo", "adamw", seeds, npo_a, [0.5] * 3, rel_npo_a),
                       ("npo", "sophia", seeds, npo_s, [0.5] * 3, rel_npo_s))
    perf, robust = V.all_verdicts(table_rows(results))
    raw = [stats.ttest_rel(s, a).pvalue for s, a in ((gd_s, gd_a), (npo_s, npo_a), (rel_gd_s, rel_gd_a),
                                                      (rel_npo_s, rel_npo_a))]
    got = perf + robust
    assert [v["p_value"] for v in got] == pytest.approx(raw)
    assert [v["p_holm"] for v in got] == pytest.approx(_holm_by_definition(raw))
    gd, npo = perf
    assert gd["p_value"] < 0.05 and gd["p_holm"] < 0.05 and gd["verdict"] == V.BEATS
    assert npo["p_value"] < 0.05 <= npo["p_holm"] and npo["verdict"] == V.NO_DIFFERENCE
    assert f"p = {npo['p_value']:.2g}, Holm {npo['p_holm']:.2g})" in npo["sentence"]
    # verdicts() and robustness_verdicts() alone give the same family's numbers as the report.
    assert V.verdicts(table_rows(results)) == perf and V.robustness_verdicts(table_rows(results)) == robust


# ----------------------------------------------------------------------------------------- edge cases
def test_identical_values_on_both_sides_give_p_one_not_nan():
    for seeds in ([0, 1, 2], [None] * 3):  # paired, and Welch (constant rows)
        fq = [0.2, 0.4, 0.3] if seeds[0] is not None else [0.3] * 3
        [v] = V.verdicts(table_rows(_results(("graddiff", "adamw", seeds, fq), ("graddiff", "sophia", seeds, fq))))
        assert v["p_value"] == 1.0 and v["p_holm"] == 1.0 and v["verdict"] == V.NO_DIFFERENCE
        assert "no spread" in v["sentence"] and "p = 1, Holm 1" in v["sentence"]


def test_a_constant_nonzero_paired_difference_uses_the_exact_sign_flip_p():
    """0.3 higher on every seed: t would be infinite; the exact sign-flip p is 2 / 2ⁿ — 0.25 at three seeds
    (no difference measured, where the old intervals separated), 0.031 at six (beats)."""
    rows = table_rows(_results(("graddiff", "adamw", [0, 1, 2], [0.1, 0.2, 0.3]),
                               ("graddiff", "sophia", [0, 1, 2], [0.4, 0.5, 0.6])))
    [v] = V.verdicts(rows)
    assert v["test"] == "paired t" and v["p_value"] == 0.25 and v["verdict"] == V.NO_DIFFERENCE
    assert "paired t over 3 seeds, the same difference on every seed, exact sign-flip p: p = 0.25, Holm 0.25" in v["sentence"]
    six = list(range(6))
    [v] = V.verdicts(table_rows(_results(("graddiff", "adamw", six, [0.1 * k for k in six]),
                                         ("graddiff", "sophia", six, [0.1 * k + 0.3 for k in six]))))
    assert v["p_value"] == pytest.approx(2 / 64) and v["verdict"] == V.BEATS


def test_two_constant_rows_use_the_exact_permutation_p():
    """No seeds, every run of a row the same value: Welch's t is undefined; the exact permutation p is
    2 / C(6, 3) = 0.1 at 3 vs 3, 1 / C(7, 3) at 3 vs 4 (the mirror split is less extreme)."""
    rows = table_rows(_results(("graddiff", "adamw", [None] * 3, [0.2] * 3),
                               ("graddiff", "sophia", [None] * 3, [0.5] * 3)))
    [v] = V.verdicts(rows)
    assert v["test"] == "Welch t" and v["p_value"] == pytest.approx(0.1) and v["verdict"] == V.NO_DIFFERENCE
    rows = table_rows(_results(("graddiff", "adamw", [None] * 3, [0.2] * 3),
                               ("graddiff", "sophia", [None] * 4, [0.5] * 4)))
    assert V.verdicts(rows)[0]["p_value"] == pytest.approx(1 / math.comb(7, 3))


def test_fewer_than_two_seeds_is_no_test_and_not_in_the_family():
    results = _results(("graddiff", "adamw", [0], [0.1]), ("graddiff", "sophia", [0], [0.9]),
                       ("npo", "adamw", [0, 1, 2], [0.10, 0.30, 0.50]), ("npo", "sophia", [0, 1, 2], [0.15, 0.36, 0.54]))
    one, npo = V.verdicts(table_rows(results))
    assert one["test"] is None and one["p_value"] is None and one["p_holm"] is None and one["n_pairs"] is None
    assert one["verdict"] == V.NO_DIFFERENCE and "no difference measured against AdamW (FO) (fewer than two seeds)" in one["sentence"]
    assert npo["p_holm"] == pytest.approx(npo["p_value"])  # a family of one: the untested pair does not count


# --------------------------------------------------------------------------------- utility qualifier
def test_significantly_lower_utility_unadjusted_makes_a_win_mixed():
    """Utility 0.02, 0.015, 0.02 lower on the same seeds (intervals overlap, paired p = 0.008): the win is
    mixed; utility significantly *higher* leaves it a win."""
    seeds, fa, fs = [0, 1, 2], [0.10, 0.30, 0.50], [0.15, 0.36, 0.54]
    mu_a, mu_s = [0.50, 0.55, 0.60], [0.48, 0.535, 0.58]
    [v] = V.verdicts(table_rows(_results(("graddiff", "adamw", seeds, fa, mu_a), ("graddiff", "sophia", seeds, fs, mu_s))))
    p_mu = stats.ttest_rel(mu_s, mu_a).pvalue
    assert v["verdict"] == V.MIXED and v["utility"]["p_value"] == pytest.approx(p_mu) and p_mu < 0.05
    assert f"model utility lower (paired t over 3 seeds: p = {p_mu:.2g}, unadjusted)" in v["sentence"]
    [v] = V.verdicts(table_rows(_results(("graddiff", "adamw", seeds, fa, mu_s), ("graddiff", "sophia", seeds, fs, mu_a))))
    assert v["verdict"] == V.BEATS


# ------------------------------------------------------------------------------------------ robustness
def test_robustness_verdicts_follow_the_same_test():
    """Relearning recovers 0.1, 0.15, 0.12 less after Sophia on the same seeds: the intervals overlap (the old
    rule said no difference), the paired test says less recovered; its Holm p counts the forget-quality test."""
    seeds, rel_a, rel_s = [0, 1, 2], [0.40, 0.55, 0.70], [0.30, 0.40, 0.58]
    results = _results(("graddiff", "adamw", seeds, [0.2, 0.3, 0.4], [0.5] * 3, rel_a),
                       ("graddiff", "sophia", seeds, [0.2, 0.3, 0.4], [0.5] * 3, rel_s))
    [v] = V.robustness_verdicts(table_rows(results))
    p = stats.ttest_rel(rel_s, rel_a).pvalue
    assert v["verdict"] == V.LESS_RECOVERED and v["test"] == "paired t" and v["n_pairs"] == 3
    assert v["p_value"] == pytest.approx(p) and v["p_holm"] == pytest.approx(min(1.0, 2 * p))  # with fq's p = 1
    assert v["sentence"].endswith(f"less recovered (more robust) (paired t over 3 seeds: p = {p:.2g}, "
                                  f"Holm {2 * p:.2g}).")
    [w] = V.robustness_verdicts(table_rows(_results(("graddiff", "adamw", seeds, [0.3] * 3, [0.5] * 3, rel_s),
                                                     ("graddiff", "sophia", seeds, [0.3] * 3, [0.5] * 3, rel_a))))
    assert w["verdict"] == V.MORE_RECOVERED


# ---------------------------------------------------------------------------------- per-seed values
def test_rows_carry_per_seed_values_of_the_tested_columns_only():
    results = _results(("graddiff", "adamw", [0, 1, 2], [0.1, math.nan, 0.3], [0.5, 0.6, 0.7], [0.4, 0.5, 0.6]))
    entry = next(e for e in aggregate(results) if e["name"] == "graddiff-adamw")
    assert entry["values"]["forget_quality"]["by_seed"] == {"0": 0.1, "2": 0.3}  # NaN left out
    assert entry["values"]["model_utility"]["by_seed"] == {"0": 0.5, "1": 0.6, "2": 0.7}
    assert entry["values"]["relearn_recovery_prob"]["by_seed"] == {"0": 0.4, "1": 0.5, "2": 0.6}
    assert "by_seed" not in entry["values"]["wall_time_s"]
    row = table_rows(results)[0]
    assert row["forget_quality_by_seed"] == {"0": 0.1, "2": 0.3} and "wall_time_s_by_seed" not in row
    # Two runs with one seed: which pairs is a guess, so nothing pairs (Welch on the means).
    twice = _results(("graddiff", "adamw", [0, 0, 1], [0.1, 0.2, 0.3]))
    assert table_rows(twice)[0]["forget_quality_by_seed"] == {}
    assert table_rows(_results(("graddiff", "adamw", [None] * 2, [0.1, 0.2])))[0]["forget_quality_by_seed"] == {}


def test_report_files_carry_the_test_and_both_p_values(tmp_path):
    results = _results(("graddiff", "adamw", [0, 1, 2], [0.10, 0.30, 0.50], [0.5] * 3, [0.40, 0.55, 0.70]),
                       ("graddiff", "sophia", [0, 1, 2], [0.15, 0.36, 0.54], [0.5] * 3, [0.30, 0.40, 0.58]))
    files = write_report(results, tmp_path, stream=None)
    data = json.loads(files["results.json"].read_text())
    [v], [r] = data["verdicts"], data["robustness_verdicts"]
    for entry in (v, r):
        assert entry["test"] == "paired t" and entry["n_pairs"] == 3
        assert 0 < entry["p_value"] < entry["p_holm"] < 0.05  # a family of two
    md, html = files["table.md"].read_text(), files["report.html"].read_text()
    for text in (V.RULE, v["sentence"], r["sentence"]):
        assert text in md and text in html.replace("&#x27;", "'"), text
    assert "Holm" in v["sentence"] and "intervals" not in html
    # Redrawn from results.json alone (per-seed values come back from its runs): the same verdicts.
    again = json.loads(write_report(data, tmp_path / "again", stream=None)["results.json"].read_text())
    assert again["verdicts"] == data["verdicts"] and again["robustness_verdicts"] == data["robustness_verdicts"]


# ------------------------------------------------------------------------------ the task's headline metric
def _task_run(opt, seed, metrics):
    return {"name": f"graddiff-{opt}-s{seed}", "group": f"graddiff-{opt}", "role": "unlearned", "seed": seed,
            "objective": "graddiff", "optimizer": opt, "optimizer_type": opt,
            "metrics": {k: {"agg_value": v} for k, v in metrics.items()}}


@pytest.mark.parametrize(("metric", "utility", "name"), [
    ("rtp_challenging_toxicity", "retain_answer_prob", "RTP challenging toxicity"),  # detox-cpu
    ("forget_toxicity", "retain_answer_prob", "forget toxicity"),                    # detox without RTP prompts
    ("forget_rougeL", "retain_rougeL", "forget ROUGE-L"),                            # copyright
    ("forget_mc_accuracy", "utility_mc_accuracy", "forget MC accuracy"),             # wmdp
])
def test_tasks_without_forget_quality_are_tested_on_their_own_metric_where_lower_is_better(metric, utility, name):
    """A detox / copyright / WMDP table has no forget quality: the verdict tests the task's forget metric
    (lower is better) seed by seed, instead of reporting "fewer than two seeds" for three seeds."""
    seeds, adamw, sophia = [0, 1, 2], [0.30, 0.50, 0.70], [0.25, 0.44, 0.66]  # lower on every seed
    runs = [_task_run("adamw", s, {metric: a, utility: 0.5}) for s, a in zip(seeds, adamw)]
    runs += [_task_run("sophia", s, {metric: b, utility: 0.5}) for s, b in zip(seeds, sophia)]
    rows = table_rows({"meta": {}, "runs": runs})
    assert V.headline(rows).metric in (metric, {"forget_rougeL": "forget_text_rouge"}.get(metric))
    [v] = V.verdicts(rows)
    p = stats.ttest_rel(sophia, adamw).pvalue
    assert p < 0.05 and v["test"] == "paired t" and v["n_pairs"] == 3 and v["p_value"] == pytest.approx(p)
    assert v["verdict"] == V.BEATS and f"{name} (lower is better)" in v["sentence"] and "(n = 3 vs 3 seeds" in v["sentence"]
    # the same numbers the other way round: the optimizer whose metric is higher is worse
    swapped = [dict(r, metrics={metric: r["metrics"][metric], utility: {"agg_value": 0.5}},
                    optimizer={"adamw": "sophia", "sophia": "adamw"}[r["optimizer"]],
                    optimizer_type={"adamw": "sophia", "sophia": "adamw"}[r["optimizer"]],
                    group="graddiff-" + {"adamw": "sophia", "sophia": "adamw"}[r["optimizer"]]) for r in runs]
    [w] = V.verdicts(table_rows({"meta": {}, "runs": swapped}))
    assert w["verdict"] == V.WORSE


def test_every_headline_names_table_columns_whose_direction_is_stated():
    """The verdict reads which way is better from the metric's column: a headline whose metric had no
    direction (None), or whose utility were not higher-is-better, would turn wins into losses silently."""
    from soul.columns import HEADLINES
    from soul.report.results import COLUMN_BY_KEY

    for h in HEADLINES:
        assert COLUMN_BY_KEY[h.metric].higher_is_better is (h.metric == "forget_quality"), h
        assert COLUMN_BY_KEY[h.utility].higher_is_better is True, h


def test_the_task_utility_qualifies_a_win_and_tofu_keeps_forget_quality():
    seeds = [0, 1, 2]
    runs = [_task_run("adamw", s, {"rtp_challenging_toxicity": a, "retain_answer_prob": u})
            for s, a, u in zip(seeds, [0.30, 0.50, 0.70], [0.50, 0.55, 0.60])]
    runs += [_task_run("sophia", s, {"rtp_challenging_toxicity": b, "retain_answer_prob": u})
             for s, b, u in zip(seeds, [0.25, 0.44, 0.66], [0.48, 0.535, 0.58])]
    [v] = V.verdicts(table_rows({"meta": {}, "runs": runs}))
    assert v["verdict"] == V.MIXED and "retain prob. lower (paired t" in v["sentence"]
    assert v["metric"] == "rtp_challenging_toxicity" and v["utility"]["metric"] == "retain_answer_prob"
    # Forget quality wins whenever a row has it (a TOFU table), even beside other columns.
    tofu = _results(("graddiff", "adamw", seeds, [0.10, 0.30, 0.50]), ("graddiff", "sophia", seeds, [0.15, 0.36, 0.54]))
    assert V.headline(table_rows(tofu)).metric == "forget_quality"
    [t] = V.verdicts(table_rows(tofu))
    assert t["verdict"] == V.BEATS and t["metric"] == "forget_quality" and "(lower is better)" not in t["sentence"]
