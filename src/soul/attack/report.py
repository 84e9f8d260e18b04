"""Robustness columns for the results table and the recovery plot, from `run_attacks` results.

Columns (`attack_columns`, each a `soul.columns.Column` of group ``"robustness"``; values from
`row_values`):

* ``relearn_recovery_prob`` / ``relearn_recovery_rouge`` — relearning recovery of the held-out forget
  questions. Unlearned rows: the unlearned model's recovery; the retain row: the retain model's baseline
  (what relearning gives from scratch); the target row: None.
* ``relearn_excess_prob`` — unlearned recovery minus the retain baseline (> 0: something was hidden).
* ``quant{b}_recovery_prob`` / ``quant{b}_recovery_rouge`` — recovery after b-bit quantization (one pair per
  bit width run); the target row holds ``target_shift`` there (quantization noise in units of the gap).
* ``paraphrase_recovery_prob`` / ``paraphrase_recovery_rouge`` — the paraphrase probe's recovery.

Recovery figures are signed and unbounded (``bounded=False``): 0 = the unlearned level, 1 = the target's.
`soul.report.results.check_row_ranges` flags negative values of unbounded columns, so an integration should
skip ``group == "robustness"`` columns there (a negative recovery is a legitimate result).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from soul.columns import OBJECTIVE_NAMES, OPTIMIZER_NAMES, Column

GROUP = "robustness"


def bar_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that give bars, each with its bar group (``objective``) and bar (``optimizer``): unlearned runs
    as they are; one-shot influence as an objective of its own, "influence", whose bar is "one-shot" — or, with
    several influence rows (``influence``, ``influence-kfac``, ``influence-ekfac``), one bar per row, named by
    its curvature, so the rows do not overwrite each other."""
    names = {"influence": "one-shot", "influence-gnb": "one-shot GNB", "influence-kfac": "one-shot K-FAC",
             "influence-ekfac": "one-shot EK-FAC"}
    picked = [r for r in rows if r.get("role", "unlearned") in ("unlearned", "influence")]
    several = sum(1 for r in picked if r.get("role") == "influence") > 1
    out = []
    for r in picked:
        if r.get("role") == "influence" and not r.get("optimizer"):
            name = str(r.get("name") or "influence")
            label = ("one-shot GNB" if name == "influence" else names.get(name, name)) if several else "one-shot"
            r = {**r, "objective": r.get("objective") or "influence", "optimizer": label}
        out.append(r)
    return out


def attack_columns(bits: Sequence[int] = (4,)) -> tuple[Column, ...]:
    """The robustness columns for quantization at `bits` (see the module doc), in table order."""
    cols = [
        Column("relearn_recovery_prob", "Relearn recovery (prob.)", (), False, False, GROUP),
        Column("relearn_recovery_rouge", "Relearn recovery (ROUGE-L)", (), False, False, GROUP),
        Column("relearn_excess_prob", "Relearn recovery over retain (prob.)", (), False, False, GROUP),
    ]
    for b in bits:
        cols += [Column(f"quant{b}_recovery_prob", f"{b}-bit recovery (prob.)", (), False, False, GROUP),
                 Column(f"quant{b}_recovery_rouge", f"{b}-bit recovery (ROUGE-L)", (), False, False, GROUP)]
    cols += [Column("paraphrase_recovery_prob", "Paraphrase recovery (prob.)", (), False, False, GROUP),
             Column("paraphrase_recovery_rouge", "Paraphrase recovery (ROUGE-L)", (), False, False, GROUP)]
    return tuple(cols)


def result_bits(result: dict[str, Any]) -> list[int]:
    """The bit widths a `run_attacks` result holds."""
    return [int(b) for b in (result.get("quantize") or {}).get("by_bits", {})]


def row_values(result: dict[str, Any], role: str = "unlearned") -> dict[str, float | None]:
    """The robustness column values of one table row from a `run_attacks` result.

    `role` "unlearned" reads the attacked model's figures (use it for every unlearned model, one-shot
    influence included); "retain" and "target" read the references' (the same in every result of a grid,
    so any one result will do).
    """
    if role not in ("unlearned", "target", "retain"):
        raise ValueError(f"role must be 'unlearned', 'target' or 'retain', got {role!r}")
    out: dict[str, float | None] = {}
    relearn = result.get("relearn")
    if relearn:
        source = {"unlearned": relearn["recovery"], "retain": relearn["baseline_recovery"]}.get(role, {})
        out["relearn_recovery_prob"] = source.get("prob")
        out["relearn_recovery_rouge"] = source.get("rouge")
        out["relearn_excess_prob"] = relearn["excess_recovery"].get("prob") if role == "unlearned" else None
    for bits, run in ((result.get("quantize") or {}).get("by_bits") or {}).items():
        source = {"unlearned": run["recovery"], "target": run["target_shift"]}.get(role, {})
        out[f"quant{bits}_recovery_prob"] = source.get("prob")
        out[f"quant{bits}_recovery_rouge"] = source.get("rouge")
    para = result.get("paraphrase")
    if para:
        source = para["recovery"] if role == "unlearned" else {}
        out["paraphrase_recovery_prob"] = source.get("prob")
        out["paraphrase_recovery_rouge"] = source.get("rouge")
    return out


def _panel_title(attack: str) -> str:
    if attack.startswith("quant"):
        return f"{attack.removeprefix('quant')}-bit quantization"
    return {"relearn": "Relearning (held-out authors)", "paraphrase": "Paraphrased questions"}.get(attack, attack)


_PALETTE = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]  # green: the retain line


def recovery_plot(rows: Sequence[dict[str, Any]], metric: str = "prob", title: str | None = None) -> bytes:
    """`_recovery_plot` with matplotlib's mathtext off (`soul.report.plots.literal_text`): a ``$`` in a
    preset's optimizer or objective name is drawn as it is, not parsed as TeX."""
    from soul.literal_text import literal_text

    return literal_text(_recovery_plot)(rows, metric, title)


def _recovery_plot(rows: Sequence[dict[str, Any]], metric: str = "prob", title: str | None = None) -> bytes:
    """PNG bytes: one panel per attack in `rows`, bars of recovery per objective, one bar per optimizer.

    `rows` are table rows (``role``, ``objective``, ``optimizer`` and the `row_values` keys). Unlearned rows
    (and one-shot influence, as an objective of its own) give the bars; the retain row's relearning baseline is drawn as a dashed line in the relearn panel.
    Reference lines at 0 (the unlearned level) and 1 (the target's). Missing values leave a gap.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in ("prob", "rouge"):
        raise ValueError(f"metric must be 'prob' or 'rouge', got {metric!r}")
    suffix = f"_recovery_{metric}"
    keys = sorted({k for r in rows for k, v in r.items() if k.endswith(suffix) and v is not None},
                  key=lambda k: (0 if k.startswith("relearn") else 2 if k.startswith("paraphrase") else 1, k))
    unlearned = bar_rows(rows)
    if not keys or not unlearned:
        raise ValueError(f"no {metric} recovery figures in the rows: run attacks on the unlearned models first")
    objectives = list(dict.fromkeys(r.get("objective") for r in unlearned))
    optimizers = list(dict.fromkeys(r.get("optimizer") for r in unlearned))
    baseline = next((r.get(f"relearn{suffix}") for r in rows if r.get("role") == "retain"), None)

    fig = Figure(figsize=(max(5.0, 3.2 * len(keys)), 4.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    width = 0.8 / max(1, len(optimizers))
    for ax, key in zip(axes, keys):
        for j, opt in enumerate(optimizers):
            xs, ys = [], []
            for i, obj in enumerate(objectives):
                row = next((r for r in unlearned if r.get("objective") == obj and r.get("optimizer") == opt), None)
                value = None if row is None else row.get(key)
                if value is not None and math.isfinite(value):
                    xs.append(i + (j - (len(optimizers) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width=width, color=_PALETTE[j % len(_PALETTE)],
                   label=OPTIMIZER_NAMES.get(str(opt), str(opt)))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axhline(1.0, color="tab:red", linewidth=0.8, linestyle=":", label="target level")
        if key.startswith("relearn") and baseline is not None and math.isfinite(baseline):
            ax.axhline(baseline, color="tab:green", linestyle="--", linewidth=1.2, label="retain model (from scratch)")
        ax.set_xticks(range(len(objectives)))
        ax.set_xticklabels([OBJECTIVE_NAMES.get(str(o), "Influence" if o == "influence" else str(o))
                            for o in objectives], rotation=20)
        ax.set_title(_panel_title(key.removesuffix(suffix)))
        ax.set_ylabel(f"recovery ({'prob.' if metric == 'prob' else 'ROUGE-L'})")
    handles: dict[str, Any] = {}
    for ax in axes:  # one legend for the figure, below the panels, so it hides no bar
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(title or "Recovery of the forget set under attack (0 = unlearned, 1 = target)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               frameon=False)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
