"""`dpo` — direct preference optimisation (Rafailov et al., 2023) with the refusal preferred and the
forget answer dispreferred (TOFU/open-unlearning's "IdkDPO"):

    m_i = [log p_θ(r_i|x_i) − log p_ref(r_i|x_i)] − [log p_θ(y_i|x_i) − log p_ref(y_i|x_i)]
    L   = γ · mean_i [ −log σ(β·m_i) ] + α·NLL(retain)

r_i is the refusal answer (``forget_batch["refusal"]``), y_i the forget answer; log-probabilities are
summed over answer tokens, the reference's under ``torch.no_grad``. At θ = ref the DPO term is log 2.
Defaults β = 0.1, γ = 1, α = 1 (open-unlearning ``configs/trainer/DPO.yaml``). open-unlearning scales the
DPO term by 2/β (its value at θ = ref is (2/β)·log 2); to match it, set γ = 2/β.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.terms import (
    answer_logprob,
    logits_of,
    reference_logits,
    retain_nll_term,
)


class DPO(Objective):
    name = "dpo"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 1.0, "beta": 0.1}
    needs_retain = True
    needs_reference = True
    needs_refusal = True

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        refusal = forget_batch["refusal"]
        win, _ = answer_logprob(logits_of(model, refusal), refusal["labels"], "refusal batch")
        win_ref, _ = answer_logprob(reference_logits(ref_model, refusal), refusal["labels"], "refusal batch")
        lose, _ = answer_logprob(logits_of(model, forget_batch), forget_batch["labels"], "forget batch")
        lose_ref, _ = answer_logprob(reference_logits(ref_model, forget_batch), forget_batch["labels"],
                                     "forget batch")
        win_ratio = win - win_ref.to(win.device)
        lose_ratio = lose - lose_ref.to(lose.device)
        dpo = -F.logsigmoid(self.beta * (win_ratio - lose_ratio.to(win.device))).mean()
        loss = self.gamma * dpo
        parts = {"dpo": dpo.item(), "refusal_logratio": win_ratio.mean().item(),
                 "forget_logratio": lose_ratio.mean().item()}
        if self.needs_retain:
            loss = loss + self.alpha * retain_nll_term(model, retain_batch, parts)
        return ObjectiveOutput(loss, parts)
