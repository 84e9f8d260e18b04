"""The verdict sentence of a comparison, decided by a stated statistical test on the table's per-seed numbers.

Comparisons (per objective; the baseline is its first-order row — AdamW, else the first FO row; every other
unlearned optimizer row of that objective is compared with it, `_pairs`).

The test (`seed_test`), two-sided, on one column's values over seeds:

* **paired t** (`scipy.stats.ttest_rel`) when both rows have a finite value for the same ≥ 2 seeds: the same
  seed gives both optimizers the same data order, so seed-to-seed variation cancels. It pairs on the common
  seeds only (a seed one row lacks is left out) and the sentence says how many;
* otherwise **Welch's t** (unequal variances, `scipy.stats.ttest_ind_from_stats` on each row's mean, sample
  std and n) when each row has ≥ 2 finite values — rows whose runs record no seed (older results.json) or
  share fewer than two seeds;
* otherwise **no test**: "no difference measured (fewer than two seeds)".

When the t statistic's denominator is zero (no spread at all, up to float rounding: a spread ≤ 1e-12 × the
largest |value| involved), t is undefined, and we do not call that infinite evidence:

* the same values on both sides (every paired difference 0, or two constant rows with equal means): p = 1,
  noted "no spread";
* every paired difference equal and nonzero: a zero sample variance of the differences is no evidence of zero
  noise (forget quality moves in KS steps, so equal differences over three seeds happen by discreteness), so p
  is the exact **sign-flip** test's, which needs no variance: under "no difference" each difference's sign is
  a coin flip and only all-equal signs are as extreme, p = 2 / 2ⁿ (0.25 at n = 3; below 0.05 only from
  n = 6). Differences that vary by more than rounding go to the t-test, whose p then falls off steeply;
* two constant rows with different means (Welch): likewise the exact **permutation** test of the two
  samples, p = 2 / C(n₁+n₂, n₁) (the observed split and its mirror are the most extreme), 1 / C(n₁+n₂, n₁)
  when n₁ ≠ n₂ (the mirror split is then less extreme); 0.1 at 3 vs 3 seeds.

Family and correction: every test of one report — forget quality of each comparison and each attack's
recovery in `robustness_verdicts` — forms one family, adjusted by Holm's step-down method (`holm`: the i-th
smallest of m p-values is multiplied by m − i + 1, then made non-decreasing and capped at 1). Each verdict
carries the raw ``p_value``, the adjusted ``p_holm``, ``test`` ("paired t", "Welch t" or None) and
``n_pairs`` (the paired seeds; None for Welch). `compare` / `compare_recovery` alone are a family of one.

The tested metric is the task's headline (`headline`, from the columns the rows have): TOFU's forget
quality (higher is better) qualified by model utility; copyright's forget-passage continuation ROUGE-L (lower
is better) qualified by retain-passage ROUGE-L; detox's toxicity of RealToxicityPrompts challenging-prompt
continuations (lower is better; forget-prompt answer toxicity where no RTP prompts were scored) qualified by
the retain answers' probability; WMDP's forget-topic multiple-choice accuracy (lower is better) qualified by
the utility accuracy. Verdict at α = 0.05: the other optimizer **beats** the baseline when p_holm < α and
the mean difference (of the paired differences, or of the two means for Welch) is in the metric's better
direction, is **worse** when p_holm < α and it is in the other, and otherwise there is **no difference
measured** (the sentence gives p and Holm p).

The utility metric qualifies a win: the same test on it, at the *unadjusted* α and outside the Holm family;
when it is significantly lower a win becomes **mixed** (better forgetting bought with utility). Not
adjusting makes a utility loss easier to flag, which is conservative for the claim "beats".

**Moved further**: when the other run's total update norm Σ‖Δθ_t‖ (mean over seeds) exceeds 1.5 × the
baseline's, the sentence says so: a larger effective step, not the method, may explain a difference.

Robustness (`robustness_verdicts`, rows with the attacks' recovery columns): the same baseline, test and
Holm family on each attack's recovery of the forget probability (0 = the unlearned level, 1 = the target's):
significantly lower is **less recovered (more robust)**, significantly higher **more recovered (less
robust)**, otherwise (or with fewer than two seeds) **no difference measured**.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from soul.columns import HEADLINES, Headline
from soul.report.results import COLUMN_BY_KEY, OBJECTIVE_NAMES, OPTIMIZER_ORDER

MOVED_FURTHER = 1.5  # ratio of total update norms above which the sentence warns
ALPHA = 0.05  # two-sided significance level of every verdict (Holm-adjusted for the family)
NO_SPREAD_RTOL = 1e-12  # a spread this small relative to the values is float rounding, not a spread
BEATS, WORSE, MIXED, NO_DIFFERENCE = "beats", "worse", "mixed", "no difference measured"
PAIRED, WELCH = "paired t", "Welch t"
RULE = ("Verdicts: two-sided t-test per comparison at α = 0.05 — paired by seed where both rows share ≥ 2 "
        "seeds, Welch's otherwise — with Holm's correction over every test in this report (the task's forget "
        "metric and robustness); a win with significantly lower utility (unadjusted) is mixed.")


def headline(rows: list[dict[str, Any]]) -> Headline:
    """The task's headline metric: the first of `HEADLINES` with a value in some unlearned row (TOFU's
    forget quality when none has any)."""
    unlearned = [r for r in rows if r.get("role", "unlearned") == "unlearned"]
    return next((h for h in HEADLINES if any(r.get(h.metric) is not None for r in unlearned)), HEADLINES[0])


def _n(row: dict[str, Any], key: str) -> int:
    """Seeds with a finite value of `key` (a seed whose metric was NaN/null does not count)."""
    return int(row.get(f"{key}_n", row.get("n", 1)))


def _no_spread(spread: float, scale: float) -> bool:
    return spread <= NO_SPREAD_RTOL * scale


def seed_test(other: dict[str, Any], base: dict[str, Any], key: str) -> dict[str, Any]:
    """The two-sided test of column `key` between table rows `other` and `base` (module docstring):
    ``{"test": "paired t" | "Welch t" | None, "n_pairs", "statistic", "p_value", "diff" (other − base: mean
    paired difference, or difference of means), "note"}``; p_value None when no test is possible."""
    out: dict[str, Any] = {"test": None, "n_pairs": None, "statistic": None, "p_value": None, "diff": None,
                           "note": ""}
    by_o, by_b = other.get(f"{key}_by_seed") or {}, base.get(f"{key}_by_seed") or {}
    common = sorted(set(by_o) & set(by_b))
    if len(common) >= 2:
        a, b = [float(by_o[s]) for s in common], [float(by_b[s]) for s in common]
        d = [x - y for x, y in zip(a, b)]
        diff = sum(d) / len(d)
        out.update(test=PAIRED, n_pairs=len(common), diff=diff)
        if _no_spread(max(d) - min(d), max(map(abs, a + b))):
            if _no_spread(max(map(abs, d)), max(map(abs, a + b))):
                out.update(p_value=1.0, note="no spread (identical on every seed)")
            else:
                out.update(p_value=2.0 / 2 ** len(d), note="the same difference on every seed, exact sign-flip p")
            return out
        from scipy.stats import ttest_rel

        with warnings.catch_warnings():  # near-identical data: scipy warns, the p-value is still the t-test's
            warnings.simplefilter("ignore", RuntimeWarning)
            res = ttest_rel(a, b)
        out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        return out
    n_o, n_b = _n(other, key), _n(base, key)
    m_o, m_b, s_o, s_b = other.get(key), base.get(key), other.get(f"{key}_std"), base.get(f"{key}_std")
    if n_o < 2 or n_b < 2 or None in (m_o, m_b, s_o, s_b):
        out["note"] = "fewer than two seeds"
        return out
    out.update(test=WELCH, diff=m_o - m_b)
    scale = max(abs(m_o), abs(m_b))
    if _no_spread(max(s_o, s_b), scale):
        if _no_spread(abs(m_o - m_b), scale):
            out.update(p_value=1.0, note="no spread (identical values)")
        else:
            out.update(p_value=(2.0 if n_o == n_b else 1.0) / math.comb(n_o + n_b, n_o),
                       note="no spread within either row, exact permutation p")
        return out
    from scipy.stats import ttest_ind_from_stats

    res = ttest_ind_from_stats(m_o, s_o, n_o, m_b, s_b, n_b, equal_var=False)
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (one family), in their order: the i-th smallest (i from 1)
    becomes max over j ≤ i of min(1, (m − j + 1) · p₍ⱼ₎)."""
    m = len(p_values)
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _p(p: float) -> str:
    return "1" if p >= 1 else f"{p:.2g}"


def _test_text(t: dict[str, Any], p_holm: float | None, *, adjusted: bool = True) -> str:
    """``paired t over 3 seeds: p = 0.012, Holm 0.036`` (without the Holm part when not `adjusted`);
    ``fewer than two seeds`` when there was no test."""
    if t["test"] is None:
        return t["note"]
    name = f"{t['test']} over {t['n_pairs']} seeds" if t["test"] == PAIRED else t["test"]
    note = f", {t['note']}" if t["note"] else ""
    holm_p = t["p_value"] if p_holm is None else p_holm
    return f"{name}{note}: p = {_p(t['p_value'])}" + (f", Holm {_p(holm_p)}" if adjusted else "")


def _significant(t: dict[str, Any], p: float | None) -> int:
    """+1 / −1 when `p` (of test `t`) is below α and the difference is positive / negative, else 0."""
    if p is None or t["diff"] is None or not p < ALPHA or t["diff"] == 0:
        return 0
    return 1 if t["diff"] > 0 else -1


def _fields(t: dict[str, Any], p_holm: float | None) -> dict[str, Any]:
    return {"test": t["test"], "n_pairs": t["n_pairs"], "p_value": t["p_value"],
            "p_holm": t["p_value"] if p_holm is None else p_holm, "statistic": t["statistic"], "note": t["note"]}


def _missing(row: dict[str, Any], key: str, what: str) -> str:
    """``; Sophia: forget quality missing (null/NaN) for seed 2`` when a seed of `row` had no value of `key`."""
    missing = row.get(f"{key}_missing")
    if not missing:
        return ""
    name = row.get("optimizer_label") or row["label"]
    return f"; {name}: {what} missing (null/NaN) for {', '.join(map(str, missing))}"


def _fmt(row: dict[str, Any], key: str) -> str:
    mean, std = row.get(key), row.get(f"{key}_std")
    if mean is None:
        return "–"
    return f"{mean:.3g} ± {std:.2g}" if std is not None else f"{mean:.3g}"


def compare(other: dict[str, Any], base: dict[str, Any], *, test: dict[str, Any] | None = None,
            p_holm: float | None = None, on: Headline = HEADLINES[0]) -> dict[str, Any]:
    """The verdict of table row `other` against baseline row `base` (see the module docstring):
    ``{"objective", "optimizer", "baseline", "metric", "verdict", "test", "n_pairs", "p_value", "p_holm",
    "statistic", "note", "utility", "moved_further", "norm_ratio", "sentence"}``. `on` is the task's headline
    (`headline`; TOFU's forget quality by default), `test` is `seed_test` on its metric (computed when not
    given) and `p_holm` its Holm-adjusted p in the report's family (a family of one — the raw p — when not
    given)."""
    t = test or seed_test(other, base, on.metric)
    holm_p = t["p_value"] if p_holm is None else p_holm
    mu = seed_test(other, base, on.utility)
    higher_is_better = COLUMN_BY_KEY[on.metric].higher_is_better
    direction = _significant(t, holm_p) * (1 if higher_is_better else -1)
    utility_lower = _significant(mu, mu["p_value"]) < 0
    verdict = {1: MIXED if utility_lower else BEATS, -1: WORSE, 0: NO_DIFFERENCE}[direction]
    tot_o, tot_b = other.get("update_norm_total"), base.get("update_norm_total")
    ratio = tot_o / tot_b if tot_o is not None and tot_b else None
    moved = ratio is not None and ratio > MOVED_FURTHER
    obj = OBJECTIVE_NAMES.get(str(other.get("objective")), str(other.get("objective")))
    phrase = {BEATS: "beats", WORSE: "is worse than", MIXED: "forgets better but loses utility against",
              NO_DIFFERENCE: "shows no difference measured against"}[verdict]
    name_o, name_b = (r.get("optimizer_label") or r["label"] for r in (other, base))
    utility_note = (f"; {on.utility_name} lower ({_test_text(mu, None, adjusted=False)}, unadjusted)"
                    if verdict == MIXED else "")
    lower = "" if higher_is_better else " (lower is better)"
    sentence = (f"{obj}: {name_o} {phrase} {name_b} ({_test_text(t, holm_p)}): {on.metric_name}{lower} "
                f"{_fmt(other, on.metric)} vs {_fmt(base, on.metric)}, {on.utility_name} "
                f"{_fmt(other, on.utility)} vs {_fmt(base, on.utility)} "
                f"(n = {_n(other, on.metric)} vs {_n(base, on.metric)} seeds"
                + "".join(_missing(r, k, w) for r in (other, base)
                          for k, w in ((on.metric, on.metric_name), (on.utility, on.utility_name)))
                + utility_note + ").")
    if moved:
        sentence += (f" It moved further: total ‖Δθ‖ {tot_o:.3g} vs {tot_b:.3g} ({ratio:.1f}×), so a larger "
                     "effective step may explain the difference.")
    return {"objective": other.get("objective"), "optimizer": other.get("optimizer"),
            "baseline": base.get("optimizer"), "metric": on.metric, "verdict": verdict, **_fields(t, p_holm),
            "utility": {"metric": on.utility, **{k: mu[k] for k in ("test", "n_pairs", "p_value", "diff")}},
            "moved_further": moved, "norm_ratio": ratio, "sentence": sentence}


def _order(row: dict[str, Any]) -> str | None:
    return OPTIMIZER_ORDER.get(str(row.get("optimizer_type") or row.get("optimizer")))


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(other row, its baseline row) per objective: the baseline is AdamW, else the first FO row."""
    out = []
    by_obj: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("role") == "unlearned":
            by_obj.setdefault(str(row.get("objective")), []).append(row)
    for obj_rows in by_obj.values():
        fo = [r for r in obj_rows if _order(r) == "FO"]
        base = next((r for r in fo if (r.get("optimizer_type") or r.get("optimizer")) == "adamw"), None) or (
            fo[0] if fo else None)
        if base is not None:
            out += [(r, base) for r in obj_rows if r is not base]
    return out


LESS_RECOVERED, MORE_RECOVERED = "less recovered (more robust)", "more recovered (less robust)"
RECOVERY_KEYS = {"relearn_recovery_prob": "relearning recovery",
                 "paraphrase_recovery_prob": "paraphrase recovery"}  # and quant{b}_recovery_prob: "b-bit recovery"


def _attack_name(key: str) -> str:
    if key in RECOVERY_KEYS:
        return RECOVERY_KEYS[key]
    return f"{key.removeprefix('quant').removesuffix('_recovery_prob')}-bit recovery"


def compare_recovery(other: dict[str, Any], base: dict[str, Any], key: str, *, test: dict[str, Any] | None = None,
                     p_holm: float | None = None) -> dict[str, Any]:
    """The robustness verdict of row `other` against baseline row `base` on recovery column `key`:
    ``{"objective", "optimizer", "baseline", "attack", "verdict", "test", "n_pairs", "p_value", "p_holm",
    "statistic", "note", "sentence"}`` (`test` and `p_holm` as in `compare`)."""
    t = test or seed_test(other, base, key)
    holm_p = t["p_value"] if p_holm is None else p_holm
    verdict = {-1: LESS_RECOVERED, 1: MORE_RECOVERED, 0: NO_DIFFERENCE}[_significant(t, holm_p)]
    obj = OBJECTIVE_NAMES.get(str(other.get("objective")), str(other.get("objective")))
    name_o, name_b = (r.get("optimizer_label") or r["label"] for r in (other, base))
    sentence = (f"{obj}: {_attack_name(key)} (prob.) of {name_o} {_fmt(other, key)} vs {name_b} {_fmt(base, key)} "
                f"(n = {_n(other, key)} vs {_n(base, key)} seeds"
                + "".join(_missing(r, key, "recovery") for r in (other, base))
                + f"): {verdict} ({_test_text(t, holm_p)}).")
    return {"objective": other.get("objective"), "optimizer": other.get("optimizer"),
            "baseline": base.get("optimizer"), "attack": key, "verdict": verdict, **_fields(t, p_holm),
            "sentence": sentence}


def _recovery_keys(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("_recovery_prob")]


def all_verdicts(rows: list[dict[str, Any]], *, performance: bool = True
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(headline verdicts, robustness verdicts) of the table's unlearned rows, every test of both in one Holm
    family. The headline metric is the task's (`headline`: forget quality for TOFU). `performance=False` (a
    sweep, whose rows are settings rather than optimizers) leaves the headline comparisons out of the report
    and so out of the family."""
    pairs = _pairs(rows)
    on = headline(rows)
    perf = [(o, b, seed_test(o, b, on.metric)) for o, b in pairs] if performance else []
    robust = [(o, b, k, seed_test(o, b, k)) for o, b in pairs for k in _recovery_keys(rows)
              if o.get(k) is not None and b.get(k) is not None]
    tests = [t for *_, t in perf] + [t for *_, t in robust]
    tested = [t for t in tests if t["p_value"] is not None]
    adjusted = {id(t): p for t, p in zip(tested, holm([t["p_value"] for t in tested]))}
    return ([compare(o, b, test=t, p_holm=adjusted.get(id(t)), on=on) for o, b, t in perf],
            [compare_recovery(o, b, k, test=t, p_holm=adjusted.get(id(t))) for o, b, k, t in robust])


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `compare` per (objective, non-baseline optimizer) among the unlearned rows of the table, Holm-
    adjusted over the report's whole family (`all_verdicts`)."""
    return all_verdicts(rows)[0]


def robustness_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `compare_recovery` per (objective, non-baseline optimizer, attack) where both rows have the
    attack's recovery of the forget probability (relearning, each quantization width, paraphrase), Holm-
    adjusted over the report's whole family (`all_verdicts`)."""
    return all_verdicts(rows)[1]
