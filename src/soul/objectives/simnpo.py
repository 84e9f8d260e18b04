"""`simnpo` — SimNPO, reference-free NPO with length normalisation (Fan et al., 2024, "Simplicity
Prevails: Rethinking Negative Preference Optimization for LLM Unlearning", eq. 4):

    ℓ_SimNPO = mean_i [ −(2/β)·log σ(−(β/|y_i|)·log p_θ(y_i|x_i) − δ) ]
    L        = γ·ℓ_SimNPO + α·NLL(retain)

with log p_θ(y|x) the summed answer log-probability and |y| the number of answer tokens. δ ≥ 0 is the
paper's reward margin (called γ there). open-unlearning's ``delta`` enters as β·(NLL/|y| − delta), i.e.
its delta equals ours divided by β; both default to 0, where the two agree. Defaults β = 4.5, γ = 0.125,
α = 1, δ = 0 (open-unlearning ``configs/trainer/SimNPO.yaml``, which, like the paper, includes the retain
NLL term; set α = 0 for the forget term alone).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import answer_logprob, logits_of, retain_nll_term


class SimNPO(Objective):
    name = "simnpo"
    defaults: ClassVar[dict[str, float]] = {"gamma": 0.125, "alpha": 1.0, "beta": 4.5, "delta": 0.0}
    needs_retain = True

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        logp, count = answer_logprob(logits_of(model, forget_batch), forget_batch["labels"], "forget batch")
        mean_logp = logp / count
        simnpo = (-(2.0 / self.beta) * F.logsigmoid(-self.beta * mean_logp - self.delta)).mean()
        loss = self.gamma * simnpo
        parts = {"simnpo": simnpo.item(), "forget_nll": (-mean_logp).mean().item()}
        if self.needs_retain:
            loss = loss + self.alpha * retain_nll_term(model, retain_batch, parts)
        return ObjectiveOutput(loss, parts)
