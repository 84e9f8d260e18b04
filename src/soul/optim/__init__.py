"""Second-order optimizers for unlearning: Sophia (GNB / Hutchinson / squared-gradient), the first-order
baselines through one factory, and one-shot influence unlearning."""

from __future__ import annotations

from soul.optim.factory import OPTIMIZERS, build_optimizer, optimizer_options
from soul.optim.hessian import (
    HESSIAN_ESTIMATORS,
    estimate_hessian,
    gnb_backward,
    hutchinson_diagonal,
    loss_bearing_tokens,
    rademacher_like,
)
from soul.optim.influence import influence_unlearn
from soul.optim.sophia import ESTIMATORS, SophiaG

__all__ = [
    "ESTIMATORS",
    "HESSIAN_ESTIMATORS",
    "OPTIMIZERS",
    "SophiaG",
    "build_optimizer",
    "estimate_hessian",
    "gnb_backward",
    "hutchinson_diagonal",
    "influence_unlearn",
    "loss_bearing_tokens",
    "optimizer_options",
    "rademacher_like",
]
