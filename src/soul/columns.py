"""What a results-table column is (`Column`) and the display names of objectives and optimizers.

Shared by `soul.report` (the table, figures and verdicts) and `soul.attack.report` (the robustness columns
and the recovery figure). It imports nothing from soul, so both import it and neither imports the other
back: `soul.report.results` imports the attack columns from `soul.attack.report`, never the reverse. (It
is not inside `soul.report`: importing a module there runs `soul.report`'s ``__init__``, which imports the
results module, which imports the attack columns.)
"""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVE_NAMES = {
    "ga": "GA", "graddiff": "GradDiff", "ga_kl": "GA+KL", "po": "PO", "npo": "NPO", "npo_rt": "NPO+RT",
    "simnpo": "SimNPO", "dpo": "DPO",
}
OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD", "sophia": "Sophia", "signum": "Signum", "lion": "Lion"}
# Curvature estimators as tables name them (Sophia's `estimator`, one-shot influence's `hessian`).
CURVATURE_NAMES = {"gnb": "GNB", "hutchinson": "Hutchinson", "gradsq": "gradsq", "fisher": "Fisher",
                   "kfac": "K-FAC", "ekfac": "EK-FAC"}


@dataclass(frozen=True)
class Column:
    key: str                 # key in a table row
    title: str               # column header
    metrics: tuple[str, ...]  # eval-result keys, first present wins (() = not an eval metric)
    bounded: bool = True     # a value in [0, 1]
    higher_is_better: bool | None = None  # None: neither (closeness to the retain model matters)
    group: str = "tofu"      # the task whose table shows it ("all": every table), see `visible_columns`
    field: str = "agg_value"  # the entry's field holding the value
    diagnostic: str | None = None  # a key of the run's ``diagnostics`` (soul.report.diagnostics) instead
