"""A self-contained ``report.html``: the table, the figures embedded as base64 PNG data URIs, the sweep's
best settings, and a few example generations per model. No external files, scripts or fonts."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from soul.report.results import visible_columns
from soul.report.table import format_value
from soul.report.verdict import RULE

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:0.9em;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.ref td{background:#f4f4f4}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
.ex{font-size:0.85em;margin:0.3em 0 0.8em 1em}
.ex b{display:inline-block;min-width:6em}
details{margin:0.4em 0}
code{background:#f4f4f4;padding:1px 4px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table_html(rows: list[dict[str, Any]], marks: dict[str, str]) -> str:
    columns = visible_columns(rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in ["Method"] + [c.title for c in columns])
    body = []
    for row in rows:
        label = escape(row["label"]) + (f" {escape(marks[row['name']])}" if row["name"] in marks else "")
        cls = ' class="ref"' if row["role"] in ("target", "retain") else ""
        cells = "".join("<td>" + escape(format_value(c, row.get(c.key), row.get(c.key + "_std"))) + "</td>"
                        for c in columns)
        body.append(f"<tr{cls}><td>{label}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _examples_html(runs: list[dict[str, Any]]) -> str:
    parts = []
    for run in runs:
        examples = run.get("examples") or {}
        if not any(examples.get(s) for s in ("forget", "retain")):
            continue
        inner = []
        for split in ("forget", "retain"):
            for ex in examples.get(split) or []:
                inner.append(
                    f'<div class="ex"><div><b>{split} Q{escape(str(ex.get("index", "")))}</b> '
                    f'{escape(ex.get("question", ""))}</div>'
                    f'<div><b>truth</b> {escape(ex.get("answer", ""))}</div>'
                    f'<div><b>model</b> {escape(ex.get("generation", ""))}</div></div>')
        parts.append(f"<details><summary>{escape(run['label'])}</summary>{''.join(inner)}</details>")
    return "".join(parts) or "<p>No generations were recorded.</p>"


def render_html(*, title: str, rows: list[dict[str, Any]], runs: list[dict[str, Any]],
                images: dict[str, bytes], marks: dict[str, str], notes: list[str],
                sweep_html: str = "", verdicts: list[str] | None = None, robustness_html: str = "",
                tuning_html: str = "") -> str:
    """The whole page as a string. `images` maps a caption to PNG bytes (embedded in order)."""
    figs = "".join(f"<h3>{escape(cap)}</h3><img alt=\"{escape(cap)}\" src=\"{data_uri(png)}\">"
                   for cap, png in images.items())
    note_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    verdict_html = (f"<h2>Verdict</h2><p>{escape(RULE)}</p><ul>"
                    + "".join(f"<li>{escape(v)}</li>" for v in verdicts) + "</ul>") if verdicts else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<ul>{note_html}</ul>
<h2>Results</h2>
{_table_html(rows, marks)}
{verdict_html}
<p>Forget quality: KS-test p-value of the forget-set truth ratios against the retain model's (higher = closer
to never having seen the forget set). Model utility: harmonic mean of probability, ROUGE-L and truth ratio
on the retain and utility sets (higher is better). MIA AUC: 0.5 = forget set indistinguishable from unseen
data, 1.0 = recognised as training data. KS stat.: the KS distance behind forget quality (lower is closer to
the retain model; it moves when the p-value, with few forget questions, cannot). Diagnostics: clip frac. =
mean fraction of Sophia's clipped (sign-step) coordinates, ρ = the ρ used, mean / total ‖Δθ‖ = per-step
update norm (mean, sum over steps), ‖θ_T−θ_0‖ = final displacement: an optimizer that simply moved further
shows here. With several seeds each cell is mean ± std. ★ marks, per optimizer, the best forget quality among runs keeping
model utility at or above the stated fraction of the target model's.</p>
{robustness_html}
{tuning_html}
{sweep_html}
<h2>Figures</h2>
{figs}
<h2>Example generations</h2>
{_examples_html(runs)}
</body></html>
"""
