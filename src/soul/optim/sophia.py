r"""SophiaG: a clipped diagonal-Newton optimizer (Liu et al., 2023), the optimizer behind SOUL.

Update for a parameter :math:`\theta` with gradient :math:`g` at step :math:`t` (0-based, :math:`t+1` steps
taken after it), hyper-parameters of its param group:

.. math::

    \theta &\leftarrow \theta - \eta\,\lambda\,\theta                     && \text{(decoupled weight decay)}\\
    m &\leftarrow \beta_1 m + (1-\beta_1)\,g                               && \text{(once per step)}\\
    h &\leftarrow \beta_2 h + (1-\beta_2)\,\hat h                          && \text{(only when a fresh estimate }\hat h\text{ arrives)}\\
    \theta &\leftarrow \theta - \eta\,\operatorname{sign}(\tilde m)\,
        \min\!\left(\frac{|\tilde m|}{\max(\gamma\,\tilde h,\ \epsilon)},\ 1\right)

with bias-corrected :math:`\tilde m = m / (1-\beta_1^{t+1})` and :math:`\tilde h = h / (1-\beta_2^{n})`, where
:math:`n` is the number of estimates consumed so far. ``bias_correction=False`` gives :math:`\tilde m = m`,
:math:`\tilde h = h`, the official Sophia/SOUL code. Bias correction matters for unlearning runs of a few
hundred steps: without it, after one estimate :math:`h = (1-\beta_2)\hat h = 0.01\,\hat h` and almost every
coordinate is clipped to a sign step.

Defaults (Sophia paper / reference code, fine-tuning scale): ``lr=1e-4``, ``betas=(0.965, 0.99)``,
``rho`` (:math:`\gamma`, the paper also calls it :math:`\rho`) ``=0.04``, ``eps=1e-12``,
``weight_decay=0.1``, ``hessian_interval`` (:math:`k`) ``=10``. All of them may differ per param group.

Hessian schedule. The optimizer owns the *math*; the training loop owns the *schedule*. Before each step the
loop asks :meth:`SophiaG.hessian_due`; when it says yes, the loop calls
:func:`soul.optim.estimate_hessian` (which runs the estimator and calls :meth:`SophiaG.update_hessian`) and
then does its own forward/backward and ``step()``. A group is due when ``step % hessian_interval == 0`` and
it has not yet received an estimate on that step, so an estimate is always taken on step 0 (``step()``
refuses to run before the first estimate: an all-zero ``h`` would turn the first ``k`` steps into full-size
sign steps). The step counter and the estimate counter live in each param group, so they round-trip through
``state_dict`` and a resumed run refreshes on the same steps as an uninterrupted one.

Calibrated clipping scale (``rho="auto"``). A fixed :math:`\gamma` tuned for ~0.5 M-token pre-training
batches clips almost every coordinate on small unlearning batches (the noise in :math:`|\tilde m|` is then
large against :math:`\tilde h`), and Sophia degenerates to sign-momentum descent. With ``rho="auto"``,
the first ``step()`` picks

.. math::

    \gamma = \operatorname{quantile}_{q}\left(|\tilde m_1| \,/\, \tilde h\right)
    \qquad (q = \texttt{target\_unclipped})

over the coordinates with :math:`\tilde m_1 \ne 0` (coordinates without gradient neither move nor clip),
where :math:`\tilde m_1` is the bias-corrected momentum *after* the first momentum update (equal to the
first gradient :math:`g_1` with bias correction) and :math:`\tilde h` the Hessian after the first estimate.
So on step 1 a fraction :math:`q` of the moving coordinates takes a Newton step :math:`\tilde m/(\gamma\tilde h)`
and the rest a clipped :math:`\pm\eta` step. One :math:`\gamma` is chosen for all param groups that ask for
``"auto"`` (together): :math:`\gamma` is one hyper-parameter in the Sophia paper and in every published
configuration, and a separate quantile over a small group (norm gains, biases: a few thousand coordinates)
would be noise. Groups with an explicit float keep theirs. The ratio is evaluated on at most
``RHO_SAMPLE_SIZE`` (:math:`2^{20}`) coordinates drawn uniformly, in proportion to each tensor's size, from a
CPU generator seeded with ``RHO_SAMPLE_SEED`` (0), so equal runs pick equal :math:`\gamma`; under
data parallelism every process computes the same value (same gradients, same sample); under FSDP the
per-shard values are averaged. The chosen value replaces ``"auto"`` in the param group (``rho`` becomes a
float, ``rho_auto`` is True), so it is kept by ``state_dict`` and a resumed run uses it. The default
``target_unclipped = 0.5`` (half the moving coordinates unclipped on step 1) is provisional: it is the
midpoint between "all clipped" (sign descent, what the fixed 0.04 gives here) and "none clipped" (plain
diagonal Newton, unstable where :math:`\tilde h` is tiny), pending a measurement on a real model.

:class:`soul.optim.Signum` is this optimizer with the curvature switched off (:math:`h\equiv 0`, every
coordinate clipped): the "Sophia minus the curvature" ablation.

Estimators (``estimator=``): ``gnb`` (Gauss-Newton-Bartlett, default) and ``hutchinson`` are computed by
:func:`soul.optim.estimate_hessian`; ``gradsq`` uses :math:`\hat h = g\odot g` of the *training* gradients
on every step inside ``step()`` — the behaviour of the official SOUL code, offered for comparison only.

State: ``exp_avg`` (:math:`m`) and ``hessian`` (:math:`h`) per parameter, the same two tensors as AdamW's
``exp_avg``/``exp_avg_sq``. They are kept in fp32 for bf16/fp16 parameters, because low-precision EMAs
swallow increments of size :math:`(1-\beta)\,g`. (The parameters themselves stay in their dtype: a bf16
parameter still swallows updates of size ``lr ≈ 1e-5``; train in fp32 or with fp32 master weights then.)

Diagnostics: :attr:`SophiaG.last_stats` gives ``clip_fraction`` (the fraction of coordinates whose step was
clipped to :math:`\pm\eta`, counted as :math:`|\tilde m| > \gamma\tilde h`, which differs from "ratio
:math:`\ge 1`" only on exact ties and where :math:`|\tilde m| \le \epsilon`; summed over all processes when
torch.distributed is initialised), ``h_mean``
and ``h_max`` (of the current :math:`h`) and ``rho`` (the clipping scale of the first param group; NaN
while ``"auto"`` has not been calibrated yet). They are reduced lazily, so reading them is the only host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from soul.optim._dist import all_reduce_async, all_reduce_sum, is_distributed, world_size

ESTIMATORS = ("gnb", "hutchinson", "gradsq")
_COUNTERS = {"step": 0, "hessian_updates": 0, "hessian_step": -1}
AUTO = "auto"
# rho="auto": the ratio |m~|/h~ is evaluated on at most this many coordinates, drawn with this seed.
RHO_SAMPLE_SIZE = 1 << 20
RHO_SAMPLE_SEED = 0
DEFAULT_TARGET_UNCLIPPED = 0.5  # provisional (see the module docstring)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2 parameters, their grads and state), else `t` itself.

    Sophia's update is elementwise, so it runs on the local shards; counts and sums over the shards are then
    all-reduced like those of DDP replicas.
    """
    return t.to_local() if hasattr(t, "to_local") else t


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    # fp32 state for low-precision parameters; fp64 parameters keep fp64 state.
    return torch.promote_types(p.dtype, torch.float32)


class SophiaG(Optimizer):
    """Sophia with a pluggable diagonal-Hessian estimator; see the module docstring for the math.

    (:class:`soul.optim.ksophia.KroneckerSophia` is the same rule with a K-FAC / EK-FAC preconditioner.)

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lr: learning rate :math:`\\eta` (the largest per-coordinate step).
        betas: :math:`(\\beta_1, \\beta_2)` for the momentum and the Hessian EMA.
        rho: :math:`\\gamma`, scales the Hessian in the clipped ratio (larger = more conservative), or
            ``"auto"``: calibrated on the first step so that ``target_unclipped`` of the coordinates are
            not clipped (module docstring).
        target_unclipped: for ``rho="auto"``, the fraction :math:`q \\in (0, 1)` of moving coordinates left
            unclipped on the first step (default 0.5, provisional).
        weight_decay: decoupled weight decay :math:`\\lambda`.
        eps: floor :math:`\\epsilon` of the denominator; also the floor of Hutchinson estimates.
        hessian_interval: refresh the Hessian every ``k`` steps (from step 0).
        estimator: ``gnb`` | ``hutchinson`` | ``gradsq`` (see module docstring).
        bias_correction: bias-correct ``m`` and ``h`` (True) or follow the reference code (False).
        foreach: use the multi-tensor path (True, and the default None) or the per-tensor reference path
            (False). Unlike torch's optimizers the default is the multi-tensor path on CPU too: its CPU
            buckets make it ~6x faster than the reference path there (see ``CPU_BUCKET_NUMEL``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float | str = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        hessian_interval: int = 10,
        estimator: str = "gnb",
        bias_correction: bool = True,
        foreach: bool | None = None,
        target_unclipped: float = DEFAULT_TARGET_UNCLIPPED,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                        hessian_interval=hessian_interval, estimator=estimator,
                        bias_correction=bias_correction, foreach=foreach, target_unclipped=target_unclipped)
        _validate(defaults, where=type(self).__name__, estimators=self.estimators)
        super().__init__(params, defaults)
        self._pending_clip: tuple[torch.Tensor, Any] | None = None
        self._pending_h: tuple[torch.Tensor, torch.Tensor, Any, Any] | None = None

    # -- param groups and state ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        _validate(group, where=f"{type(self).__name__} param group {len(self.param_groups) - 1}",
                  estimators=self.estimators)
        for key, value in _COUNTERS.items():
            group.setdefault(key, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _COUNTERS.items():
                group.setdefault(key, value)
            group.setdefault("target_unclipped", DEFAULT_TARGET_UNCLIPPED)
        self.__dict__.setdefault("_pending_clip", None)
        self.__dict__.setdefault("_pending_h", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then put ``exp_avg``/``hessian`` back in fp32.

        ``Optimizer.load_state_dict`` casts floating state to each parameter's dtype, which would silently
        turn our fp32 state into bf16 for bf16 parameters.
        """
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                for key, value in saved_state.get(index, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)

    def _state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            dtype = _state_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    # -- Hessian schedule ---------------------------------------------------------------------------------
    @staticmethod
    def _group_due(group: dict[str, Any]) -> bool:
        if group["estimator"] == "gradsq":
            return False  # refreshed inside step() from the training gradients
        return group["step"] % group["hessian_interval"] == 0 and group["hessian_step"] != group["step"]

    def hessian_due(self) -> bool:
        """True when the loop must estimate the Hessian before this step's ``optimizer.step()``."""
        if not self.uses_curvature:
            return False
        return any(self._group_due(group) for group in self.param_groups)

    @torch.no_grad()
    def update_hessian(
        self, scale: float = 1.0, estimates: Mapping[torch.Tensor, torch.Tensor] | None = None
    ) -> int:
        """Consume a fresh diagonal-Hessian estimate: :math:`h \\leftarrow \\beta_2 h + (1-\\beta_2)\\hat h`.

        Without ``estimates``, :math:`\\hat h = \\text{scale}\\cdot\\hat g\\odot\\hat g` with :math:`\\hat g` the
        gradients currently in ``.grad`` (GNB passes ``scale`` = the number of loss-bearing tokens). With
        ``estimates`` (a mapping parameter -> tensor, e.g. Hutchinson's :math:`u\\odot Hu`), each estimate is
        clamped at ``eps`` first, because an unbiased Hessian-vector estimate can be negative and a negative
        curvature would make the clipped ratio meaningless.

        Groups that are due (see :meth:`hessian_due`) are updated; when none is due the call is an explicit
        off-schedule refresh and every group is updated. Returns the number of tensors updated.
        """
        groups = [g for g in self.param_groups if self._group_due(g)]
        if not groups:
            groups = [g for g in self.param_groups if g["estimator"] != "gradsq"] or self.param_groups
        updated = 0
        for group in groups:
            beta2 = group["betas"][1]
            hs, sources = [], []
            for p in group["params"]:
                source = p.grad if estimates is None else estimates.get(p)
                if source is None:
                    continue
                hs.append(self._state_for(p)["hessian"])
                sources.append(source.to(hs[-1].dtype))
            if hs:
                if estimates is None:
                    _ema_square(hs, sources, beta2, scale, foreach=self._use_foreach(group, hs))
                else:
                    for h, est in zip(hs, sources):
                        h.mul_(beta2).add_(est.clamp_min(group["eps"]), alpha=1 - beta2)
            group["hessian_updates"] += 1
            group["hessian_step"] = group["step"]
            updated += len(hs)
        self._record_h_stats()
        return updated

    # -- the step -----------------------------------------------------------------------------------------
    # Subclasses without curvature (Signum) set this False: no estimate is ever due and h stays zero.
    uses_curvature = True
    # The estimator names this class accepts (KroneckerSophia: kfac, ekfac).
    estimators: tuple[str, ...] = ESTIMATORS

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gradsq_seen = False
        work = []  # (group, params, grads, exp_avgs, hessians, bc1, bc2) of the groups with gradients
        for index, group in enumerate(self.param_groups):
            params, grads, exp_avgs, hessians = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self._state_for(p)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                hessians.append(_local(state["hessian"]))
            beta1, beta2 = group["betas"]
            if group["estimator"] == "gradsq" and params and self.uses_curvature:
                # Official SOUL behaviour: h tracks the squared training gradient, refreshed every step.
                _ema_square(hessians, [g.to(h.dtype) for g, h in zip(grads, hessians)], beta2, 1.0,
                            foreach=self._use_foreach(group, params))
                group["hessian_updates"] += 1
                group["hessian_step"] = group["step"]
                gradsq_seen = True
            elif params and group["hessian_updates"] == 0 and self.uses_curvature:
                raise RuntimeError(
                    f"SophiaG param group {index}: step() before any Hessian estimate. Call "
                    "soul.optim.estimate_hessian(model, batch, optimizer) whenever optimizer.hessian_due() "
                    "is True (always on step 0); with h = 0 every update would be a full-size sign step."
                )
            t = group["step"] + 1
            if params:
                if group["bias_correction"]:
                    bc1 = 1 - beta1**t
                    # No estimate yet (curvature off): h is zero and its bias correction is moot.
                    bc2 = 1 - beta2 ** group["hessian_updates"] if group["hessian_updates"] else 1.0
                else:
                    bc1 = bc2 = 1.0
                work.append((group, params, grads, exp_avgs, hessians, bc1, bc2))
            else:
                group["step"] = t
        if any(group["rho"] == AUTO for group, *_ in work):
            self._calibrate_rho([w for w in work if w[0]["rho"] == AUTO])
        clip_counts: list[torch.Tensor] = []
        numel = 0
        for group, params, grads, exp_avgs, hessians, bc1, bc2 in work:
            kwargs = dict(lr=group["lr"], weight_decay=group["weight_decay"], beta1=group["betas"][0],
                          rho=group["rho"], eps=group["eps"], bc1=bc1, bc2=bc2)
            fn = _multi_tensor_sophia if self._use_foreach(group, params) else _single_tensor_sophia
            clip_counts.append(fn(params, grads, exp_avgs, hessians, **kwargs))
            numel += sum(p.numel() for p in params)
            group["step"] += 1
        if clip_counts:
            totals = torch.stack([torch.stack(clip_counts).sum().float(),
                                  torch.tensor(float(numel), device=clip_counts[0].device)])
            self._pending_clip = (totals, all_reduce_async(totals, "sum"))
        if gradsq_seen:
            self._record_h_stats()
        return loss

    def _calibrate_rho(self, work: list[tuple]) -> None:
        """Replace ``rho="auto"`` by the ``target_unclipped`` quantile of |m~_1| / h~ (module docstring).

        Called inside the first ``step()`` before the update, so m~_1 = lerp(m, g, 1 - beta1) / bc1 is what
        the update will compare against rho h~. Only a sample of coordinates is read (``RHO_SAMPLE_SIZE``).
        """
        targets = {float(group["target_unclipped"]) for group, *_ in work}
        if len(targets) != 1:
            raise ValueError(f"SophiaG: param groups calibrated together (rho='auto') must share "
                             f"target_unclipped, got {sorted(targets)}")
        total = sum(p.numel() for _, params, *_ in work for p in params)
        generator = torch.Generator().manual_seed(RHO_SAMPLE_SEED)
        ratios = []
        for group, _, grads, exp_avgs, hessians, bc1, bc2 in work:
            beta1 = group["betas"][0]
            for g, m, h in zip(grads, exp_avgs, hessians):
                n = m.numel()
                if total > RHO_SAMPLE_SIZE:
                    k = max(1, math.ceil(RHO_SAMPLE_SIZE * n / total))
                    idx = torch.randint(0, n, (k,), generator=generator).to(m.device)
                    g_s, m_s, h_s = (x.reshape(-1)[idx] for x in (g, m, h))
                else:
                    g_s, m_s, h_s = g.reshape(-1), m.reshape(-1), h.reshape(-1)
                m_hat = m_s.lerp(g_s.to(m_s.dtype), 1 - beta1).abs() / bc1
                h_hat = h_s / bc2
                moving = m_hat > 0
                ratio = torch.where(h_hat > 0, m_hat / h_hat.clamp_min(torch.finfo(h_hat.dtype).tiny),
                                    torch.full_like(m_hat, math.inf))
                ratios.append(ratio[moving].float())
        ratio = torch.cat(ratios) if ratios else torch.zeros(0)
        if ratio.numel() == 0:
            raise RuntimeError("SophiaG rho='auto': every gradient coordinate is zero on the first step, "
                               "so there is nothing to calibrate rho on")
        rho_local = torch.quantile(ratio.double(), targets.pop())
        if is_distributed():  # FSDP shards differ: average the per-shard quantiles (DDP: all equal anyway)
            rho_local = all_reduce_sum(rho_local.reshape(1)).squeeze(0) / world_size()
        rho = float(rho_local)
        if not (math.isfinite(rho) and rho > 0):
            raise RuntimeError(
                f"SophiaG rho='auto': the calibrated rho is {rho} (the quantile of |m|/h fell where the Hessian "
                "estimate is zero or the momentum is); lower target_unclipped or give rho explicitly")
        for group, *_ in work:
            group["rho"] = rho
            group["rho_auto"] = True

    @staticmethod
    def _use_foreach(group: dict[str, Any], tensors: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(t.device.type != "meta" for t in tensors)

    # -- diagnostics --------------------------------------------------------------------------------------
    def _record_h_stats(self) -> None:
        hs = [_local(s["hessian"]) for s in self.state.values() if "hessian" in s]
        if not hs:
            return
        # h >= 0 always (squares, or estimates clamped at eps), so the 1-norm is the sum.
        sums = torch._foreach_norm(hs, 1)
        maxes = torch._foreach_norm(hs, math.inf)
        device = sums[0].device
        totals = torch.stack([torch.stack([s.to(device) for s in sums]).sum().float(),
                              torch.tensor(float(sum(h.numel() for h in hs)), device=device)])
        hmax = torch.stack([m.to(device) for m in maxes]).max().float().reshape(1)
        self._pending_h = (totals, hmax, all_reduce_async(totals, "sum"), all_reduce_async(hmax, "max"))

    @property
    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last step: ``clip_fraction``, ``h_mean``, ``h_max`` (NaN before available)."""
        stats = {"clip_fraction": math.nan, "h_mean": math.nan, "h_max": math.nan}
        if self._pending_clip is not None:
            totals, handle = self._pending_clip
            if handle is not None:
                handle.wait()
            clipped, numel = totals.tolist()
            stats["clip_fraction"] = clipped / max(numel, 1.0)
        if self._pending_h is not None:
            totals, hmax, h1, h2 = self._pending_h
            for handle in (h1, h2):
                if handle is not None:
                    handle.wait()
            hsum, numel = totals.tolist()
            stats["h_mean"] = hsum / max(numel, 1.0)
            stats["h_max"] = float(hmax.item())
        if self.param_groups:
            rho = self.param_groups[0]["rho"]
            stats["rho"] = math.nan if rho == AUTO else float(rho)
            stats["step"] = self.param_groups[0]["step"]
            stats["hessian_updates"] = self.param_groups[0]["hessian_updates"]
        return stats


def _validate(group: Mapping[str, Any], *, where: str, estimators: tuple[str, ...] = ESTIMATORS) -> None:
    lr, (beta1, beta2) = group["lr"], group["betas"]
    checks = [
        (isinstance(lr, float | int) and lr >= 0, f"lr must be >= 0, got {lr!r}"),
        (0.0 <= beta1 < 1.0, f"betas[0] must be in [0, 1), got {beta1!r}"),
        (0.0 <= beta2 < 1.0, f"betas[1] must be in [0, 1), got {beta2!r}"),
        (group["rho"] == AUTO or (isinstance(group["rho"], float | int) and not isinstance(group["rho"], bool)
                                  and group["rho"] > 0),
         f"rho (gamma) must be a number > 0 or 'auto', got {group['rho']!r}"),
        (isinstance(group.get("target_unclipped", 0.5), float | int)
         and 0 < group.get("target_unclipped", 0.5) < 1,
         f"target_unclipped must be in (0, 1), got {group.get('target_unclipped')!r}"),
        (group["eps"] > 0, f"eps must be > 0, got {group['eps']!r}"),
        (group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']!r}"),
        (isinstance(group["hessian_interval"], int) and group["hessian_interval"] >= 1,
         f"hessian_interval must be an integer >= 1, got {group['hessian_interval']!r}"),
        (group["estimator"] in estimators,
         f"estimator must be one of {list(estimators)}, got {group['estimator']!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")


def _ema_square(hs: list[torch.Tensor], gs: list[torch.Tensor], beta2: float, scale: float, *,
                foreach: bool) -> None:
    """h <- beta2 h + (1 - beta2) * scale * g * g for each pair."""
    if foreach:
        torch._foreach_mul_(hs, beta2)
        torch._foreach_addcmul_(hs, gs, gs, value=(1 - beta2) * scale)
    else:
        for h, g in zip(hs, gs):
            h.mul_(beta2).addcmul_(g, g, value=(1 - beta2) * scale)


def _single_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, weight_decay, beta1, rho, eps, bc1, bc2):
    """Reference path: the update rule written literally, one tensor at a time. Returns #clipped coords."""
    clipped = torch.zeros((), device=params[0].device)
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        # lerp: m + (1-b1)(g - m) = b1 m + (1-b1) g, the same rounding as the foreach path (the ratio
        # m / (rho h) amplifies rounding differences in m wherever h is tiny).
        m.lerp_(g.to(m.dtype), 1 - beta1)
        m_hat = m / bc1
        h_hat = h / bc2
        ratio = m_hat.abs() / torch.clamp(rho * h_hat, min=eps)
        step = m_hat.sign() * ratio.clamp(max=1.0)
        p.add_(step.to(p.dtype), alpha=-lr)
        # The diagnostic's definition (shared with the foreach path): |m~| > rho h~. It differs from
        # "ratio >= 1" only on exact ties and where |m~| <= eps, i.e. numerically zero momentum.
        clipped = clipped + (m_hat.abs() > rho * h_hat).sum()
    return clipped


# On CPU the foreach path works through the parameters in buckets of at most this many elements (large
# contiguous tensors are cut into flat pieces). Why: (1) the scratch buffer of a bucket (4 MiB in fp32) is
# served from the allocator's free lists instead of fresh pages (a first touch of a fresh page costs ~10x an
# in-place pass; one full-size scratch is ~half of a torch AdamW foreach step on CPU), and (2) a bucket's
# p, g, m, h and scratch (~20 MiB) stay in the last-level cache across the six passes. On accelerators there
# is no such effect and every extra bucket is extra kernel launches, so the whole group is one bucket.
CPU_BUCKET_NUMEL = 1 << 20


def _buckets(tensor_lists: list[list[torch.Tensor]], cap: int | None) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into buckets of <= ``cap`` elements (one bucket when ``cap`` is None).

    A tensor larger than ``cap`` whose counterparts are all contiguous is cut into flat views of ``cap``
    elements, so in-place updates of the pieces update the tensors themselves.
    """
    if cap is None:
        return [tensor_lists]
    buckets: list[list[list[torch.Tensor]]] = []
    current: list[list[torch.Tensor]] = [[] for _ in tensor_lists]
    size = 0
    for row in zip(*tensor_lists):
        n = row[0].numel()
        if n > cap and all(t.is_contiguous() for t in row):
            pieces = list(zip(*(t.view(-1).split(cap) for t in row)))
        else:
            pieces = [row]
        for piece in pieces:
            if size and size + piece[0].numel() > cap:
                buckets.append(current)
                current, size = [[] for _ in tensor_lists], 0
            for column, t in zip(current, piece):
                column.append(t)
            size += piece[0].numel()
    if current[0]:
        buckets.append(current)
    return buckets


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, weight_decay, beta1, rho, eps, bc1, bc2):
    """foreach path: one scratch buffer and 18 elementwise memory passes (torch AdamW's foreach path: 20).

    With m~ = m / bc1, h~ = h / bc2 and a = rho bc1 / bc2, f = eps bc2 / rho:
    sign(m~) min(|m~| / max(rho h~, eps), 1) = (m / D) / a with D = max(|m|/a, h, f),
    so the clip needs no clamp of the ratio and the update is a single addcdiv. The scratch buffer holds
    E = |m|/a and then, in place, D. A coordinate is counted as clipped when E > h (i.e. |m~| > rho h~),
    read from E before it is overwritten: a compare into a bool (a quarter of a pass) and a count.
    On CPU the lists are processed in buckets of ``CPU_BUCKET_NUMEL`` elements (see there for why).
    """
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    a = rho * bc1 / bc2
    cap = CPU_BUCKET_NUMEL if params[0].device.type == "cpu" else None
    same_dtype = all(p.dtype == m.dtype for p, m in zip(params, exp_avgs))
    counts: list[torch.Tensor] = []
    for ps, gs, ms, hs in _buckets([params, grads, exp_avgs, hessians], cap):
        if weight_decay:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)  # m + (1-b1)(g - m) = b1 m + (1-b1) g
        denom = torch._foreach_abs(ms)  # the only allocation: one tensor per parameter (piece)
        torch._foreach_mul_(denom, 1.0 / a)  # E = |m| / a
        counts.extend(torch.count_nonzero(torch.gt(e, h)) for e, h in zip(denom, hs))
        torch._foreach_maximum_(denom, hs)
        torch._foreach_clamp_min_(denom, eps * bc2 / rho)  # D = max(E, h, f)
        if same_dtype:
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / a)
        else:
            for p, m, d in zip(ps, ms, denom):
                p.add_((m / d).to(p.dtype), alpha=-lr / a)
        del denom  # free the scratch before the next bucket allocates its own
    return torch.stack(counts).sum()
