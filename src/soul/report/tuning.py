"""The report's "Tuning" section (results.json ``tuning``, written by `soul.pipeline.tune`): per tuned
setting a table of its grid points and the choice, grid-edge flags as warnings, and Markdown lines for
table.md. A results file without ``tuning`` (older reports, ``--no-tune``, `soul sweep`) has no section."""

from __future__ import annotations

import math
from html import escape
from typing import Any


def check_tuning(tuning: Any) -> dict[str, Any]:
    """`tuning` when it has the layout the report reads, else a one-line ValueError (a hand-edited file)."""
    if not isinstance(tuning, dict) or not isinstance(tuning.get("settings"), dict):
        raise ValueError("results: 'tuning' must be a mapping with 'settings' (written by soul reproduce)")
    for key, s in tuning["settings"].items():
        if not isinstance(s, dict):
            raise ValueError(f"results: tuning.settings.{key} must be a mapping")
        if s.get("tuned"):
            points, i = s.get("points"), s.get("chosen_index")
            if not isinstance(points, list) or not all(isinstance(p, dict) for p in points) or not (
                    isinstance(i, int) and 0 <= i < len(points)):
                raise ValueError(f"results: tuning.settings.{key}: expected 'points' (a list of mappings) and "
                                 "'chosen_index' (an index into them)")
    return tuning


def _fmt(v: Any, spec: str = ".3g") -> str:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return format(v, spec)
    return "–"


def _options(options: Any) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in (options or {}).items())


def flags(tuning: dict[str, Any]) -> list[str]:
    """``"<objective>/<entry>: <flag>"`` for every flag (grid edge, no admissible setting)."""
    return [f"{k}: {f}" for k, s in tuning["settings"].items() for f in s.get("flags") or []]


def _rule_text(tuning: dict[str, Any]) -> str:
    rule = tuning.get("rule") or {}
    guards = []
    if rule.get("utility_fraction") is not None:
        guards.append(f"model utility ≥ {_fmt(rule['utility_fraction'], 'g')} × the target's")
    if rule.get("max_abs_privleak") is not None:
        guards.append(f"|PrivLeak| ≤ {_fmt(rule['max_abs_privleak'], 'g')}")
    if rule.get("min_retain_rouge_fraction") is not None:
        guards.append(f"retain ROUGE-L ≥ {_fmt(rule['min_retain_rouge_fraction'], 'g')} × the target's")
    return (f"highest mean {rule.get('metric', '?')} over the tuning seeds among the points with "
            f"{' and '.join(guards) or 'no guard'}; ties go to the smaller mean {rule.get('tie', '?')}")


def tuning_markdown(tuning: dict[str, Any]) -> str:
    """table.md's "Tuning" section: the rule, both seed sets, and each setting's choice and flags."""
    lines = [f"\n## Tuning\n\nRule: {_rule_text(tuning)}. Tuning seeds {tuning.get('tune_seeds')}; the table "
             f"above uses only the evaluation seeds {tuning.get('eval_seeds')}.\n"]
    for key, s in tuning["settings"].items():
        if not s.get("tuned"):
            lines.append(f"- {key}: {s.get('note', 'not tuned')}")
            continue
        admissible = sum(1 for p in s["points"] if p.get("admissible"))
        lines.append(f"- {key}: chose {_options(s.get('chosen'))} from {len(s['points'])} points "
                     f"({admissible} admissible)" + (f"; {s['extension']}" if s.get("extension") else "")
                     + "".join(f"; WARNING: {f}" for f in s.get("flags") or []))
    return "\n".join(lines) + "\n"


def _setting_html(key: str, s: dict[str, Any], metric: str, tie: str) -> str:
    if not s.get("tuned"):
        return f"<h3>{escape(key)}</h3><p>{escape(s.get('note', 'not tuned'))}</p>"
    points = s["points"]
    option_keys = list(dict.fromkeys(k for p in points for k in (p.get("options") or {})))
    seeds = list(dict.fromkeys(k for p in points for k in ((p.get("metric") or {}).get("per_seed") or {})))
    extra = [tie] if tie != "update_norm_total" else []  # the tie-breaker, when it is not the norm shown
    head = [*option_keys, *(f"{metric} s{x}" for x in seeds), f"{metric} mean", "model utility", "PrivLeak",
            "retain ROUGE-L", "total ‖Δθ‖", *extra, "admissible", ""]
    rows = []
    for i, p in enumerate(points):
        per_seed = (p.get("metric") or {}).get("per_seed") or {}
        cells = [_fmt((p.get("options") or {}).get(k)) for k in option_keys]
        cells += [_fmt(per_seed.get(x)) for x in seeds]
        cells += [_fmt((p.get("metric") or {}).get("mean")), _fmt(p.get("model_utility")), _fmt(p.get("privleak")),
                  _fmt(p.get("retain_rouge")), _fmt(p.get("update_norm_total")), *(_fmt(p.get(k)) for k in extra),
                  "yes" if p.get("admissible") else f"no: {p.get('reason', '')}",
                  ("chosen" if i == s["chosen_index"] else "") + (" (extension)" if p.get("extension") else "")]
        style = ' style="font-weight:bold"' if i == s["chosen_index"] else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    notes = ([f"<li>{escape(s['extension'])}</li>"] if s.get("extension") else []) + [
        f"<li><b>WARNING</b>: {escape(f)}</li>" for f in s.get("flags") or []]
    return (f"<h3>{escape(key)}: {escape(_options(s.get('chosen')))}</h3>"
            + (f"<ul>{''.join(notes)}</ul>" if notes else "")
            + "<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def tuning_html(tuning: dict[str, Any], image: str | None) -> str:
    """The "Tuning" section of report.html; `image` is the plot's data URI (None: no plot)."""
    rule = tuning.get("rule") or {}
    metric, tie = str(rule.get("metric", "metric")), str(rule.get("tie", "update_norm_total"))
    parts = "".join(_setting_html(k, s, metric, tie) for k, s in tuning["settings"].items())
    img = f'<img alt="Tuning: {escape(metric)} vs lr" src="{image}">' if image else ""
    return (f"<h2>Tuning</h2><p>Rule: {escape(_rule_text(tuning))}. Tuning seeds "
            f"{escape(str(tuning.get('tune_seeds')))}; every number of the table and the verdicts above comes "
            f"from the evaluation seeds {escape(str(tuning.get('eval_seeds')))} only, each tuned optimizer at its "
            "chosen setting (bold). PrivLeak in percent (0 = like the retain model).</p>" + parts + img)
