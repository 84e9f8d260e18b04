"""`graddiff` — gradient difference: ascent on forget, descent on retain (Liu et al., 2022; TOFU baseline).

    L = −γ·NLL(forget) + α·NLL(retain)

Defaults γ = 1, α = 1 (open-unlearning ``configs/trainer/GradDiff.yaml``). Note: the SOUL code names its
retain weight γ; here, as in open-unlearning, γ weights the forget term and α the retain term.
"""

from __future__ import annotations

from typing import ClassVar

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import logits_of, mean_answer_nll, retain_nll_term


class GradDiff(Objective):
    name = "graddiff"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 1.0}
    needs_retain = True

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        forget_nll = mean_answer_nll(logits_of(model, forget_batch), forget_batch["labels"], "forget batch")
        loss = -self.gamma * forget_nll
        parts = {"forget_nll": forget_nll.item()}
        if self.needs_retain:
            loss = loss + self.alpha * retain_nll_term(model, retain_batch, parts)
        return ObjectiveOutput(loss, parts)
