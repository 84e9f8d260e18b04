"""`write_report`: everything the report directory holds, from one results structure.

Files (each written atomically): ``results.json`` (compact results: aggregate metrics, table rows, loss
curves, example generations, sweep), ``table.md``, ``fq_vs_utility.png``, ``loss_curves.png`` (when runs
carry training logs), ``metric_bars.png``, ``pareto.png`` (when the results hold a sweep), ``recovery.png`` (when runs were
attacked: preset ``attacks:``), ``tuning.png`` (when `soul reproduce` tuned: preset ``tune:``) and ``report.html``
embedding all of them.
"""

from __future__ import annotations

import math
import sys
from html import escape
from pathlib import Path
from typing import Any, TextIO

from soul.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from soul.report import plots
from soul.report.html import data_uri, render_html
from soul.report.pareto import FQ, MU, best_at_utility, pareto_front
from soul.report.results import (
    METRIC_COLUMNS,
    ROBUSTNESS_COLUMNS,
    check_row_ranges,
    missing_values,
    optimizer_label,
    reduce_results,
    table_rows,
)
from soul.report.table import markdown_table, text_table
from soul.report.tuning import check_tuning, tuning_html, tuning_markdown
from soul.report.tuning import flags as tuning_flags
from soul.report.verdict import RULE, all_verdicts

BEST_MARK = "★"


def target_utility(rows: list[dict[str, Any]]) -> float | None:
    for row in rows:
        if row["role"] == "target":
            return row.get("model_utility")
    return None


def best_marks(rows: list[dict[str, Any]], fraction: float = 0.95) -> dict[str, str]:
    """Row name -> "★" for, per optimizer (each influence row counts as its own), the unlearned run with the best
    forget quality among those keeping model utility ≥ fraction × the target's."""
    t_mu = target_utility(rows)
    if t_mu is None:
        return {}
    cand = [r for r in rows if r["role"] in ("unlearned", "influence")
            and r.get("forget_quality") is not None and r.get("model_utility") is not None]
    points = [{FQ: r["forget_quality"], MU: r["model_utility"],
               "optimizer": r.get("optimizer") or r.get("name") or r["role"]} for r in cand]
    best = best_at_utility(points, t_mu, fraction)
    return {cand[i]["name"]: BEST_MARK for i in best.values() if i is not None}


SWEEP_RESERVED = {"name", "group", "seed", "optimizer", "optimizer_type", FQ, MU}


def sweep_settings(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's points averaged over seeds: one per setting (a point's ``group``, else its name, else
    the point itself) with ``forget_quality``/``model_utility`` = means, ``*_std`` sample std (None for
    one seed), ``n``, ``seeds`` and the setting's options (lr, gamma, ...)."""
    from soul.report.results import mean_std

    groups: dict[str, list[dict[str, Any]]] = {}
    for i, p in enumerate(points):
        groups.setdefault(str(p.get("group") or p.get("name") or f"#{i}"), []).append(p)
    settings = []
    for group, pts in groups.items():
        first = pts[0]
        setting = {k: v for k, v in first.items() if k not in SWEEP_RESERVED}
        setting.update({"group": group, "optimizer": first.get("optimizer"),
                        "optimizer_type": first.get("optimizer_type") or first.get("optimizer"),
                        "n": len(pts), "seeds": [p["seed"] for p in pts if p.get("seed") is not None]})
        for key in (FQ, MU):
            values = [float(p[key]) for p in pts if isinstance(p.get(key), int | float) and math.isfinite(p[key])]
            setting[key], setting[f"{key}_std"] = mean_std(values)
        settings.append(setting)
    return settings


def edge_warnings(settings: list[dict[str, Any]], best: dict[str, int | None], axis: str = "lr") -> list[str]:
    """A warning per optimizer whose best setting's `axis` value (the learning rate) is the smallest or the
    largest its grid tried: the optimum may lie outside the grid, so the comparison is not at its best."""
    out = []
    for opt, i in best.items():
        if i is None or axis not in settings[i]:
            continue
        tried = sorted({s[axis] for s in settings if str(s.get("optimizer")) == opt and axis in s})
        value = settings[i][axis]
        if len(tried) < 2:
            out.append(f"{opt}: only {axis}={value} was tried; the best {axis} is unknown")
        elif value in (tried[0], tried[-1]):
            side = "smallest" if value == tried[0] else "largest"
            out.append(f"{opt}: the best {axis} ({value:g}) is the {side} of the grid {tried}; widen the grid")
    return out


def sweep_summary(sweep: dict[str, Any], t_mu: float | None, fraction: float) -> dict[str, Any]:
    """Per optimizer: the Pareto front and the best setting at the utility floor, over the sweep's points
    averaged over seeds (`sweep_settings`; indices refer to ``settings``), plus grid-edge warnings."""
    settings = sweep_settings(sweep.get("points") or [])
    usable = [i for i, s in enumerate(settings) if s[FQ] is not None and s[MU] is not None]
    by_opt: dict[str, list[int]] = {}
    for i in usable:
        by_opt.setdefault(str(settings[i].get("optimizer")), []).append(i)
    fronts = {opt: [idx[j] for j in pareto_front([settings[i] for i in idx])] for opt, idx in by_opt.items()}
    best: dict[str, int | None] = {}
    if t_mu is not None:
        sub = best_at_utility([settings[i] for i in usable], t_mu, fraction)
        best = {opt: (None if j is None else usable[j]) for opt, j in sub.items()}
    return {"settings": settings, "fronts": fronts, "best": best, "target_utility": t_mu, "fraction": fraction,
            "edge_warnings": edge_warnings(settings, best)}


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "–"
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def _sweep_html(sweep: dict[str, Any], summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    keys = sorted({k for s in settings for k in s} - SWEEP_RESERVED - {"n", "seeds"},
                  key=lambda k: (k != "lr", k))
    head = "".join(f"<th>{escape(k)}</th>" for k in ["optimizer", *keys, "forget quality", "model utility", "seeds",
                                                     "on front"])
    rows = []
    front = {i for idx in summary["fronts"].values() for i in idx}
    best = {i for i in summary["best"].values() if i is not None}
    for i, p in enumerate(settings):
        mark = f" {BEST_MARK}" if i in best else ""
        cells = [optimizer_label({"optimizer": p.get("optimizer"), "optimizer_type": p.get("optimizer_type"),
                                  "config": p}) + mark]
        cells += [str(p.get(k, "")) for k in keys]
        cells += [_pm(p[FQ], p.get(f"{FQ}_std"), ".3g"), _pm(p[MU], p.get(f"{MU}_std"), ".3f"), str(p["n"]),
                  "yes" if i in front else ""]
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    best_rows = []
    for opt, i in summary["best"].items():
        s = settings[i] if i is not None else {}
        best_rows.append(f"<li>{escape(opt)}: " + (
            f"best lr {escape(str(s.get('lr', '–')))}, forget quality {escape(_pm(s[FQ], s.get(FQ + '_std'), '.3g'))}, "
            f"model utility {escape(_pm(s[MU], s.get(MU + '_std'), '.3f'))}" if s else
            "no setting keeps the utility floor") + "</li>")
    warn = "".join(f"<li><b>WARNING</b>: {escape(w)}</li>" for w in summary["edge_warnings"])
    obj = escape(str(sweep.get("objective", "")))
    return (f"<h2>Sweep ({obj})</h2><p>Means ± std over seeds. ★ = per optimizer, best forget quality with "
            f"model utility ≥ {summary['fraction']:.0%} of the target's.</p><h3>Each optimizer at its best "
            f"setting</h3><ul>{''.join(best_rows)}{warn}</ul><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _robustness_html(png: bytes, sentences: list[str]) -> str:
    items = "".join(f"<li>{escape(s)}</li>" for s in sentences)
    return ("<h2>Robustness</h2><p>Each unlearned model attacked (preset <code>attacks:</code>): relearning = a "
            "few fine-tuning steps on some forget authors, then the held-out authors scored; b-bit = weights "
            "rounded to b bits; paraphrase = the forget questions reworded. Recovery = (after − unlearned) / "
            "(target − unlearned) of the forget probability: 0 = the attack brought nothing back, 1 = back at "
            "the target's level; the dashed line is the retain model's relearning from scratch. Lower is more "
            f"robust. {escape(RULE)}</p>"
            f'<img alt="Recovery per objective and optimizer" src="{data_uri(png)}">'
            + (f"<ul>{items}</ul>" if items else ""))


def write_report(results: dict[str, Any], out_dir: str | Path, *, fraction: float = 0.95,
                 title: str = "soul: first-order vs second-order unlearning", n_examples: int = 3,
                 stream: TextIO | str | None = "stdout") -> dict[str, Path]:
    """Write the report directory for `results` (layout in `soul.report.results`); print the table to
    `stream` ("stdout": the current sys.stdout; None: silent). Returns the written files by name."""
    if stream == "stdout":
        stream = sys.stdout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compact = reduce_results(results, n_examples)
    rows = table_rows(compact)
    marks = best_marks(rows, fraction)
    problems = check_row_ranges(rows) + missing_values(rows)
    files: dict[str, Path] = {}
    images: dict[str, bytes] = {}

    if any(r.get("forget_quality") is not None or r.get("model_utility") is not None for r in rows) or not any(
            r.get(c.key) is not None for r in rows for c in METRIC_COLUMNS):
        # Only TOFU-style results have these axes; a copyright / detox / WMDP report would draw an empty plot.
        images["Forget quality vs model utility"] = plots.fq_mu_scatter(rows)
        files["fq_vs_utility.png"] = write_bytes_atomic(out / "fq_vs_utility.png",
                                                        images["Forget quality vs model utility"])
    curves = plots.loss_curves(compact["runs"])
    if curves is not None:
        images["Training loss per step: first order vs second order"] = curves
        files["loss_curves.png"] = write_bytes_atomic(out / "loss_curves.png", curves)
    images["Metrics per model"] = plots.metric_bars(rows)
    files["metric_bars.png"] = write_bytes_atomic(out / "metric_bars.png", images["Metrics per model"])

    sweep_html = ""
    sweep = compact.get("sweep")
    if sweep and sweep.get("points"):
        summary = sweep_summary(sweep, target_utility(rows), fraction)
        compact["sweep"] = {**sweep, **summary}
        retain = next(({FQ: r.get("forget_quality"), MU: r.get("model_utility")} for r in rows
                       if r["role"] == "retain"), None)
        png = plots.pareto_plot(summary["settings"], summary["target_utility"], retain, fraction, summary["best"])
        images["Sweep: Pareto front of forget quality vs model utility"] = png
        files["pareto.png"] = write_bytes_atomic(out / "pareto.png", png)
        sweep_html = _sweep_html(sweep, summary)

    tune_html, tuning = "", compact.get("tuning")
    if tuning is not None:  # `soul reproduce` with a tune: block (older results have none)
        check_tuning(tuning)
        png = plots.tuning_plot(tuning["settings"], str((tuning.get("rule") or {}).get("metric", FQ)))
        if png is not None:
            files["tuning.png"] = write_bytes_atomic(out / "tuning.png", png)
        tune_html = tuning_html(tuning, data_uri(png) if png is not None else None)

    # A sweep's rows are settings of one objective (lr × …), not the optimizers of a comparison: its verdict is
    # the best setting per optimizer (sweep summary), not each setting against the first AdamW one. Every test
    # of the report is in one Holm family (`soul.report.verdict`).
    perf_verdicts, robust_verdicts = all_verdicts(rows, performance="sweep" not in results)
    robustness_html = ""
    if any(r.get(c.key) is not None for r in rows for c in ROBUSTNESS_COLUMNS if c.key.endswith("_prob")):
        from soul.attack.report import recovery_plot

        png = recovery_plot(rows, "prob")
        files["recovery.png"] = write_bytes_atomic(out / "recovery.png", png)
        compact["robustness_verdicts"] = robust_verdicts
        robustness_html = _robustness_html(png, [v["sentence"] for v in compact["robustness_verdicts"]])

    compact["best_at_utility"] = {"fraction": fraction, "runs": sorted(marks)}
    compact["verdicts"] = perf_verdicts
    sentences = [v["sentence"] for v in compact["verdicts"]]
    compact["problems"] = problems
    files["results.json"] = write_json_atomic(out / "results.json", compact)
    md = markdown_table(rows, marks)
    if any(r.get("n", 1) > 1 for r in rows):
        md += "\nCells: mean ± std over seeds (sample std).\n"
    if marks:
        md += f"\n{BEST_MARK} per optimizer: best forget quality at model utility ≥ {fraction:.0%} of the target's.\n"
    if sentences:
        md += "\n## Verdict\n\n" + RULE + "\n\n" + "".join(f"- {s}\n" for s in sentences)
    if tuning is not None:
        md += tuning_markdown(tuning)
    if compact.get("robustness_verdicts"):
        md += "\n## Robustness\n\n" + ("" if sentences else RULE + "\n\n") + "".join(f"- {v['sentence']}\n" for v in compact["robustness_verdicts"])
    files["table.md"] = write_text_atomic(out / "table.md", md)
    notes = [f"{k}: {v}" for k, v in (compact.get("meta") or {}).items() if isinstance(v, str | int | float)]
    notes += [f"WARNING: {p}" for p in problems]
    if sweep_html:
        notes += [f"WARNING: {w}" for w in compact["sweep"]["edge_warnings"]]
    warnings = tuning_flags(tuning) if tuning is not None else []
    notes += [f"WARNING: tuning {w}" for w in warnings]
    html = render_html(title=title, rows=rows, runs=compact["runs"], images=images, marks=marks, notes=notes,
                       sweep_html=sweep_html, verdicts=sentences, robustness_html=robustness_html,
                       tuning_html=tune_html)
    files["report.html"] = write_text_atomic(out / "report.html", html)
    if stream is not None:
        print(text_table(rows, marks), file=stream)
        for sentence in sentences + [v["sentence"] for v in compact.get("robustness_verdicts", [])]:
            print(sentence, file=stream)
        for p in problems + [f"tuning {w}" for w in warnings]:
            print(f"WARNING: {p}", file=stream)
        print(f"report written to {out / 'report.html'}", file=stream)
    return files
