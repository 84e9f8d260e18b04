"""Unlearning objectives, registered by name.

Usage::

    obj = build_objective("npo_rt", beta=0.1, alpha=1.0)
    out = obj(model, forget_batch, retain_batch=retain_batch, ref_model=ref_model)
    out.loss.backward()            # out.parts: {"npo": …, "forget_nll": …, "retain_nll": …}

Batches follow docs/ARCHITECTURE.md: ``input_ids``, ``attention_mask``, ``labels`` [B, T] with labels
= -100 on prompt and padding; objectives that need refusals read ``forget_batch["refusal"]``. The flags
``needs_retain``, ``needs_reference``, ``needs_refusal`` say what the caller must provide.

Notation. For a batch of question/answer pairs (x_i, y_i):

* log p(y|x) = Σ_{t ∈ answer} log p(y_t | x, y_<t) — summed over answer tokens only (prompt and padding
  never count); |y| = number of answer tokens (including the closing EOS).
* NLL(batch) = mean_i [ −log p(y_i|x_i) / |y_i| ] — per-sequence token mean, then mean over sequences.
* KL_retain = mean_i (1/|y_i|) Σ_{t ∈ answer} KL(p_ref(·|x_i, y_<t) ‖ p_θ(·|x_i, y_<t)) — a true KL over
  the vocabulary at every answer position of the retain batch.
* σ is the logistic function; reference-model quantities are computed under ``torch.no_grad``.

Objectives (weights use open-unlearning's names: γ = ``gamma`` weights the forget term, α = ``alpha`` the
retain term; the SOUL code calls its retain weight γ, so translate when reading its configs):

=========  ================================================================================  ======================
name       loss                                                                              defaults
=========  ================================================================================  ======================
ga         −NLL(forget)                                                                      —
graddiff   −γ·NLL(forget) + α·NLL(retain)                                                    γ=1, α=1
ga_kl      −γ·NLL(forget) + α·KL_retain(p_ref ‖ p_θ)                                         γ=1, α=1
po         γ·NLL(forget question → refusal) + α·NLL(retain)                                  γ=1, α=1
npo        γ·mean_i −(2/β)·log σ(−β·(log p_θ(y_i|x_i) − log p_ref(y_i|x_i)))                 γ=1, β=0.1
npo_rt     npo + α·NLL(retain)                                                               γ=1, α=1, β=0.1
simnpo     γ·mean_i −(2/β)·log σ(−β·log p_θ(y_i|x_i)/|y_i| − δ) + α·NLL(retain)               γ=0.125, α=1, β=4.5, δ=0
dpo        γ·mean_i −log σ(β·([log p_θ − log p_ref](r_i) − [log p_θ − log p_ref](y_i))) + α·NLL(retain)   γ=1, α=1, β=0.1
=========  ================================================================================  ======================

(r_i: the refusal answer to x_i.) Defaults follow open-unlearning's ``configs/trainer/*.yaml`` and the
papers: NPO (Zhang et al., 2024), SimNPO (Fan et al., 2024, eq. 4 — δ is the paper's margin γ), DPO
(Rafailov et al., 2023; open-unlearning additionally scales it by 2/β — set γ = 2/β to match). With α = 0
an objective's retain term is dropped (``needs_retain`` becomes False and no retain forward runs).

Adding an objective: one file defining an `Objective` subclass (``name``, ``defaults``, ``needs_*``,
``compute``) and one line in `OBJECTIVES` below.
"""

from __future__ import annotations

from typing import Any

from soul.objectives.base import Objective, ObjectiveOutput
from soul.objectives.dpo import DPO
from soul.objectives.ga import GradientAscent
from soul.objectives.ga_kl import GradAscentKL
from soul.objectives.graddiff import GradDiff
from soul.objectives.npo import NPO
from soul.objectives.npo_rt import NPORetain
from soul.objectives.po import RefusalPO
from soul.objectives.simnpo import SimNPO

OBJECTIVES: dict[str, type[Objective]] = {
    "ga": GradientAscent,
    "graddiff": GradDiff,
    "ga_kl": GradAscentKL,
    "po": RefusalPO,
    "npo": NPO,
    "npo_rt": NPORetain,
    "simnpo": SimNPO,
    "dpo": DPO,
}


def build_objective(name: str, **coeffs: Any) -> Objective:
    """The objective registered as `name`, with coefficients overriding its defaults.

    A coefficient given as ``None`` counts as not given (so unset command-line options pass through).
    Unknown names, unknown coefficients and invalid values (non-numeric, non-finite, negative weights,
    β ≤ 0) raise ``ValueError`` naming the objective and what was expected.
    """
    try:
        cls = OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}") from None
    return cls(**{k: v for k, v in coeffs.items() if v is not None})


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objective"]
