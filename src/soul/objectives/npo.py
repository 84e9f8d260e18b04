"""`npo` — negative preference optimisation (Zhang et al., 2024, "Negative Preference Optimization").

    L = γ · mean_i [ −(2/β)·log σ(−β·(log p_θ(y_i|x_i) − log p_ref(y_i|x_i))) ]

with log p(y|x) the *summed* log-probability of the answer tokens of sequence i (not logits, not a
per-token mean, not a batch-mean NLL), the loss averaged over sequences. The reference log-probabilities
are computed under ``torch.no_grad``. At θ = ref the loss is γ·(2/β)·log 2; as p_θ(y|x) → 0 it tends to 0,
which bounds the ascent that makes plain GA collapse. Defaults β = 0.1, γ = 1 (NPO paper;
open-unlearning ``configs/trainer/NPO.yaml``). `npo_rt` adds a retain term.
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


class NPO(Objective):
    name = "npo"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "beta": 0.1}
    needs_reference = True

    def compute(self, model, forget_batch, retain_batch, ref_model) -> ObjectiveOutput:
        labels = forget_batch["labels"]
        logp, count = answer_logprob(logits_of(model, forget_batch), labels, "forget batch")
        ref_logp, _ = answer_logprob(reference_logits(ref_model, forget_batch), labels, "forget batch (reference)")
        log_ratio = logp - ref_logp.to(logp.device)
        npo = (-(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio)).mean()
        loss = self.gamma * npo
        parts = {"npo": npo.item(), "forget_nll": (-logp / count).mean().item(),
                 "forget_logratio": log_ratio.mean().item()}
        if self.needs_retain:
            loss = loss + self.alpha * retain_nll_term(model, retain_batch, parts)
        return ObjectiveOutput(loss, parts)
