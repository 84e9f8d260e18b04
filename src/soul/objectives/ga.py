"""`ga` — gradient ascent on the forget set (Jang et al., 2023; TOFU's GA baseline).

    L = −NLL(forget)

where NLL(batch) is the mean over sequences of the mean answer-token negative log-likelihood. Minimising L
raises the NLL of the forget answers, i.e. lowers their likelihood. No coefficients.
"""

from __future__ import annotations

from typing import ClassVar

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import logits_of, mean_answer_nll


class GradientAscent(Objective):
    name = "ga"
    defaults: ClassVar[dict[str, float]] = {}

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        forget_nll = mean_answer_nll(logits_of(model, forget_batch), forget_batch["labels"], "forget batch")
        return ObjectiveOutput(-forget_nll, {"forget_nll": forget_nll.item()})
