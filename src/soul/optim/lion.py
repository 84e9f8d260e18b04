r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

For a parameter :math:`\theta` with gradient :math:`g`:

.. math::

    u &= \operatorname{sign}\big(\beta_1 m + (1-\beta_1)\,g\big) \\
    \theta &\leftarrow \theta - \eta\,(u + \lambda\,\theta) \\
    m &\leftarrow \beta_2 m + (1-\beta_2)\,g

The step interpolates the momentum and the gradient with :math:`\beta_1` but tracks the momentum with the
slower :math:`\beta_2`; every coordinate moves by exactly :math:`\eta` (plus the decay). Defaults
``lr=1e-4``, ``betas=(0.9, 0.99)`` (the paper's), ``weight_decay=0``. With Signum and Sophia it makes the
sign-descent ablation of a table: a sign optimizer with no curvature. State: ``exp_avg`` (:math:`m`), fp32 for
low-precision parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class Lion(Optimizer):
    """Lion; see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: :math:`\\eta`. betas: :math:`(\\beta_1, \\beta_2)`. weight_decay: decoupled :math:`\\lambda`.
        foreach: multi-tensor path (True / None) or the per-tensor reference path (False).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 foreach: bool | None = None) -> None:
        betas = tuple(betas)
        if not lr >= 0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Lion: betas[{i}] must be in [0, 1), got {beta!r}")
        if len(betas) != 2:
            raise ValueError(f"Lion: betas must be two numbers, got {betas!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                params.append(p)
                grads.append(p.grad.to(state["exp_avg"].dtype))
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            foreach = group["foreach"] if group["foreach"] is not None else True
            fn = _multi_tensor_lion if foreach else _single_tensor_lion
            fn(params, grads, exp_avgs, lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1,
               beta2=beta2)
        return loss


def _single_tensor_lion(params, grads, exp_avgs, *, lr, weight_decay, beta1, beta2) -> None:
    """Reference path: the rule written literally."""
    for p, g, m in zip(params, grads, exp_avgs):
        update = m.lerp(g, 1 - beta1).sign_()  # sign(b1 m + (1-b1) g)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)  # theta - lr * lambda * theta
        p.add_(update.to(p.dtype), alpha=-lr)
        m.lerp_(g, 1 - beta2)


def _multi_tensor_lion(params, grads, exp_avgs, *, lr, weight_decay, beta1, beta2) -> None:
    """foreach path: one scratch tensor per parameter (the interpolation, signed in place)."""
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(updates)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if all(p.dtype == u.dtype for p, u in zip(params, updates)):
        torch._foreach_add_(params, updates, alpha=-lr)
    else:
        for p, u in zip(params, updates):
            p.add_(u.to(p.dtype), alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
