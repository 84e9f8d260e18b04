"""`po` — preference optimisation toward refusals (TOFU's "IDK" fine-tuning, SOUL's PO).

    L = γ·NLL(forget question → refusal answer) + α·NLL(retain)

The refusal answers come in ``forget_batch["refusal"]``: the same questions answered with an "I don't
know"-style sentence from ``soul/assets/refusals.txt``, with their own padding and attention mask.
Defaults γ = 1, α = 1 (the SOUL code's PO uses weight 1 on both terms; it calls the retain weight γ).
"""

from __future__ import annotations

from typing import ClassVar

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import logits_of, mean_answer_nll, retain_nll_term


class RefusalPO(Objective):
    name = "po"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 1.0}
    needs_retain = True
    needs_refusal = True

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        refusal = forget_batch["refusal"]
        refusal_nll = mean_answer_nll(logits_of(model, refusal), refusal["labels"], "refusal batch")
        loss = self.gamma * refusal_nll
        parts = {"refusal_nll": refusal_nll.item()}
        if self.needs_retain:
            loss = loss + self.alpha * retain_nll_term(model, retain_batch, parts)
        return ObjectiveOutput(loss, parts)
