"""Second-order optimizers for unlearning: Sophia (GNB / Hutchinson / squared-gradient, fixed or
calibrated rho; or a K-FAC / EK-FAC preconditioner), its curvature-free ablations (Signum, Lion), first-order baselines and any library optimizer
through one factory, one-shot influence unlearning, and K-FAC / EK-FAC Kronecker-factored curvature."""

from __future__ import annotations

from soul.optim.factory import (
    OPTIMIZERS,
    build_optimizer,
    needs_create_graph,
    optimizer_options,
    resolve_optimizer_class,
)
from soul.optim.hessian import (
    HESSIAN_ESTIMATORS,
    estimate_hessian,
    gnb_backward,
    hutchinson_diagonal,
    loss_bearing_tokens,
    rademacher_like,
)
from soul.optim.influence import influence_unlearn
from soul.optim.kfac import KroneckerCurvature, covered_modules, fit_kfac
from soul.optim.ksophia import KRONECKER_ESTIMATORS, KroneckerSophia
from soul.optim.lion import Lion
from soul.optim.signum import Signum
from soul.optim.sophia import ESTIMATORS, SophiaG

__all__ = [
    "ESTIMATORS",
    "HESSIAN_ESTIMATORS",
    "KRONECKER_ESTIMATORS",
    "OPTIMIZERS",
    "KroneckerCurvature",
    "KroneckerSophia",
    "Lion",
    "Signum",
    "SophiaG",
    "build_optimizer",
    "covered_modules",
    "estimate_hessian",
    "fit_kfac",
    "gnb_backward",
    "hutchinson_diagonal",
    "influence_unlearn",
    "loss_bearing_tokens",
    "needs_create_graph",
    "optimizer_options",
    "rademacher_like",
    "resolve_optimizer_class",
]
