"""Reports of unlearning runs: the paper-style table, figures, a self-contained report.html, and the
`soul reproduce` / `soul sweep` / `soul report` commands (the orchestration lives in `soul.pipeline`)."""

from __future__ import annotations

from soul.report.pareto import best_at_utility, pareto_front
from soul.report.results import COLUMNS, run_label, table_rows
from soul.report.table import markdown_table, text_table
from soul.report.write import write_report

__all__ = ["COLUMNS", "best_at_utility", "markdown_table", "pareto_front", "run_label", "table_rows",
           "text_table", "write_report"]
