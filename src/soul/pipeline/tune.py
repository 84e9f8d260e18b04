"""The tuning stage of `soul reproduce` (preset ``tune:``): each objective × tuned optimizer entry runs its
option grid on the *tuning* seeds, a stated rule picks one setting, and only that setting runs on the
evaluation seeds (the table and verdicts never see a tuning seed, so no optimizer is scored on the data order
its setting was picked for).

The rule (`TuneRule`), on means over the tuning seeds: a point is *admissible* when its model utility is at
least ``utility_fraction`` × the target's, its |PrivLeak| at most ``max_abs_privleak`` and its retain ROUGE-L
at least ``min_retain_rouge_fraction`` × the target's (guards left at null are off); the admissible point with
the highest ``metric`` is chosen, metric ties (relative 1e-9) going to the smaller mean ``tie`` diagnostic
(total ‖Δθ‖: the setting that moved the model less), then to the earlier point. With no admissible point the
highest-utility point is chosen and flagged. A choice on the first or last learning rate of the grid is
extended once (``extend_edges``): the next lr in that direction (the edge × the ratio to its neighbour) runs on
the tuning seeds and the rule is applied again; a choice still on the edge, or on a one-lr grid, is flagged.

Each tuning run's record (metrics and diagnostics, no model) is kept as ``<out>/tune/<run name>.json`` with a
content key (`record_key`): a rerun into the same report directory reuses the records whose key matches and
runs the others, so a killed tuning stage resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soul.pipeline.common import CACHE_VERSION, Progress, hash_records, path_under, resolve_device, sha
from soul.pipeline.grid import grid_points, tuning_specs
from soul.pipeline.preset_types import Preset, TuneRule
from soul.report.results import COLUMN_BY_KEY, COLUMNS, agg, column_value, mean_std

# Metrics the rule can maximise: the TOFU table's columns that are not lower-is-better.
RULE_METRICS = tuple(c.key for c in COLUMNS if c.metrics and c.group == "tofu" and c.higher_is_better is not False)
# Tie-breakers: how far an optimizer moved the model (smaller wins).
TIE_KEYS = ("update_norm_total", "update_norm_mean", "displacement")
TIE_REL = 1e-9
RunOne = Callable[[dict[str, Any]], dict[str, Any]]  # spec -> run record with "metrics" (model discarded)


# ------------------------------------------------------------------------------------------------ values
def run_value(run: dict[str, Any], key: str) -> float | None:
    """One run's `key`: a table column (metric or diagnostic) or ``privleak``; None when missing or not finite."""
    value = agg(run.get("metrics") or {}, ("privleak",)) if key == "privleak" else column_value(run, COLUMN_BY_KEY[key])
    return value if value is not None and math.isfinite(value) else None


def _mean(runs: list[dict[str, Any]], key: str) -> float | None:
    return mean_std([v for v in (run_value(r, key) for r in runs) if v is not None])[0]


def target_values(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The target model's model utility and retain ROUGE-L: the rule's guards are fractions of them."""
    target = next((r for r in runs if r.get("role") == "target"), {})
    return {"model_utility": run_value(target, "model_utility"), "retain_rouge": run_value(target, "retain_rouge")}


# ------------------------------------------------------------------------------------------------ the rule
def summarize(point: dict[str, Any], runs: list[dict[str, Any]], rule: TuneRule) -> dict[str, Any]:
    """A grid point over its tuning-seed runs: the metric per seed and its mean, and the guards' means."""
    return {"options": point, "runs": [r["name"] for r in runs], "seeds": [r.get("seed") for r in runs],
            "metric": {"per_seed": {str(r.get("seed")): run_value(r, rule.metric) for r in runs},
                       "mean": _mean(runs, rule.metric)},
            **{k: _mean(runs, k) for k in ("model_utility", "privleak", "retain_rouge", "update_norm_total", rule.tie)}}


def _floor_problem(name: str, value: float | None, fraction: float | None, target: float | None) -> str | None:
    if fraction is None:
        return None
    if target is None:
        return f"the target's {name} is unknown"
    if value is None:
        return f"{name} not measured"
    # tolerance: 0.95 × 0.8 is 0.76000000000000001 in floating point
    return None if value >= fraction * target - 1e-12 else f"{name} {value:.4g} < {fraction:g} × target's {target:.4g}"


def admissibility(summary: dict[str, Any], rule: TuneRule, target: dict[str, float | None]) -> tuple[bool, str]:
    """(admissible, reason): the reason names every guard the point fails, else "admissible"."""
    problems = [_floor_problem("model utility", summary["model_utility"], rule.utility_fraction,
                               target["model_utility"]),
                _floor_problem("retain ROUGE-L", summary["retain_rouge"], rule.min_retain_rouge_fraction,
                               target["retain_rouge"])]
    if summary["metric"]["mean"] is None:
        problems.insert(0, f"{rule.metric} not measured")
    if rule.max_abs_privleak is not None:
        leak = summary["privleak"]
        problems.append("PrivLeak not measured" if leak is None else
                        f"|PrivLeak| {abs(leak):.3g} > {rule.max_abs_privleak:g}" if abs(leak) > rule.max_abs_privleak
                        else None)
    found = [p for p in problems if p]
    return not found, "; ".join(found) or "admissible"


def choose(points: list[dict[str, Any]], rule: TuneRule) -> int | None:
    """Index of the admissible point with the highest mean metric (ties: smaller mean `rule.tie`, then the
    earlier point); None when no point is admissible."""
    ok = [i for i, p in enumerate(points) if p["admissible"]]
    if not ok:
        return None
    best = max(points[i]["metric"]["mean"] for i in ok)
    tied = [i for i in ok if math.isclose(points[i]["metric"]["mean"], best, rel_tol=TIE_REL)]
    return min(tied, key=lambda i: (math.inf if points[i][rule.tie] is None else points[i][rule.tie], i))


def fallback(points: list[dict[str, Any]]) -> int:
    """No admissible point: the one that kept the most model utility (the least damage), else the first."""
    usable = [i for i, p in enumerate(points) if p["model_utility"] is not None]
    return max(usable, key=lambda i: (points[i]["model_utility"], -i)) if usable else 0


# ------------------------------------------------------------------------------------------------ grid edges
def edge_side(points: list[dict[str, Any]], index: int) -> str | None:
    """"low"/"high" when the chosen point's lr is the smallest/largest tried, "single" when only one lr was."""
    lrs = sorted({p["options"]["lr"] for p in points})
    lr = points[index]["options"]["lr"]
    if len(lrs) < 2:
        return "single"
    return "low" if lr == lrs[0] else "high" if lr == lrs[-1] else None


def extended_lr(lrs: list[float], side: str) -> float:
    """The next lr past the grid's edge on `side`: the edge × its ratio to the neighbouring grid value,
    rounded to 12 significant digits (1e-4 · 1e-4 / 2e-4 is 4.9999999999999996e-05 in floats, and the lr
    names the run)."""
    lrs = sorted(lrs)
    lr = lrs[0] * lrs[0] / lrs[1] if side == "low" else lrs[-1] * lrs[-1] / lrs[-2]
    return float(f"{lr:.12g}")


# ------------------------------------------------------------------------------------------------ records
def record_key(spec: dict[str, Any], ctx: dict[str, Any], preset: Preset) -> str:
    """What a tuning run's result depends on: the target model, the unlearning data, the run's full config
    and the evaluation (settings, data and reference); a record with another key is rerun."""
    task = preset.task_impl
    data = ctx["data"]
    return sha({"v": CACHE_VERSION, "target": ctx["target_fingerprint"],
                "data": {s: hash_records(data[s]) for s in task.splits(preset)},
                "run": {k: spec[k] for k in ("objective", "optimizer_type", "config")},
                "eval": task.eval_cache_key(preset, data, ctx["reference"]),
                "dtype": preset.dtype, "device": resolve_device(preset.device)})


def cached_run(path: Path, key: str) -> dict[str, Any] | None:
    """The run record stored at `path` under `key`; None when absent, not soul's regular JSON file, or made
    for another key (then the caller reruns and replaces it: the tune/ directory is soul's own)."""
    from soul.safety import read_json_object

    record = read_json_object(path)
    if record is None or record.get("key") != key or not isinstance(record.get("run"), dict):
        return None
    return record["run"]


class Tuner:
    """Runs (or reuses) tuning runs and applies the rule for each objective × tuned optimizer entry."""

    def __init__(self, preset: Preset, ctx: dict[str, Any], out: Path, progress: Progress, run_one: RunOne) -> None:
        assert preset.tune is not None
        self.preset, self.tune, self.ctx, self.out = preset, preset.tune, ctx, out
        self.progress, self.run_one = progress, run_one
        self.target = target_values(ctx["runs"])
        self.done = 0

    def runs(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from soul.io import write_json_atomic

        out = []
        for spec in specs:
            path = path_under(self.out, "tune", f"{spec['name']}.json")
            key = record_key(spec, self.ctx, self.preset)
            run = cached_run(path, key)
            self.done += 1
            if run is None:
                self.progress.say(f"tuning run {self.done}: {spec['name']}")
                run = self.run_one(spec)
                write_json_atomic(path, {"key": key, "run": run})
            else:
                self.progress.say(f"tuning run {self.done}: {spec['name']}: cached record {path}")
            out.append(run)
        return out

    def points(self, objective: str, optimizer: str, points: list[dict[str, Any]], extension: bool = False
               ) -> list[dict[str, Any]]:
        specs = tuning_specs(self.preset, objective, optimizer, points, self.tune.seeds)
        runs = self.runs(specs)
        out = []
        for point in points:
            mine = [r for s, r in zip(specs, runs) if s["point"] == point]
            summary = summarize(point, mine, self.tune.rule)
            summary["admissible"], summary["reason"] = admissibility(summary, self.tune.rule, self.target)
            summary["extension"] = extension
            out.append(summary)
        return out

    def select(self, points: list[dict[str, Any]]) -> tuple[int, list[str]]:
        index = choose(points, self.tune.rule)
        if index is not None:
            return index, []
        index = fallback(points)
        return index, ["no admissible setting: chose the point with the highest model utility"]

    def setting(self, objective: str, optimizer: str) -> dict[str, Any]:
        """One objective × optimizer entry: its grid, the choice, and at most one extension past an edge."""
        axes = self.tune.grid[optimizer]
        points = self.points(objective, optimizer, grid_points(axes))
        index, flags = self.select(points)
        side, note = edge_side(points, index), None
        lr = points[index]["options"]["lr"]
        if side == "single":
            flags.append(f"only lr {lr:g} was tried: a one-point lr grid cannot be extended; the best lr is unknown")
        elif side is not None and not self.tune.extend_edges:
            flags.append(f"chosen lr {lr:g} is the {'smallest' if side == 'low' else 'largest'} of the grid "
                         "(extend_edges is off)")
        elif side is not None:
            new_lr = extended_lr([p["options"]["lr"] for p in points], side)
            note = (f"chosen lr {lr:g} was the {'smallest' if side == 'low' else 'largest'} of the grid: "
                    f"extended once to lr {new_lr:.3g}")
            points += self.points(objective, optimizer, grid_points({**axes, "lr": [new_lr]}), extension=True)
            index, flags = self.select(points)
            if edge_side(points, index) is not None:
                flags.append(f"at grid edge after one extension (lr {points[index]['options']['lr']:.3g})")
        return {"objective": objective, "optimizer": optimizer, "tuned": True, "points": points,
                "chosen_index": index, "chosen": points[index]["options"],
                "admissible_found": any(p["admissible"] for p in points), "extension": note, "flags": flags}


def run_tuning(preset: Preset, specs: list[dict[str, Any]], ctx: dict[str, Any], out: Path, progress: Progress,
               run_one: RunOne) -> dict[str, Any]:
    """The ``tuning`` section of results.json for the evaluation runs `specs`: the rule, both seed sets and,
    per ``"<objective>/<optimizer entry>"``, every point and the choice; entries outside the grid are listed
    as not tuned (they run at their preset options)."""
    assert preset.tune is not None
    tuner = Tuner(preset, ctx, out, progress, run_one)
    settings: dict[str, dict[str, Any]] = {}
    for obj, opt in dict.fromkeys((s["objective"], s["optimizer"]) for s in specs):
        key = f"{obj}/{opt}"
        if opt in preset.tune.grid:
            settings[key] = tuner.setting(obj, opt)
            progress.say(f"tuning {key}: chose {settings[key]['chosen']}"
                         + "".join(f"; WARNING: {f}" for f in settings[key]["flags"]))
        else:
            settings[key] = {"objective": obj, "optimizer": opt, "tuned": False,
                             "note": "not tuned: runs at its preset options"}
    rule = preset.tune.rule
    return {"rule": {k: getattr(rule, k) for k in ("metric", "utility_fraction", "max_abs_privleak",
                                                    "min_retain_rouge_fraction", "tie")},
            "extend_edges": preset.tune.extend_edges, "tune_seeds": list(preset.tune.seeds),
            "eval_seeds": list(preset.seeds), "target": tuner.target, "settings": settings}


def chosen_options(tuning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``"<objective>/<entry>"`` → the chosen options of every tuned setting."""
    return {k: s["chosen"] for k, s in tuning["settings"].items() if s.get("tuned")}


def tuned_label(label: str, setting: dict[str, Any] | None) -> str:
    """A table row label with its tuning: ``GradDiff + AdamW (FO), lr 3e-05 (tuned)`` or ``... (not tuned)``."""
    if setting is None:
        return label
    if not setting.get("tuned"):
        return f"{label} (not tuned)"
    return f"{label}, " + ", ".join(f"{k} {v:.3g}" for k, v in setting["chosen"].items()) + " (tuned)"
