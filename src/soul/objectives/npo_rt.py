"""`npo_rt` — NPO with a retain term (NPO paper's "NPO-RT"; open-unlearning's NPO).

    L = γ·NPO(forget) + α·NLL(retain)

NPO(forget) as in `soul.objectives.npo`. Defaults γ = 1, α = 1, β = 0.1 (open-unlearning
``configs/trainer/NPO.yaml``).
"""

from __future__ import annotations

from typing import ClassVar

from soul.objectives.npo import NPO


class NPORetain(NPO):
    name = "npo_rt"
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 1.0, "beta": 0.1}
    needs_retain = True
