r"""Per-step update diagnostics of a training run: how far each optimizer step moved the weights.

For step :math:`t` with learning rate :math:`\eta_t` over the :math:`n` trainable coordinates:

.. math::

    \texttt{update\_norm}_t = \lVert\theta_t - \theta_{t-1}\rVert_2, \qquad
    \texttt{update\_rms\_over\_lr}_t = \frac{\texttt{update\_norm}_t}{\eta_t\sqrt n}

``update_rms_over_lr`` is 1 when every coordinate moved by exactly :math:`\eta_t` (a sign-sized step:
Signum, Lion, a fully clipped Sophia), below 1 when Sophia's Newton steps or Adam's ratios are smaller, and
it shows at a glance whether the clip is saturated. At the end of a run, :meth:`UpdateTracker.summary`
gives ``update_norm_mean``, ``update_norm_total`` (:math:`\sum_t` update_norm, the path length),
``displacement`` (:math:`\lVert\theta_T-\theta_0\rVert_2`, the net move; displacement :math:`\le` total by the
triangle inequality, and their ratio says how straight the path was) and ``update_rms_over_lr_mean``.

Cost: two copies of the trainable parameters in their own dtype and on their own device (the previous step's
weights and :math:`\theta_0`), and per step one pass that takes the difference in buckets of
``BUCKET_NUMEL`` elements (the scratch stays in cache) and refreshes the copy. Sharded parameters (FSDP)
contribute their local shard and the squares are summed over processes; DDP replicas are identical, so
nothing is reduced. On a resumed run the numbers cover the steps this process took (``from_step`` says
from where).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from soul.optim._dist import all_reduce_sum

BUCKET_NUMEL = 1 << 20


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded(params: Sequence[torch.Tensor]) -> bool:
    return any(type(p).__name__ in ("DTensor", "FlatParameter") or getattr(p, "_is_flat_param", False)
               for p in params)


class UpdateTracker:
    """Measures ``‖θ_t − θ_{t−1}‖`` after each step and ``‖θ_T − θ_0‖`` at the end (module docstring)."""

    def __init__(self, params: Sequence[torch.Tensor], *, from_step: int = 0) -> None:
        self.params = [_local(p.detach()) for p in params]
        self.reduce = _sharded(params)
        self.from_step = from_step
        with torch.no_grad():
            self.previous = [p.clone(memory_format=torch.contiguous_format) for p in self.params]
            self.initial = [p.clone(memory_format=torch.contiguous_format) for p in self.params]
        count = torch.tensor([float(sum(p.numel() for p in self.params))], dtype=torch.float64)
        self.numel = float(all_reduce_sum(count.to(self.params[0].device)).item()) if self.reduce else count.item()
        self.norms: list[float] = []
        self.rms_over_lr: list[float] = []
        self.clip_fractions: list[float] = []
        self.rho: float | None = None

    @torch.no_grad()
    def _distance(self, reference: list[torch.Tensor], refresh: bool) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for p, ref in zip(self.params, reference):
            pieces = zip(p.reshape(-1).split(BUCKET_NUMEL), ref.view(-1).split(BUCKET_NUMEL))
            for p_piece, ref_piece in pieces:
                # a bucket-sized scratch that stays in cache; low-precision weights are subtracted in fp32
                diff = (torch.sub(p_piece, ref_piece) if p_piece.dtype == torch.float32
                        else p_piece.float() - ref_piece.float())
                total += torch.dot(diff, diff).double()  # one pass, no second scratch (cf. square().sum())
                if refresh:
                    ref_piece.copy_(p_piece)
        if self.reduce:
            total = all_reduce_sum(total.reshape(1)).squeeze(0)
        return math.sqrt(float(total))

    def step(self, lr: float, optimizer_stats: dict[str, Any] | None = None) -> dict[str, float | None]:
        """Call right after ``optimizer.step()``: this step's ``update_norm``, ``update_rms_over_lr``, ``rho``.

        ``optimizer_stats`` is the optimizer's ``last_stats`` (Sophia's ``clip_fraction`` and ``rho``), if any.
        """
        stats = optimizer_stats or {}
        clip, rho = stats.get("clip_fraction"), stats.get("rho")
        if clip is not None and math.isfinite(clip):
            self.clip_fractions.append(float(clip))
        rho = float(rho) if rho is not None and math.isfinite(rho) else None
        if rho is not None:
            self.rho = rho
        norm = self._distance(self.previous, refresh=True)
        rms = norm / (lr * math.sqrt(self.numel)) if lr > 0 and self.numel else math.nan
        self.norms.append(norm)
        self.rms_over_lr.append(rms)
        return {"update_norm": norm, "update_rms_over_lr": rms if math.isfinite(rms) else None, "rho": rho}

    def summary(self) -> dict[str, Any]:
        """The run's diagnostics (None where not applicable, e.g. clip fraction and rho for AdamW)."""
        clips = self.clip_fractions
        rms = [v for v in self.rms_over_lr if math.isfinite(v)]
        return {
            "mean_clip_fraction": sum(clips) / len(clips) if clips else None,
            "rho": self.rho,
            "update_norm_mean": sum(self.norms) / len(self.norms) if self.norms else None,
            "update_norm_total": sum(self.norms) if self.norms else None,
            "displacement": self._distance(self.initial, refresh=False),
            "update_rms_over_lr_mean": sum(rms) / len(rms) if rms else None,
            "steps_measured": len(self.norms),
            "from_step": self.from_step,
            "trainable_numel": int(self.numel),
        }
