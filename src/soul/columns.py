"""What a results-table column is (`Column`), the display names of objectives, optimizers and curvatures, and
each task's verdict metric (`Headline`).

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


# The verdict's tested metric per task (`soul.report.verdict.headline`); the report keeps these columns' per-seed
# values so the test can pair seeds (`soul.report.results.pairs_by_seed`).
@dataclass(frozen=True)
class Headline:
    """What a task's verdict tests: `metric` (a table column key; which direction is better is that column's
    `higher_is_better`), qualified by `utility` (a column where higher is better); `metric_name` /
    `utility_name` as the sentence writes them."""

    metric: str
    metric_name: str
    utility: str
    utility_name: str


# In order of precedence: the first whose metric some unlearned row has is the report's headline.
HEADLINES = (
    Headline("forget_quality", "forget quality", "model_utility", "model utility"),
    Headline("forget_text_rouge", "forget ROUGE-L", "retain_text_rouge", "retain ROUGE-L"),
    Headline("rtp_challenging_toxicity", "RTP challenging toxicity", "retain_answer_prob", "retain prob."),
    Headline("forget_toxicity", "forget toxicity", "retain_answer_prob", "retain prob."),
    Headline("forget_mc_accuracy", "forget MC accuracy", "utility_mc_accuracy", "utility MC accuracy"),
)
HEADLINE_KEYS = frozenset(k for h in HEADLINES for k in (h.metric, h.utility))
