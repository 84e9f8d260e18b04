r"""Signum: sign-momentum descent, i.e. :class:`SophiaG` with the curvature switched off.

.. math::

    \theta &\leftarrow \theta - \eta\,\lambda\,\theta \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\,g \\
    \theta &\leftarrow \theta - \eta\,\operatorname{sign}(m)

This is Sophia's update in the limit :math:`h \to 0`: the clipped ratio
:math:`\min(|\tilde m| / \max(\gamma\tilde h, \epsilon), 1)` is 1 for every coordinate whose momentum exceeds
:math:`\epsilon`, so each moving coordinate takes a step of exactly :math:`\eta`. It runs through Sophia's own
code (the same kernels, momentum, bias correction and weight decay) with :math:`h \equiv 0` and no Hessian
estimate ever due, so "Sophia minus the curvature" is one row of an ablation table: whatever Sophia gains over
Signum comes from :math:`h`. ``clip_fraction`` is therefore 1 (every coordinate with a nonzero momentum is
"clipped"). Default :math:`\beta_1 = 0.965`, Sophia's, so the two differ in the curvature only (Bernstein et
al.'s Signum uses 0.9); ``betas[1]`` is accepted and unused, so a configuration written for Sophia runs
unchanged. (The zero ``hessian`` state tensor is the price of sharing Sophia's code path.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from soul.optim.sophia import SophiaG


class Signum(SophiaG):
    """Sign of the (bias-corrected) momentum; :class:`SophiaG` with :math:`h \\equiv 0` (module docstring).

    Args:
        params: parameters or param-group dicts.
        lr: :math:`\\eta`, the step of every moving coordinate.
        betas: :math:`(\\beta_1, \\beta_2)`; only :math:`\\beta_1` (momentum) is used.
        weight_decay: decoupled weight decay :math:`\\lambda`.
        bias_correction, foreach: as for :class:`SophiaG` (bias correction does not change a sign; it is
            kept so the arithmetic matches Sophia's).
    """

    uses_curvature = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        weight_decay: float = 0.1,
        bias_correction: bool = True,
        foreach: bool | None = None,
    ) -> None:
        # rho = 1 and eps: with h = 0 the denominator is max(|m~|, eps), so the ratio is 1 wherever |m~| > eps.
        super().__init__(params, lr=lr, betas=betas, rho=1.0, weight_decay=weight_decay, eps=1e-12,
                         hessian_interval=1, estimator="gnb", bias_correction=bias_correction, foreach=foreach)

    @property
    def last_stats(self) -> dict[str, float]:
        """Sophia's diagnostics less the curvature ones: ``rho`` is not applicable (NaN), ``h_*`` absent."""
        stats = super().last_stats
        stats["rho"] = math.nan
        for key in ("h_mean", "h_max", "hessian_updates"):
            stats.pop(key, None)
        return stats

    def update_hessian(self, scale: float = 1.0,
                       estimates: Mapping[torch.Tensor, torch.Tensor] | None = None) -> int:
        raise TypeError("Signum has no curvature (h = 0 by definition); use SophiaG for a Hessian estimate")
