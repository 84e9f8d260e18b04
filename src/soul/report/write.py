"""`write_report`: everything the report directory holds, from one results structure.

Files (each written atomically): ``results.json`` (compact results: aggregate metrics, table rows, loss
curves, example generations, sweep), ``table.md``, ``fq_vs_utility.png``, ``loss_curves.png`` (when runs
carry training logs), ``metric_bars.png``, ``pareto.png`` (when the results hold a sweep) and
``report.html`` embedding all of them.
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path
from typing import Any, TextIO

from soul.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from soul.report import plots
from soul.report.html import render_html
from soul.report.pareto import FQ, MU, best_at_utility, pareto_front
from soul.report.results import METRIC_COLUMNS, OPTIMIZER_NAMES, check_row_ranges, reduce_results, table_rows
from soul.report.table import markdown_table, text_table

BEST_MARK = "★"


def target_utility(rows: list[dict[str, Any]]) -> float | None:
    for row in rows:
        if row["role"] == "target":
            return row.get("model_utility")
    return None


def best_marks(rows: list[dict[str, Any]], fraction: float = 0.95) -> dict[str, str]:
    """Row name -> "★" for, per optimizer (influence counts as its own), the unlearned run with the best
    forget quality among those keeping model utility ≥ fraction × the target's."""
    t_mu = target_utility(rows)
    if t_mu is None:
        return {}
    cand = [r for r in rows if r["role"] in ("unlearned", "influence")
            and r.get("forget_quality") is not None and r.get("model_utility") is not None]
    points = [{FQ: r["forget_quality"], MU: r["model_utility"],
               "optimizer": r.get("optimizer") or r["role"]} for r in cand]
    best = best_at_utility(points, t_mu, fraction)
    return {cand[i]["name"]: BEST_MARK for i in best.values() if i is not None}


def sweep_summary(sweep: dict[str, Any], t_mu: float | None, fraction: float) -> dict[str, Any]:
    """Pareto front per optimizer and best point at the utility floor, for a sweep's points."""
    points = sweep.get("points") or []
    by_opt: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        by_opt.setdefault(str(p.get("optimizer")), []).append(i)
    fronts = {opt: [idx[j] for j in pareto_front([points[i] for i in idx])] for opt, idx in by_opt.items()}
    best = best_at_utility(points, t_mu, fraction) if t_mu is not None else {}
    return {"fronts": fronts, "best": best, "target_utility": t_mu, "fraction": fraction}


def _sweep_html(sweep: dict[str, Any], summary: dict[str, Any]) -> str:
    points = sweep.get("points") or []
    keys = [k for k in ("lr", "gamma", "steps") if any(k in p for p in points)]
    head = "".join(f"<th>{k}</th>" for k in ["optimizer", *keys, "forget quality", "model utility", "on front"])
    rows = []
    front = {i for idx in summary["fronts"].values() for i in idx}
    best = {i for i in summary["best"].values() if i is not None}
    for i, p in enumerate(points):
        mark = f" {BEST_MARK}" if i in best else ""
        cells = [OPTIMIZER_NAMES.get(str(p.get("optimizer")), str(p.get("optimizer"))) + mark]
        cells += [str(p.get(k, "")) for k in keys]
        cells += [f"{p[FQ]:.3g}", f"{p[MU]:.3f}", "yes" if i in front else ""]
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    obj = escape(str(sweep.get("objective", "")))
    return (f"<h2>Sweep ({obj})</h2><p>★ = per optimizer, best forget quality with model utility ≥ "
            f"{summary['fraction']:.0%} of the target's.</p><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


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
    problems = check_row_ranges(rows)
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
        png = plots.pareto_plot(sweep["points"], summary["target_utility"], retain, fraction, summary["best"])
        images["Sweep: Pareto front of forget quality vs model utility"] = png
        files["pareto.png"] = write_bytes_atomic(out / "pareto.png", png)
        sweep_html = _sweep_html(sweep, summary)

    compact["best_at_utility"] = {"fraction": fraction, "runs": sorted(marks)}
    compact["problems"] = problems
    files["results.json"] = write_json_atomic(out / "results.json", compact)
    md = markdown_table(rows, marks)
    if marks:
        md += f"\n{BEST_MARK} per optimizer: best forget quality at model utility ≥ {fraction:.0%} of the target's.\n"
    files["table.md"] = write_text_atomic(out / "table.md", md)
    notes = [f"{k}: {v}" for k, v in (compact.get("meta") or {}).items() if isinstance(v, str | int | float)]
    notes += [f"WARNING: {p}" for p in problems]
    html = render_html(title=title, rows=rows, runs=compact["runs"], images=images, marks=marks, notes=notes,
                       sweep_html=sweep_html)
    files["report.html"] = write_text_atomic(out / "report.html", html)
    if stream is not None:
        print(text_table(rows, marks), file=stream)
        for p in problems:
            print(f"WARNING: {p}", file=stream)
        print(f"report written to {out / 'report.html'}", file=stream)
    return files
