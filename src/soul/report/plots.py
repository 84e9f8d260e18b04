"""Report figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state) and returned as
PNG bytes so the caller writes them atomically and embeds them in report.html.

* `fq_mu_scatter`: forget quality (log scale) vs model utility, the target and retain models marked;
* `loss_curves`: per-step training loss of each objective, first order vs second order;
* `metric_bars`: one bar chart per table metric, one bar per model;
* `pareto_plot`: sweep points per optimizer with each optimizer's Pareto front and the utility floor;
* `tuning_plot`: the tuning stage's metric vs lr per tuned setting, the chosen point circled.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from soul.literal_text import literal_text
from soul.report.pareto import FQ, MU, pareto_front
from soul.report.results import COLUMNS, OBJECTIVE_NAMES, OPTIMIZER_ORDER, optimizer_label, optimizer_type

ROLE_STYLE = {"target": ("*", "tab:red"), "retain": ("*", "tab:green"), "influence": ("D", "tab:purple")}
ORDER_MARKER = {"FO": "o", "SO": "^", "sign": "s"}
PALETTE = ["tab:blue", "tab:orange", "tab:cyan", "tab:brown", "tab:pink", "tab:olive", "tab:gray"]
# Forget quality is a p-value that can underflow to 0; log axes need a positive floor.
FQ_FLOOR = 1e-12


F = TypeVar("F", bound=Callable[..., Any])


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _objective_colors(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    colors: dict[str, str] = {}
    for row in rows:
        obj = row.get("objective")
        if obj and obj not in colors:
            colors[obj] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def _fq(v: float) -> float:
    return max(float(v), FQ_FLOOR)


class _PlainMinor(LogFormatter):
    """Minor log ticks in plain text ("0.3", not "3e-01"); LogFormatter still picks which ones get a label."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_axis(ax: Any, axis: str = "y") -> None:
    """A log axis labelled in plain text ("0.001", "1e-05"): `literal_text` turns mathtext off, and the
    default log tick labels are mathtext ("$\\mathdefault{10^{-3}}$"), which then print as that source.
    Minor ticks (2, 3, … × 10^k) are labelled when the axis spans about a decade or less (matplotlib's
    `minor_thresholds`): a tuning curve over lr 5e-5 … 2e-4 has no power of ten to label otherwise."""
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(_PlainMinor(labelOnlyBase=False))


@literal_text
def fq_mu_scatter(rows: Sequence[dict[str, Any]], title: str = "Forget quality vs model utility") -> bytes:
    """Scatter of the table rows: x = model utility, y = forget quality (log). Rows missing either are
    skipped. Colour = objective, marker = optimizer order (○ first order, △ second order, □ sign); the
    target (red ★), retain (green ★) and influence (purple ◆) models are marked and labelled. Rows averaged
    over seeds carry ± std error bars on both axes."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    colors = _objective_colors(rows)
    for row in rows:
        fq, mu = row.get("forget_quality"), row.get("model_utility")
        if fq is None or mu is None:
            continue
        role = row["role"]
        if role in ROLE_STYLE:
            marker, color = ROLE_STYLE[role]
            size = 220 if marker == "*" else 80
        else:
            marker = ORDER_MARKER.get(OPTIMIZER_ORDER.get(row.get("optimizer_type") or row.get("optimizer") or "", ""), "D")
            color, size = colors[row["objective"]], 70
        fq_std, mu_std = row.get("forget_quality_std"), row.get("model_utility_std")
        if fq_std is not None or mu_std is not None:
            # Log axis: the lower whisker stops at the floor instead of crossing zero.
            low = None if fq_std is None else _fq(fq) - max(_fq(fq - fq_std), FQ_FLOOR)
            yerr = None if fq_std is None else [[low], [fq_std]]
            ax.errorbar([mu], [_fq(fq)], xerr=mu_std, yerr=yerr, fmt="none", ecolor=color, elinewidth=1,
                        capsize=3, zorder=2)
        ax.scatter([mu], [_fq(fq)], marker=marker, s=size, color=color, edgecolor="black", linewidth=0.5,
                   label=row["label"], zorder=3)
        if role in ("target", "retain"):  # the rest are told apart by the legend (points often coincide)
            ax.annotate(row["label"], (mu, _fq(fq)), textcoords="offset points", xytext=(6, 4), fontsize=7)
    _log_axis(ax, "y")
    ax.set_xlabel("Model utility (higher is better)")
    ax.set_ylabel("Forget quality, KS p-value (log; higher is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


@literal_text
def loss_curves(runs: Sequence[dict[str, Any]]) -> bytes | None:
    """One panel per objective with the per-step training loss of each optimizer (solid = first order,
    dashed = second order, dotted = sign); every seed is drawn, in one colour per optimizer, so the spread
    shows. None when no unlearned run has a curve."""
    by_obj: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("role", "unlearned") == "unlearned" and run.get("curve"):
            by_obj.setdefault(run["objective"], []).append(run)
    if not by_obj:
        return None
    n = len(by_obj)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.4 * nrows))
    for k, (obj, obj_runs) in enumerate(by_obj.items()):
        ax = fig.add_subplot(nrows, cols, k + 1)
        colors: dict[str, str] = {}
        for run in obj_runs:
            steps = [p[0] for p in run["curve"]]
            losses = [p[1] for p in run["curve"]]
            order = OPTIMIZER_ORDER.get(optimizer_type(run), "")
            name = optimizer_label(run)
            first = name not in colors
            color = colors.setdefault(name, PALETTE[len(colors) % len(PALETTE)])
            ax.plot(steps, losses, linestyle={"SO": "--", "sign": ":"}.get(order, "-"), marker=".", markersize=3,
                    color=color, alpha=0.85, label=name if first else None)
        ax.set_title(f"{OBJECTIVE_NAMES.get(obj, obj)}: training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


@literal_text
def metric_bars(rows: Sequence[dict[str, Any]]) -> bytes:
    """A grid of bar charts, one per table column, one bar per model (forget quality on a log axis), with
    ± std error bars for rows averaged over seeds."""
    # Robustness recoveries have their own figure (`soul.attack.report.recovery_plot`).
    cols = [c for c in COLUMNS if c.group != "robustness" and any(r.get(c.key) is not None for r in rows)]
    ncols = 4
    nrows = max(1, math.ceil(len(cols) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows + 0.8))
    labels = [r["label"] for r in rows]
    colors = []
    obj_colors = _objective_colors(rows)
    for r in rows:
        colors.append(ROLE_STYLE[r["role"]][1] if r["role"] in ROLE_STYLE else obj_colors[r["objective"]])
    hatches = [{"SO": "//", "sign": ".."}.get(OPTIMIZER_ORDER.get(r.get("optimizer_type") or r.get("optimizer") or ""), "")
               for r in rows]
    for k, col in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        values = [r.get(col.key) for r in rows]
        heights = [0.0 if v is None else (_fq(v) if col.key == "forget_quality" else v) for v in values]
        stds = [r.get(f"{col.key}_std") or 0.0 for r in rows]
        yerr = stds if any(stds) else None
        if yerr is not None and col.key == "forget_quality":  # log axis: clip the lower whisker at the floor
            yerr = [[h - max(h - e, FQ_FLOOR) for h, e in zip(heights, stds)], stds]
        bars = ax.bar(range(len(rows)), heights, color=colors, edgecolor="black", linewidth=0.4, yerr=yerr,
                      capsize=2, error_kw={"elinewidth": 0.8})
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        if col.key == "forget_quality":
            _log_axis(ax, "y")
        arrow = {True: " ↑", False: " ↓", None: ""}[col.higher_is_better]
        ax.set_title(col.title + arrow, fontsize=10)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


@literal_text
def pareto_plot(points: Sequence[dict[str, Any]], target_utility: float | None = None,
                retain: dict[str, float] | None = None, fraction: float = 0.95,
                best: dict[str, int | None] | None = None) -> bytes:
    """Sweep points (forget quality vs utility; means with ± std whiskers when averaged over seeds) coloured
    by optimizer, each optimizer's Pareto front as a step line, the utility floor ``fraction ×
    target_utility`` as a vertical line, and the best point at that floor per optimizer circled."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(str(p.get("optimizer")), []).append(i)
    for g, (opt, idx) in enumerate(groups.items()):
        color = PALETTE[g % len(PALETTE)]
        sub = [points[i] for i in idx]
        name = optimizer_label({"optimizer": opt, "optimizer_type": sub[0].get("optimizer_type") or opt})
        ax.scatter([p[MU] for p in sub], [_fq(p[FQ]) for p in sub], color=color, alpha=0.6, s=30,
                   marker=ORDER_MARKER.get(OPTIMIZER_ORDER.get(sub[0].get("optimizer_type") or opt, ""), "D"),
                   label=f"{name} settings")
        for p in sub:  # settings averaged over seeds: ± std whiskers (the lower one clipped at the log floor)
            fq_std, mu_std = p.get(f"{FQ}_std"), p.get(f"{MU}_std")
            if fq_std or mu_std:
                low = _fq(p[FQ]) - max(_fq(p[FQ] - (fq_std or 0.0)), FQ_FLOOR)
                ax.errorbar([p[MU]], [_fq(p[FQ])], xerr=mu_std, yerr=[[low], [fq_std or 0.0]], fmt="none",
                            ecolor=color, elinewidth=0.8, alpha=0.6)
        front = [sub[i] for i in pareto_front(sub)]
        ax.step([p[MU] for p in front], [_fq(p[FQ]) for p in front], where="post", color=color, linewidth=1.5,
                label=f"{name} Pareto front")
        if best and best.get(opt) is not None:
            b = points[best[opt]]
            ax.scatter([b[MU]], [_fq(b[FQ])], s=220, facecolors="none", edgecolors=color, linewidths=2,
                       label=f"{name}: best FQ at utility ≥ {fraction:.0%} of target", zorder=4)
    if target_utility is not None:
        ax.axvline(fraction * target_utility, color="tab:red", linestyle=":", linewidth=1,
                   label=f"{fraction:.0%} of target utility")
    if retain and retain.get(FQ) is not None and retain.get(MU) is not None:
        ax.scatter([retain[MU]], [_fq(retain[FQ])], marker="*", s=220, color="tab:green", edgecolor="black",
                   label="Retain", zorder=4)
    _log_axis(ax, "y")
    ax.set_xlabel("Model utility")
    ax.set_ylabel("Forget quality (log)")
    ax.set_title("Sweep: forget quality vs model utility")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _num_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


@literal_text
def tuning_plot(settings: dict[str, dict[str, Any]], metric: str) -> bytes | None:
    """One panel per tuned setting (``results["tuning"]["settings"]``): the mean `metric` over the tuning
    seeds vs lr (log x; log y for forget quality, a p-value), one line per other option value (max_steps),
    admissible points filled and the others hollow, the chosen point circled, the per-seed values as dots.
    None when no setting was tuned."""
    tuned = [(k, s) for k, s in settings.items() if s.get("tuned") and s.get("points")]
    if not tuned:
        return None
    ncols = min(3, len(tuned))
    nrows = math.ceil(len(tuned) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    log_y = metric == FQ
    for n, (key, setting) in enumerate(tuned):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        points = setting["points"]
        lines: dict[str, list[int]] = {}
        for i, p in enumerate(points):
            rest = ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items() if k != "lr")
            lines.setdefault(rest, []).append(i)
        for g, (rest, idx) in enumerate(lines.items()):
            color = PALETTE[g % len(PALETTE)]
            xy = sorted((_num_or_none((points[i].get("options") or {}).get("lr")),
                         _num_or_none((points[i].get("metric") or {}).get("mean")), i) for i in idx
                        if _num_or_none((points[i].get("options") or {}).get("lr")) is not None)
            drawn = [(x, _fq(y) if log_y else y, i) for x, y, i in xy if y is not None]
            ax.plot([x for x, _, _ in drawn], [y for _, y, _ in drawn], color=color, linewidth=1,
                    label=rest or None)
            for x, y, i in drawn:
                ok = bool(points[i].get("admissible"))
                ax.scatter([x], [y], s=40, color=color if ok else "white", edgecolor=color, linewidth=1.2, zorder=3)
                for v in ((points[i].get("metric") or {}).get("per_seed") or {}).values():
                    if _num_or_none(v) is not None:
                        ax.scatter([x], [_fq(v) if log_y else v], s=8, color="gray", alpha=0.6, zorder=2)
        chosen = setting.get("chosen_index")
        if isinstance(chosen, int) and 0 <= chosen < len(points):
            lr = _num_or_none((points[chosen].get("options") or {}).get("lr"))
            y = _num_or_none((points[chosen].get("metric") or {}).get("mean"))
            if lr is not None and y is not None:
                ax.scatter([lr], [_fq(y) if log_y else y], s=200, facecolors="none", edgecolors="black",
                           linewidths=1.5, zorder=4, label="chosen")
        _log_axis(ax, "x")
        if log_y:
            _log_axis(ax, "y")
        ax.set_xlabel("lr (log)")
        ax.set_ylabel(f"{metric} (mean over tuning seeds)", fontsize=7)
        ax.set_title(key + (" (WARNING: see the tuning table)" if setting.get("flags") else ""), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, title="filled: admissible", title_fontsize=6)
    fig.tight_layout()
    return _png(fig)
