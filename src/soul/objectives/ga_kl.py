"""`ga_kl` — gradient ascent on forget with a KL anchor to the reference model on retain (TOFU's "KL").

    L = −γ·NLL(forget) + α·KL_retain(p_ref ‖ p_θ)
    KL_retain = mean over retain sequences of (1/|y|)·Σ_{t ∈ answer} Σ_v p_ref(v | ·) (log p_ref(v | ·) − log p_θ(v | ·))

A true KL over the full vocabulary at each answer position (not a per-token log-ratio, and not over prompt
or padding positions); the reference logits are computed under ``torch.no_grad``. Defaults γ = 1, α = 1
(open-unlearning GradDiff with ``retain_loss_type: KL``).
"""

from __future__ import annotations

from typing import ClassVar

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import logits_of, mean_answer_kl, mean_answer_nll, reference_logits


class GradAscentKL(Objective):
    name = "ga_kl"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 1.0}
    needs_retain = True
    needs_reference = True

    def __init__(self, **coeffs) -> None:
        super().__init__(**coeffs)
        # The reference serves only the retain KL; without that term there is nothing to anchor.
        self.needs_reference = self.needs_retain

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        forget_nll = mean_answer_nll(logits_of(model, forget_batch), forget_batch["labels"], "forget batch")
        loss = -self.gamma * forget_nll
        parts = {"forget_nll": forget_nll.item()}
        if self.needs_retain:
            kl = mean_answer_kl(reference_logits(ref_model, retain_batch), logits_of(model, retain_batch),
                                retain_batch["labels"], "retain batch")
            loss = loss + self.alpha * kl
            parts["retain_kl"] = kl.item()
        return ObjectiveOutput(loss, parts)
