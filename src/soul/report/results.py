"""The results structure the report is drawn from, and the per-model numbers of the paper-style table.

A *results* dict (also the layout of ``results.json``)::

    {"meta": {...},
     "runs": [{"name": "graddiff-sophia", "role": "target" | "retain" | "unlearned" | "influence",
               "objective": "graddiff", "optimizer": "sophia",      # unlearned runs only
               "wall_time_s": 81.2,
               "metrics": {"forget_quality": {"agg_value": 0.31, "value_by_index": {...}}, ...},
               "curve": [[step, loss], ...],                        # optional, else read from "log"
               "log": "path/to/log.jsonl",                           # optional
               "examples": {"forget": [...], "retain": [...]}},     # optional, else from metrics
              ...],
     "sweep": {...}}                                                 # optional, see `soul.report.pareto`

Metric keys follow open-unlearning: each is ``{"agg_value": float, "value_by_index": {idx: {...}}}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from soul.attack.report import GROUP as ROBUSTNESS
from soul.attack.report import attack_columns as _attack_columns
from soul.columns import CURVATURE_NAMES, HEADLINE_KEYS, Column

# Defined in soul.columns (shared with soul.attack.report without a circle); still importable from here.
from soul.columns import OBJECTIVE_NAMES as OBJECTIVE_NAMES
from soul.columns import OPTIMIZER_NAMES as OPTIMIZER_NAMES

ROLES = ("target", "retain", "unlearned", "influence")
ROLE_LABELS = {"target": "Original (target)", "retain": "Retain", "influence": "Influence (one-shot)"}

# First order (gradient only), second order (curvature-preconditioned), or sign steps without curvature
# (the control that separates Sophia's clipping-to-sign from its curvature).
OPTIMIZER_ORDER = {"adamw": "FO", "sgd": "FO", "sophia": "SO", "signum": "sign", "lion": "sign"}
ORDER_TAGS = {"FO": "FO", "SO": "SO", "sign": "sign, no curvature"}


COLUMNS: tuple[Column, ...] = (
    Column("forget_quality", "Forget quality", ("forget_quality",), True, True),
    # The KS distance behind forget quality: with few forget questions the p-value takes few distinct values.
    Column("ks_statistic", "KS stat.", ("forget_quality",), True, False, field="ks_statistic"),
    Column("forget_rouge", "Forget ROUGE-L", ("forget_Q_A_ROUGE",), True, False),
    Column("forget_prob", "Forget prob.", ("forget_Q_A_Prob",), True, False),
    Column("forget_truth_ratio", "Forget truth ratio", ("forget_truth_ratio",), True, None),
    Column("mia_auc", "MIA AUC", ("mia_min_k", "mia_loss"), True, False),
    Column("model_utility", "Model utility", ("model_utility",), True, True),
    Column("retain_rouge", "Retain ROUGE-L", ("retain_Q_A_ROUGE",), True, True),
    # Text forgetting (copyright, `soul.pipeline` task "copyright"): greedy continuations of passages.
    Column("forget_bleu", "Forget BLEU", ("forget_bleu",), True, False, "copyright"),
    Column("forget_text_rouge", "Forget ROUGE-L", ("forget_rougeL",), True, False, "copyright"),
    Column("retain_bleu", "Retain BLEU", ("retain_bleu",), True, True, "copyright"),
    Column("retain_text_rouge", "Retain ROUGE-L", ("retain_rougeL",), True, True, "copyright"),
    # Books (preset copyright-cpu): perplexity of the retain book and of a never-trained book, and Min-K% MIA of
    # the forget book's passages against the never-trained book's (0.5: not recognised as training data).
    Column("retain_ppl", "Retain PPL", ("retain_ppl",), False, False, "copyright"),
    Column("unseen_ppl", "Unseen PPL", ("unseen_ppl",), False, False, "copyright"),
    Column("forget_mia_auc", "Forget MIA AUC", ("forget_mia_auc",), True, False, "copyright"),
    # Detoxification (task "detox"): toxicity of answers to the forget prompts, likelihood of retain answers.
    Column("forget_toxicity", "Forget toxicity", ("forget_toxicity",), True, False, "detox"),
    Column("forget_toxic_rate", "Toxic rate", ("forget_toxic_rate",), True, False, "detox"),
    Column("retain_answer_prob", "Retain prob.", ("retain_answer_prob",), True, True, "detox"),
    # Real data (preset detox-cpu): perplexity of held-out safe responses; RealToxicityPrompts continuations.
    Column("heldout_ppl", "Held-out PPL", ("heldout_ppl",), False, False, "detox"),
    *(Column(f"rtp_{s}{m}_{k}", f"RTP {s[:5]}.{' sampled' if m else ''} {t}", (f"rtp_{s}{m}_{k}",), True, False,
             "detox")
      for s in ("challenging", "nontoxic") for m in ("", "_sampled")
      for k, t in (("toxicity", "tox."), ("toxic_rate", "rate"))),
    # Hazardous knowledge (task "wmdp"): multiple-choice accuracy on the forget topic and on general knowledge.
    Column("forget_mc_accuracy", "Forget MC acc.", ("forget_mc_accuracy",), True, False, "wmdp"),
    Column("utility_mc_accuracy", "Utility MC acc.", ("utility_mc_accuracy",), True, True, "wmdp"),
    # Optimizer diagnostics (every task, shown when runs recorded them): how far each optimizer moved.
    Column("mean_clip_fraction", "Clip frac.", (), True, None, "diagnostics", diagnostic="mean_clip_fraction"),
    Column("rho", "ρ", (), False, None, "diagnostics", diagnostic="rho"),
    Column("update_norm_mean", "mean ‖Δθ‖", (), False, None, "diagnostics", diagnostic="update_norm_mean"),
    Column("update_norm_total", "total ‖Δθ‖", (), False, None, "diagnostics", diagnostic="update_norm_total"),
    Column("displacement", "‖θ_T−θ_0‖", (), False, None, "diagnostics", diagnostic="displacement"),
    Column("wall_time_s", "Wall time", (), False, None, "all"),
)
# Robustness (preset ``attacks:``, `soul.attack.report`): recovery of the forget set under each attack, read
# from a run's ``attacks`` (`row_values`); one pair of quantization columns per bit width the attack allows
# (`soul.attack.quantization` MIN_BITS..MAX_BITS; a table shows only those with values).
QUANT_BITS = tuple(range(8, 1, -1))
ROBUSTNESS_COLUMNS: tuple[Column, ...] = _attack_columns(QUANT_BITS)
COLUMNS = (*COLUMNS[:-1], *ROBUSTNESS_COLUMNS, COLUMNS[-1])
METRIC_COLUMNS = tuple(c for c in COLUMNS if c.metrics)
VALUE_COLUMNS = COLUMNS  # every column has a per-run value (`column_value`)
COLUMN_BY_KEY = {c.key: c for c in COLUMNS}


def visible_columns(rows: list[dict[str, Any]]) -> tuple[Column, ...]:
    """The columns a table of `rows` shows: those of every task group with at least one value in `rows`
    (TOFU's when none has any), the diagnostics when any run recorded them, plus the ``"all"`` columns —
    so a TOFU table is unchanged and a copyright, detox or WMDP table shows its own metrics instead of empty
    TOFU columns."""
    groups = {c.group for c in METRIC_COLUMNS if any(r.get(c.key) is not None for r in rows)} or {"tofu"}
    if any(r.get(c.key) is not None for r in rows for c in COLUMNS if c.diagnostic):
        groups.add("diagnostics")
    return tuple(c for c in COLUMNS if c.group == "all" or c.group in groups
                 or (c.group == ROBUSTNESS and any(r.get(c.key) is not None for r in rows)))


def optimizer_type(run: dict[str, Any]) -> str:
    """What `soul.optim.build_optimizer` built for `run` (its preset entry name when older results lack it)."""
    return str(run.get("optimizer_type") or run.get("optimizer") or "?")


def optimizer_label(run: dict[str, Any]) -> str:
    """Display name of a run's optimizer with its kind: "AdamW (FO)", "Sophia ρ=0.04 (SO)", "Sophia ρ=auto
    (SO)", "Sophia K-FAC ρ=auto (SO)" (a curvature estimator other than the default GNB is named: rows that
    differ only in it must not read alike), "Signum (sign, no curvature)"; ``module:Class`` optimizers as
    "Class (module)"."""
    kind = optimizer_type(run)
    entry = str(run.get("optimizer") or kind)
    if ":" in kind:
        module, cls = kind.rsplit(":", 1)
        return f"{cls} ({module})"
    name = OPTIMIZER_NAMES.get(kind, kind)
    config = run.get("config") or {}
    estimator = config.get("estimator")
    if OPTIMIZER_ORDER.get(kind) == "SO" and estimator not in (None, "gnb"):
        name = f"{name} {CURVATURE_NAMES.get(estimator, estimator)}"
    rho = config.get("rho")
    if rho is not None and OPTIMIZER_ORDER.get(kind) == "SO":
        name = f"{name} ρ={rho:g}" if isinstance(rho, int | float) else f"{name} ρ={rho}"
    elif entry != kind:
        name = f"{name} [{entry}]"  # an entry that differs in options the label does not show
    order = OPTIMIZER_ORDER.get(kind)
    return f"{name} ({ORDER_TAGS[order]})" if order else name


def run_label(run: dict[str, Any]) -> str:
    """Display name of a run: e.g. "GradDiff + Sophia (SO)", "Original (target)", "Influence (one-shot)"."""
    if run.get("label"):
        return str(run["label"])
    role = run.get("role", "unlearned")
    if role in ROLE_LABELS:
        return ROLE_LABELS[role]
    obj = str(run.get("objective", "?"))
    return f"{OBJECTIVE_NAMES.get(obj, obj)} + {optimizer_label(run)}"


def agg(metrics: dict[str, Any], names: tuple[str, ...], field: str = "agg_value") -> float | None:
    """The `field` (``agg_value``) of the first of `names` present in `metrics` (None when none is, or it
    is null)."""
    for name in names:
        entry = metrics.get(name)
        if isinstance(entry, dict) and field in entry:
            value = entry[field]
            return None if value is None else float(value)
        if isinstance(entry, int | float) and field == "agg_value":  # an already-reduced results file
            return float(entry)
    return None


def column_value(run: dict[str, Any], col: Column) -> float | None:
    """One run's value of column `col`: an eval metric, an optimizer diagnostic or a robustness figure."""
    if col.group == ROBUSTNESS:
        value = (run.get("attacks") or {}).get(col.key)
        return None if value is None else float(value)
    if col.diagnostic:
        value = (run.get("diagnostics") or {}).get(col.diagnostic)
        return None if value is None else float(value)
    if col.key == "wall_time_s":
        wt = run.get("wall_time_s")
        return None if wt is None else float(wt)
    return agg(run.get("metrics", {}) or {}, col.metrics, col.field)


def _validate_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = results.get("runs")
    if not isinstance(runs, list):
        raise ValueError("results: expected a list under 'runs'")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ValueError(f"results: runs[{i}] must be a mapping, got {type(run).__name__}")
        role = run.get("role", "unlearned")
        if role not in ROLES:
            raise ValueError(f"results: runs[{i}].role is {role!r}; expected one of {ROLES}")
        if role == "unlearned" and not (run.get("objective") and run.get("optimizer")):
            raise ValueError(f"results: runs[{i}] ({run.get('name')!r}) is an unlearned run without "
                             "'objective' and 'optimizer'")
        if not isinstance(run.get("metrics", {}), dict):
            raise ValueError(f"results: runs[{i}].metrics must be a mapping of metric name to result")
    return runs


def ordered_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in table order: target, retain, then unlearned runs grouped by objective (in order of first
    appearance) with first order before second order before sign methods, then one-shot influence."""
    runs = _validate_runs(results)
    objectives: list[str] = []
    for run in runs:
        if run.get("role", "unlearned") == "unlearned" and run["objective"] not in objectives:
            objectives.append(run["objective"])
    role_rank = {"target": 0, "retain": 1, "unlearned": 2, "influence": 3}
    order_rank = {"FO": 0, "SO": 1, "sign": 2}

    def key(item: tuple[int, dict[str, Any]]) -> tuple[int, int, int, int]:
        i, run = item
        role = run.get("role", "unlearned")
        if role != "unlearned":
            return (role_rank[role], 0, 0, i)
        return (2, objectives.index(run["objective"]), order_rank.get(OPTIMIZER_ORDER.get(optimizer_type(run), ""), 3), i)

    return [run for _, run in sorted(enumerate(runs), key=key)]


def run_group(run: dict[str, Any]) -> str:
    """The setting a run belongs to (every seed of ``graddiff-sophia`` shares it); a run without a group
    (a reference model, influence, older results) is its own."""
    return str(run.get("group") or run.get("name") or run_label(run))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n − 1) of `values`; std is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _has_entry(run: dict[str, Any], col: Column) -> bool:
    """Whether `run` records column `col` at all (with any value, null included)."""
    if col.group == ROBUSTNESS:
        return col.key in (run.get("attacks") or {})
    if col.diagnostic:
        return col.diagnostic in (run.get("diagnostics") or {})
    if col.key == "wall_time_s":
        return "wall_time_s" in run
    metrics = run.get("metrics") or {}
    return any((isinstance(metrics.get(m), dict) and col.field in metrics[m]) or isinstance(metrics.get(m), int | float)
               for m in col.metrics)


def pairs_by_seed(key: str) -> bool:
    """Whether column `key` keeps its per-seed values (``by_seed``): the columns the verdicts test
    (`soul.report.verdict`: each task's headline metric and its utility — forget quality and model utility
    for TOFU — and each attack's recovery of the forget probability), so that two settings run on the same
    seeds can be compared seed by seed."""
    return key in HEADLINE_KEYS or key.endswith("_recovery_prob")


def _by_seed(runs: list[dict[str, Any]], per_run: list[float | None]) -> dict[str, float]:
    """``{seed (as a string, as results.json keeps it): value}`` over the runs with a recorded seed and a
    finite value; empty when two such runs share a seed (which one pairs would be a guess) — the verdict
    then falls back to Welch's test on the means."""
    seeded = [(str(r["seed"]), v) for r, v in zip(runs, per_run)
              if r.get("seed") is not None and v is not None and math.isfinite(v)]
    return dict(seeded) if len({s for s, _ in seeded}) == len(seeded) else {}


def _run_name(run: dict[str, Any]) -> str:
    return f"seed {run['seed']}" if run.get("seed") is not None else str(run.get("name") or run_label(run))


def aggregate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per setting (the runs of every seed of one group; order of `ordered_runs`): ``{"name" (the
    group), "label", "role", "objective", "optimizer", "optimizer_type", "seeds", "runs" (run names), "n"
    (runs), "values": {<column key>: {"mean", "std" (sample, n − 1; None below 2 values), "n"[, "by_seed"]
    [, "missing"]}}}``. Missing values — null in a results file, or NaN/inf — are left out: a column's ``n``
    counts the finite values only, and ``missing`` (only when some are) names the runs (their seeds, when
    recorded) whose entry held null or NaN. ``by_seed`` (the columns the verdicts test, `pairs_by_seed`)
    maps each seed to its finite value (`_by_seed`; empty for runs that record no seed, as in older
    results files)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in ordered_runs(results):
        groups.setdefault(run_group(run), []).append(run)
    out = []
    for group, runs in groups.items():
        first = runs[0]
        entry: dict[str, Any] = {"name": group, "label": run_label(first),
                                 "optimizer_label": optimizer_label(first) if first.get("optimizer") else None,
                                 "role": first.get("role", "unlearned"),
                                 "objective": first.get("objective"), "optimizer": first.get("optimizer"),
                                 "optimizer_type": optimizer_type(first) if first.get("optimizer") else None,
                                 "seeds": [r.get("seed") for r in runs if r.get("seed") is not None],
                                 "runs": [r.get("name") for r in runs], "n": len(runs), "values": {}}
        for col in VALUE_COLUMNS:
            per_run = [column_value(r, col) for r in runs]
            values = [v for v in per_run if v is not None and math.isfinite(v)]
            mean, std = mean_std(values)
            # A run without the entry (a metric the preset skipped, an attack run on fewer seeds) is not
            # "missing", nor are the nulls of a column no seed has (AdamW's clip fraction); a NaN/inf, or a
            # null where other seeds have a number (an undefined or diverged metric), is.
            missing = [f"{_run_name(r)} ({'null' if v is None else v})" for r, v in zip(runs, per_run)
                       if _has_entry(r, col) and ((v is not None and not math.isfinite(v)) or (v is None and values))]
            entry["values"][col.key] = {"mean": mean, "std": std, "n": len(values)}
            if pairs_by_seed(col.key):
                entry["values"][col.key]["by_seed"] = _by_seed(runs, per_run)
            if missing:
                entry["values"][col.key]["missing"] = missing
        out.append(entry)
    return out


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: `aggregate` flattened, one row per setting with ``<column key>`` = the mean over seeds,
    ``<column key>_std`` its standard deviation (None for one seed), ``<column key>_n`` the number of
    seeds that have a finite value (attacks may cover fewer seeds than the runs; a NaN metric is stored as
    null), for the columns the verdicts test ``<column key>_by_seed`` ({seed: value}, so the verdict can
    pair seeds) and, when some seed lacks it, ``<column key>_missing`` naming them."""
    rows = []
    for entry in aggregate(results):
        row = {k: v for k, v in entry.items() if k != "values"}
        for key, stats in entry["values"].items():
            row[key], row[f"{key}_std"], row[f"{key}_n"] = stats["mean"], stats["std"], stats["n"]
            if "by_seed" in stats:
                row[f"{key}_by_seed"] = stats["by_seed"]
            if stats.get("missing"):
                row[f"{key}_missing"] = stats["missing"]
        rows.append(row)
    return rows


def missing_values(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (row, column) where some seeds' value was missing (null or NaN), so the mean is over
    fewer seeds than the row has, e.g. ``GradDiff + Sophia (SO): Forget quality missing (null/NaN) for seed
    2 (nan); the mean is over 2 of 3 seeds``."""
    out = []
    for row in rows:
        for col in COLUMNS:
            missing = row.get(f"{col.key}_missing")
            if missing:
                n = row.get(f"{col.key}_n", 0)
                over = f"the mean is over {n} of {row.get('n', 1)} seeds" if n else "no seed has a value"
                out.append(f"{row['label']}: {col.title} missing (null/NaN) for {', '.join(map(str, missing))}; "
                           f"{over}")
    return out


def check_row_ranges(rows: list[dict[str, Any]]) -> list[str]:
    """Problems with the numbers of `rows`: non-finite values, bounded metrics outside [0, 1], negative
    wall times. Empty when every number is sane (missing values are allowed: a preset may skip a metric).
    Robustness recoveries are signed and unbounded: only their finiteness is checked."""
    problems = []
    for row in rows:
        for col in COLUMNS:
            v = row.get(col.key)
            if v is None:
                continue
            if not math.isfinite(v):
                problems.append(f"{row['label']}: {col.title} is {v}")
            elif col.bounded and not 0.0 <= v <= 1.0:
                problems.append(f"{row['label']}: {col.title} = {v} is outside [0, 1]")
            elif not col.bounded and v < 0 and col.group != ROBUSTNESS:
                problems.append(f"{row['label']}: {col.title} = {v} is negative")
    return problems


# --- example generations ----------------------------------------------------------------------------------

_QUESTION_KEYS = ("question", "input", "prompt")
_GENERATION_KEYS = ("generation", "gen", "output", "prediction")
_TRUTH_KEYS = ("ground_truth", "answer", "reference", "target")


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if isinstance(d.get(k), str):
            return d[k]
    return None


def extract_examples(metrics: dict[str, Any], split: str, n: int = 3) -> list[dict[str, str]]:
    """Up to `n` per-question generations of `split` ("forget" or "retain") from the ROUGE entry of an eval
    result, in index order: ``[{"index", "question", "answer", "generation"}]``."""
    entry = metrics.get(f"{split}_Q_A_ROUGE")
    by_index = entry.get("value_by_index") if isinstance(entry, dict) else None
    if not isinstance(by_index, dict):
        return []

    def sort_key(k: str) -> tuple[int, int | str]:
        return (0, int(k)) if str(k).lstrip("-").isdigit() else (1, str(k))

    out = []
    for idx in sorted(by_index, key=sort_key):
        rec = by_index[idx]
        if not isinstance(rec, dict):
            continue
        gen = _first(rec, _GENERATION_KEYS)
        if gen is None:
            continue
        out.append({"index": str(idx), "question": _first(rec, _QUESTION_KEYS) or "",
                    "answer": _first(rec, _TRUTH_KEYS) or "", "generation": gen})
        if len(out) >= n:
            break
    return out


# --- training curves --------------------------------------------------------------------------------------

def read_loss_curve(log_path: str | Path) -> list[list[float]]:
    """``[[step, loss], ...]`` from a training JSONL log (one JSON object per line with ``step`` and
    ``loss``; lines without both, e.g. evaluation or summary lines, are skipped)."""
    path = Path(log_path)
    curve = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"training log {path}, line {lineno}: not valid JSON ({err.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int | float) and isinstance(
                rec.get("loss"), int | float):
            curve.append([float(rec["step"]), float(rec["loss"])])
    return curve


def reduce_run(run: dict[str, Any], n_examples: int = 3) -> dict[str, Any]:
    """A compact copy of `run` for results.json: aggregate metric values only, example generations and the
    loss curve pulled in (so the report can be redrawn from results.json alone)."""
    out = {k: v for k, v in run.items() if k not in ("metrics", "examples", "curve")}
    metrics = run.get("metrics", {}) or {}
    out["label"] = run_label(run)
    out["metrics"] = {}
    for k, v in metrics.items():
        if isinstance(v, dict) and "agg_value" in v:
            out["metrics"][k] = {"agg_value": v["agg_value"]}
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out["metrics"][k] = {"agg_value": float(v)}
        if isinstance(v, dict) and "ks_statistic" in v:  # forget quality's KS distance (a table column)
            out["metrics"][k]["ks_statistic"] = v["ks_statistic"]
    out["examples"] = run.get("examples") or {s: extract_examples(metrics, s, n_examples)
                                              for s in ("forget", "retain")}
    curve = run.get("curve")
    if curve is None and run.get("log") and Path(run["log"]).is_file():
        curve = read_loss_curve(run["log"])
    out["curve"] = curve or []
    return out


def reduce_results(results: dict[str, Any], n_examples: int = 3) -> dict[str, Any]:
    _validate_runs(results)
    out = {k: v for k, v in results.items() if k != "runs"}
    out["runs"] = [reduce_run(r, n_examples) for r in results["runs"]]
    out["aggregate"] = aggregate(results)
    out["table"] = table_rows(results)
    return out
