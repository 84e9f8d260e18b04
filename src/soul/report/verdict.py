"""The verdict sentence of a comparison, computed from the table's numbers rather than written by hand.

Rule (per objective; the baseline is its first-order row — AdamW, else the first FO row; every other
unlearned optimizer row of that objective is compared with it):

* an *interval* is mean ± std over seeds (sample std, n − 1);
* forget quality (higher is better): the other optimizer **beats** the baseline when its interval lies
  entirely above the baseline's (lower end > the baseline's upper end), is **worse** when it lies entirely
  below, and otherwise there is **no difference measured**;
* model utility qualifies a win: when the other optimizer's utility interval lies entirely below the
  baseline's, a forget-quality win becomes **mixed** (better forgetting bought with utility);
* fewer than two seeds on either side give no interval: the verdict is "no difference measured" and says
  why (one seed measures no spread);
* **moved further**: when the other run's total update norm Σ‖Δθ_t‖ (mean over seeds) exceeds 1.5 × the
  baseline's, the sentence says so: a larger effective step, not the method, may explain a difference.

Robustness (`robustness_verdicts`, rows with the attacks' recovery columns): the same baseline and interval
rule on each attack's recovery of the forget probability (0 = the unlearned level, 1 = the target's): an
interval entirely below the baseline's is **less recovered (more robust)**, entirely above **more
recovered (less robust)**, otherwise (or with fewer than two seeds) **no difference measured**.
"""

from __future__ import annotations

from typing import Any

from soul.report.results import OBJECTIVE_NAMES, OPTIMIZER_ORDER

MOVED_FURTHER = 1.5  # ratio of total update norms above which the sentence warns
BEATS, WORSE, MIXED, NO_DIFFERENCE = "beats", "worse", "mixed", "no difference measured"


def _n(row: dict[str, Any], key: str) -> int:
    """Seeds with a finite value of `key` (a seed whose metric was NaN/null does not count)."""
    return int(row.get(f"{key}_n", row.get("n", 1)))


def _interval(row: dict[str, Any], key: str) -> tuple[float, float] | None:
    mean, std = row.get(key), row.get(f"{key}_std")
    if mean is None or std is None or _n(row, key) < 2:
        return None
    return mean - std, mean + std


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


def compare(other: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The verdict of table row `other` against baseline row `base` (see the module docstring):
    ``{"objective", "optimizer", "baseline", "verdict", "moved_further", "norm_ratio", "sentence"}``."""
    fq_o, fq_b = _interval(other, "forget_quality"), _interval(base, "forget_quality")
    mu_o, mu_b = _interval(other, "model_utility"), _interval(base, "model_utility")
    reason = ""
    if fq_o is None or fq_b is None:
        verdict = NO_DIFFERENCE
        reason = " (fewer than two seeds: no spread measured)" if other.get("forget_quality") is not None else ""
    elif fq_o[0] > fq_b[1]:
        verdict = MIXED if (mu_o is not None and mu_b is not None and mu_o[1] < mu_b[0]) else BEATS
    elif fq_o[1] < fq_b[0]:
        verdict = WORSE
    else:
        verdict = NO_DIFFERENCE
    tot_o, tot_b = other.get("update_norm_total"), base.get("update_norm_total")
    ratio = tot_o / tot_b if tot_o is not None and tot_b else None
    moved = ratio is not None and ratio > MOVED_FURTHER
    obj = OBJECTIVE_NAMES.get(str(other.get("objective")), str(other.get("objective")))
    phrase = {BEATS: "beats", WORSE: "is worse than", MIXED: "forgets better but loses utility against",
              NO_DIFFERENCE: "shows no difference measured against"}[verdict]
    name_o, name_b = (r.get("optimizer_label") or r["label"] for r in (other, base))
    sentence = (f"{obj}: {name_o} {phrase} {name_b}{reason}: forget quality "
                f"{_fmt(other, 'forget_quality')} vs {_fmt(base, 'forget_quality')}, model utility "
                f"{_fmt(other, 'model_utility')} vs {_fmt(base, 'model_utility')} "
                f"(n = {_n(other, 'forget_quality')} vs {_n(base, 'forget_quality')} seeds"
                + "".join(_missing(r, k, w) for r in (other, base)
                          for k, w in (("forget_quality", "forget quality"), ("model_utility", "model utility")))
                + ").")
    if moved:
        sentence += (f" It moved further: total ‖Δθ‖ {tot_o:.3g} vs {tot_b:.3g} ({ratio:.1f}×), so a larger "
                     "effective step may explain the difference.")
    return {"objective": other.get("objective"), "optimizer": other.get("optimizer"),
            "baseline": base.get("optimizer"), "verdict": verdict, "moved_further": moved,
            "norm_ratio": ratio, "sentence": sentence}


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


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `compare` per (objective, non-baseline optimizer) among the unlearned rows of the table."""
    return [compare(other, base) for other, base in _pairs(rows)]


LESS_RECOVERED, MORE_RECOVERED = "less recovered (more robust)", "more recovered (less robust)"
RECOVERY_KEYS = {"relearn_recovery_prob": "relearning recovery",
                 "paraphrase_recovery_prob": "paraphrase recovery"}  # and quant{b}_recovery_prob: "b-bit recovery"


def _attack_name(key: str) -> str:
    if key in RECOVERY_KEYS:
        return RECOVERY_KEYS[key]
    return f"{key.removeprefix('quant').removesuffix('_recovery_prob')}-bit recovery"


def compare_recovery(other: dict[str, Any], base: dict[str, Any], key: str) -> dict[str, Any]:
    """The robustness verdict of row `other` against baseline row `base` on recovery column `key`:
    ``{"objective", "optimizer", "baseline", "attack", "verdict", "sentence"}``."""
    iv_o, iv_b = _interval(other, key), _interval(base, key)
    reason = ""
    if iv_o is None or iv_b is None:
        verdict = NO_DIFFERENCE
        reason = " (fewer than two seeds: no spread measured)"
    elif iv_o[1] < iv_b[0]:
        verdict = LESS_RECOVERED
    elif iv_o[0] > iv_b[1]:
        verdict = MORE_RECOVERED
    else:
        verdict = NO_DIFFERENCE
    obj = OBJECTIVE_NAMES.get(str(other.get("objective")), str(other.get("objective")))
    name_o, name_b = (r.get("optimizer_label") or r["label"] for r in (other, base))
    sentence = (f"{obj}: {_attack_name(key)} (prob.) of {name_o} {_fmt(other, key)} vs {name_b} {_fmt(base, key)} "
                f"(n = {_n(other, key)} vs {_n(base, key)} seeds"
                + "".join(_missing(r, key, "recovery") for r in (other, base)) + f"): {verdict}{reason}.")
    return {"objective": other.get("objective"), "optimizer": other.get("optimizer"),
            "baseline": base.get("optimizer"), "attack": key, "verdict": verdict, "sentence": sentence}


def robustness_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `compare_recovery` per (objective, non-baseline optimizer, attack) where both rows have the
    attack's recovery of the forget probability (relearning, each quantization width, paraphrase)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k.endswith("_recovery_prob") and not k.endswith("_std")]
    return [compare_recovery(other, base, key) for other, base in _pairs(rows) for key in keys
            if other.get(key) is not None and base.get(key) is not None]
