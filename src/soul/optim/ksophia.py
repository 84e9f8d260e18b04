r"""Sophia with a Kronecker-factored (K-FAC / EK-FAC) preconditioner: ``--optimizer sophia --estimator kfac|ekfac``.

The curvature is :mod:`soul.optim.kfac`'s Gauss-Newton (true Fisher, ``fisher="mc"``: labels drawn from the
model as GNB draws them) of the mean per-token loss of the Hessian batch. Each covered module (attention and
MLP projections) is one Kronecker block acting on its weight (and bias) as an :math:`o\times\tilde n` matrix
:math:`M`; every other trainable parameter (embedding / tied ``lm_head``, norm gains) keeps diagonal GNB
Sophia, exactly :class:`~soul.optim.sophia.SophiaG`'s rule on ``fit_kfac``'s diagonal, which is GNB's
estimate.

Update for a block with gradient :math:`G_t` (as a matrix), step :math:`t` (0-based), the hyper-parameters of
the weight's param group (:math:`\eta` the lr of each parameter's own group):

.. math::

    \theta &\leftarrow \theta - \eta\,\lambda_{wd}\,\theta  && \text{(decoupled weight decay, as SophiaG)}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,G_t                                 && \text{(every step)}\\
    A &\leftarrow \beta_2 A + (1-\beta_2)\hat A,\quad G \leftarrow \beta_2 G + (1-\beta_2)\hat G
        && \text{(on a refresh: every } k=\texttt{hessian\_interval}\text{ steps from step 0)}\\
    \tilde A &= A/b_2,\ \tilde G = G/b_2 = Q_A\Lambda_AQ_A^\top,\ Q_G\Lambda_GQ_G^\top
        && (b_2 = 1-\beta_2^{n},\ n\text{ refreshes so far})\\
    \tilde D &= \lambda_G\lambda_A^\top \ \text{(K-FAC)}, \qquad \tilde D = S/b_2 \ \text{(EK-FAC)}\\
    \tilde u &= Q_G\Big[\big(Q_G^\top \tilde m\,Q_A\big) \oslash
        \max\!\big(\rho\,(\tilde D + \delta),\ \epsilon\big)\Big]Q_A^\top,
        \qquad \tilde m = m_t/(1-\beta_1^{t+1}),\quad \delta = r\,\overline{\tilde D}\\
    \theta &\leftarrow \theta - \eta\,\operatorname{clip}(\tilde u,\,-1,\,1)  && \text{(per coordinate)}

:math:`\hat A, \hat G` are the factors ``fit_kfac`` fits on the refresh's Hessian batch. Each factor's EMA
starts at zero, so each is bias-corrected by :math:`b_2` (``bias_correction=False``: :math:`b_2 = 1`, the
official-code convention); the product :math:`\tilde G\otimes\tilde A` is the EMA-smoothed K-FAC curvature.
The eigendecompositions are recomputed from the EMA factors on every refresh (float64, stored in the state
dtype); on the first refresh the EMA is a multiple of the fit, whose eigenvectors are reused.

EK-FAC: after the factors' EMA and its eigenbasis, a second pass over the same batch (``fit_kfac``'s
correction pass, fresh label draws) fits the eigenvalue corrections :math:`\hat S_{jk} = \frac1B\sum_e
(Q_G^\top D_eQ_A)_{jk}^2` *in the EMA eigenbasis*, and :math:`S \leftarrow \beta_2\,R_G S_{old} R_A +
(1-\beta_2)\hat S`, where :math:`R_G = (Q_G^\top Q_G^{old})^{\circ2}`, :math:`R_A = ((Q_A^{old})^\top
Q_A)^{\circ2}` (elementwise squares) carry the old :math:`S` into the new basis exactly: :math:`R_GS_{old}R_A`
is the diagonal, in the new basis, of the operator :math:`(Q^{old}_G\otimes Q^{old}_A)\,\mathrm{diag}(S_{old})
(\ldots)^\top`. So :math:`S` is always an EMA of diagonals in the basis it is used in.

Damping. :math:`\delta = r\,\overline{\tilde D}` (``damping_relative`` :math:`r`, default 0.1 as in
``soul.optim.kfac``; per block, :math:`\overline{\tilde D}` the mean of the block's eigenvalues). It is needed
because the clip acts in parameter coordinates after rotating back: a Hessian batch of :math:`T` tokens gives
:math:`\hat G` of rank :math:`\le T`, and an eigen-direction with :math:`\tilde D = 0` would give
:math:`\tilde u = \tilde m/\epsilon` there, which the rotation spreads over every coordinate of the block
(all clipped, the step the sign of that one component). In SophiaG the division and the clip happen in the same
(coordinate) basis, so a zero :math:`h` only saturates its own coordinate. ``damping_relative=0`` gives the
undamped rule.

Relation to SophiaG. With :math:`Q_G = I`, :math:`Q_A = I` and :math:`r = 0` the rule *is* SophiaG's,
:math:`\theta \leftarrow \theta - \eta\,\mathrm{clip}(\tilde m/\max(\rho\tilde h, \epsilon), 1)` with
:math:`\tilde h = \tilde D` (the tests check this to rounding, through several refreshes). The floor
:math:`\max(\rho\cdot, \epsilon)` is applied to the eigenvalues (a spectral floor, the matrix function
:math:`\max(\rho C, \epsilon I)^{-1}`), not as :math:`(\rho C + \epsilon I)^{-1}`; the two differ by at most a
factor 2, only on eigenvalues :math:`\rho\tilde D \approx \epsilon`, and the max is what makes the reduction
exact.

Clip fraction (``last_stats["clip_fraction"]``, the loop's log and run diagnostics): the fraction of all
updated coordinates whose step was clipped — :math:`|\tilde u| > 1` in the blocks, :math:`|\tilde m| > \rho\tilde
h` (SophiaG's definition) elsewhere. ``h_mean``/``h_max`` describe the diagonal part only (the EMA
:math:`h`, uncorrected, as SophiaG's); ``kron_eig_mean`` is the mean of :math:`\tilde D` over the blocks'
entries after the last refresh.

``rho="auto"``: the first step picks :math:`\rho` as the ``target_unclipped`` quantile of the ratios at
:math:`\rho = 1` — :math:`|\tilde u|` computed with :math:`\max(\tilde D + \delta, \epsilon)` in the blocks and
:math:`|\tilde m|/\tilde h` elsewhere — on at most ``RHO_SAMPLE_SIZE`` coordinates (as SophiaG). Since
:math:`\tilde u(\rho) = \tilde u(1)/\rho` wherever :math:`\rho(\tilde D+\delta) \ge \epsilon`, that fraction
of coordinates is left unclipped on step 1.

Schedule: as SophiaG (the loop calls :func:`soul.optim.estimate_hessian` when :meth:`hessian_due`; the
estimator ``kfac``/``ekfac`` calls :meth:`KroneckerSophia.refresh_curvature`). A refresh updates every param
group (one curvature of the whole model) and counts in each group's ``hessian_updates``.

State (per parameter, in ``state_dict``, so checkpoints keep it): ``exp_avg`` for every parameter;
``hessian`` for the diagonal ones; the block's factors in its weight's state — ``kron_A``, ``kron_G`` (EMAs),
``kron_QA``, ``kron_LA``, ``kron_QG``, ``kron_LG`` (their eigendecompositions), ``kron_S`` (EK-FAC) — and,
as plain numbers, ``kron_bias`` (the flat index of the block's bias parameter in the optimizer, -1 without)
and ``kron_transposed`` (GPT-2 Conv1D stores :math:`W^\top`). The eigenbases are stored rather than
recomputed so that a resumed run takes bit-identical steps.

Cost per step: four matrix products per block, :math:`2(o^2\tilde n + o\tilde n^2)` multiply-adds, against
:math:`3o\tilde n` per token for the block's forward and backward: about the cost of :math:`(o + \tilde n)`
tokens of training. Distributed: the factors are all-reduced by ``fit_kfac``; FSDP-sharded parameters are not
supported (``fit_kfac`` refuses them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soul.optim import sophia as _sophia
from soul.optim.sophia import AUTO, DEFAULT_TARGET_UNCLIPPED, RHO_SAMPLE_SEED, RHO_SAMPLE_SIZE, SophiaG

KRONECKER_ESTIMATORS = ("kfac", "ekfac")
DEFAULT_DAMPING_RELATIVE = 0.1  # soul.optim.kfac's default
_FACTORS = ("kron_A", "kron_G", "kron_QA", "kron_LA", "kron_QG", "kron_LG", "kron_S")


@dataclass
class _KBlock:
    """One Kronecker block of the optimizer: its weight (whose state holds the factors) and bias."""

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    transposed: bool

    def matrix(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The block's (o, ñ) matrix from tensors shaped like the weight and the bias."""
        w = w.t() if self.transposed else w
        return torch.cat([w, b.to(w.dtype)[:, None]], dim=1) if b is not None else w

    def split(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = (m[:, :-1], m[:, -1]) if self.bias is not None else (m, None)
        return (w.t() if self.transposed else w), b


def _eig(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 like soul.optim.kfac; rounding can leave tiny negative eigenvalues of a PSD factor: clamp.
    # Contiguous: eigh's eigenvectors are column-major, and a loaded state's are row-major; products with
    # other strides round differently, so a resumed run would not take bit-identical steps.
    evals, evecs = torch.linalg.eigh(mat.double())
    return evecs.to(mat.dtype).contiguous(), evals.clamp_min(0).to(mat.dtype)


class KroneckerSophia(SophiaG):
    """SophiaG whose curvature is K-FAC (``estimator="kfac"``) or EK-FAC (``"ekfac"``); module docstring.

    Takes SophiaG's arguments plus ``damping_relative`` (:math:`r \\ge 0`, per block, default 0.1). The
    block structure comes from the first curvature (:meth:`refresh_curvature` / :meth:`update_curvature`),
    so the optimizer is built from parameters alone, like any torch optimizer.
    """

    estimators = KRONECKER_ESTIMATORS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float | str = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        hessian_interval: int = 10,
        estimator: str = "kfac",
        bias_correction: bool = True,
        foreach: bool | None = None,
        target_unclipped: float = DEFAULT_TARGET_UNCLIPPED,
        damping_relative: float = DEFAULT_DAMPING_RELATIVE,
    ) -> None:
        if isinstance(damping_relative, bool) or not (isinstance(damping_relative, int | float)
                                                      and math.isfinite(damping_relative) and damping_relative >= 0):
            raise ValueError(f"KroneckerSophia: damping_relative must be a finite number >= 0, got "
                             f"{damping_relative!r}")
        super().__init__(params, lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                         hessian_interval=hessian_interval, estimator=estimator, bias_correction=bias_correction,
                         foreach=foreach, target_unclipped=target_unclipped)
        self.defaults["damping_relative"] = float(damping_relative)
        self._kblocks: list[_KBlock] | None = None
        self._kron_stats: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.defaults["estimator"]

    # -- structure ----------------------------------------------------------------------------------------
    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter not in this optimizer")

    def _adopt(self, curv: Any) -> None:
        """Learn the blocks (weight, bias, transposed) from a fitted curvature; check it fits this optimizer."""
        by_name = dict(zip(curv.param_names, curv.params))
        flat = self._flat_params()
        index = {id(p): i for i, p in enumerate(flat)}
        missing = [n for n, p in by_name.items() if id(p) not in index]
        if missing:
            raise ValueError(f"KroneckerSophia: the curvature covers parameters this optimizer does not hold "
                             f"({missing[:3]}); build the optimizer on the model's trainable parameters")
        blocks = []
        for b in curv.blocks.values():
            weight = by_name[b.weight]
            bias = by_name[b.bias] if b.bias is not None else None
            state = self.state[weight]
            state["kron_bias"] = index[id(bias)] if bias is not None else -1
            state["kron_transposed"] = bool(b.transposed)
            blocks.append(_KBlock(weight, bias, bool(b.transposed)))
        if self._kblocks is not None:
            same = [(id(k.weight), id(k.bias)) for k in self._kblocks] == [(id(k.weight), id(k.bias)) for k in blocks]
            if not same:
                raise ValueError("KroneckerSophia: a refreshed curvature has other blocks than the previous one")
        self._kblocks = blocks

    def _blocks_from_state(self) -> list[_KBlock] | None:
        flat = self._flat_params()
        blocks = []
        for p in flat:
            state = self.state.get(p, {})
            if "kron_transposed" in state:
                bias_index = int(state["kron_bias"])
                blocks.append(_KBlock(p, flat[bias_index] if bias_index >= 0 else None,
                                      bool(state["kron_transposed"])))
        return blocks or None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._kblocks = self._blocks_from_state()

    def _exp_avg(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=_sophia._state_dtype(p), memory_format=torch.preserve_format)
        return state["exp_avg"]

    # -- curvature ----------------------------------------------------------------------------------------
    def update_hessian(self, scale: float = 1.0,
                       estimates: Mapping[torch.Tensor, torch.Tensor] | None = None) -> int:
        raise TypeError("KroneckerSophia takes a Kronecker curvature: soul.optim.estimate_hessian(model, batch, "
                        "optimizer) (estimator kfac/ekfac) or optimizer.refresh_curvature(model, batches)")

    @torch.no_grad()
    def refresh_curvature(self, model: torch.nn.Module, batches: Any, *, generator: torch.Generator | None = None,
                          samples: int = 1, seed: int = 0) -> dict[str, float]:
        """Fit the factors on ``batches`` (``fit_kfac``, ``fisher="mc"``, ``samples`` label draws) and fold
        them into the EMA (module docstring); EK-FAC runs the correction pass in the EMA eigenbasis."""
        from soul.optim import kfac

        if generator is None:  # one generator for both passes, seeded as fit_kfac seeds its own
            rank = torch.distributed.get_rank() if kfac.is_distributed() else 0
            device = next(kfac._unwrap(model).parameters()).device
            generator = torch.Generator(device=device).manual_seed(int(seed) + rank)
        with torch.enable_grad():
            curv = kfac.fit_kfac(model, batches, kind="kfac", fisher="mc", mc_samples=samples, seed=seed,
                                 generator=generator)
        corrections = None
        if self.kind == "ekfac":
            def corrections(blocks: dict[str, Any]) -> None:
                # fit_kfac's second pass (per-example gradients projected on the bases in `blocks`), on the
                # same batches with fresh draws from the same generator.
                unwrapped = kfac._unwrap(model)
                modules = dict(unwrapped.named_modules())
                module_of = {n: modules[n] for n in blocks}
                device = next(unwrapped.parameters()).device
                was_training = unwrapped.training
                unwrapped.eval()
                try:
                    with torch.enable_grad():
                        kfac._fit_corrections(unwrapped, kfac._as_batches(batches), blocks, module_of, "mc",
                                              samples, generator, device, curv.tokens * samples)
                finally:
                    unwrapped.train(was_training)
        self.update_curvature(curv, corrections=corrections)
        return {"tokens": float(curv.tokens), "samples": float(samples)}

    @torch.no_grad()
    def update_curvature(self, curv: Any, *, corrections: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Fold a fitted :class:`~soul.optim.kfac.KroneckerCurvature` (its ``A``, ``G`` and diagonal) into the
        EMA. For EK-FAC, ``corrections(blocks)`` must set ``blocks[name].S`` in the bases ``QA``/``QG`` it is
        given (:meth:`refresh_curvature` passes ``fit_kfac``'s correction pass); without it, the fit's own
        ``S`` (in its own basis) is carried into the EMA basis like the old ``S``."""
        from soul.optim.kfac import _Block

        if self.kind == "ekfac" and corrections is None and any(b.S is None for b in curv.blocks.values()):
            raise ValueError("KroneckerSophia(ekfac).update_curvature: give an EK-FAC curvature or corrections")
        self._adopt(curv)
        named = dict(zip(curv.param_names, curv.params))
        kron_eigs = []
        pending: dict[str, _Block] = {}
        fresh_s: dict[str, torch.Tensor] = {}
        old_bases: dict[str, tuple] = {}  # EK-FAC: the eigenbases the previous S lives in
        for (module, b), blk in zip(curv.blocks.items(), self._kblocks or []):
            state = self.state[blk.weight]
            beta2 = self._group_of(blk.weight)["betas"][1]
            first = "kron_A" not in state
            old_bases[module] = (state.get("kron_QG"), state.get("kron_QA"))
            if first:
                state["kron_A"] = b.A.mul(1 - beta2)
                state["kron_G"] = b.G.mul(1 - beta2)
                # a positive multiple of the fit: the fit's eigenvectors, eigenvalues scaled alike
                state["kron_QA"], state["kron_LA"] = b.QA.contiguous().clone(), b.LA.mul(1 - beta2)
                state["kron_QG"], state["kron_LG"] = b.QG.contiguous().clone(), b.LG.mul(1 - beta2)
            else:
                state["kron_A"].mul_(beta2).add_(b.A.to(state["kron_A"]), alpha=1 - beta2)
                state["kron_G"].mul_(beta2).add_(b.G.to(state["kron_G"]), alpha=1 - beta2)
                state["kron_QA"], state["kron_LA"] = _eig(state["kron_A"])
                state["kron_QG"], state["kron_LG"] = _eig(state["kron_G"])
            if self.kind == "ekfac":
                if corrections is not None:
                    pending[module] = _Block(weight=b.weight, bias=b.bias, transposed=b.transposed, A=state["kron_A"],
                                             G=state["kron_G"], QA=state["kron_QA"], QG=state["kron_QG"])
                else:  # the fit's S in its own basis, carried into the EMA basis
                    fresh_s[module] = _carry(b.S, (b.QG, b.QA), (state["kron_QG"], state["kron_QA"]))
        if pending:
            assert corrections is not None
            corrections(pending)
            fresh_s = {m: blk.S for m, blk in pending.items()}
        for module, blk in zip(curv.blocks, self._kblocks or []):
            state = self.state[blk.weight]
            if self.kind == "ekfac":
                beta2 = self._group_of(blk.weight)["betas"][1]
                new = fresh_s[module].to(state["kron_A"]).mul(1 - beta2)
                if "kron_S" in state:
                    new.add_(_carry(state["kron_S"], old_bases[module], (state["kron_QG"], state["kron_QA"])),
                             alpha=beta2)
                state["kron_S"] = new
        # the diagonal part: SophiaG's EMA, h <- beta2 h + (1 - beta2) h^ (h^ = GNB's estimate, not clamped)
        for name, h_new in curv.diag.items():
            p = named[name]
            state = self.state[p]
            if "hessian" not in state:
                state["hessian"] = torch.zeros_like(p, dtype=_sophia._state_dtype(p))
            beta2 = self._group_of(p)["betas"][1]
            state["hessian"].mul_(beta2).add_(h_new.to(state["hessian"]), alpha=1 - beta2)
        for group in self.param_groups:
            group["hessian_updates"] += 1
            group["hessian_step"] = group["step"]
        for blk in self._kblocks or []:
            group = self._group_of(blk.weight)
            bc2 = 1 - group["betas"][1] ** group["hessian_updates"] if group["bias_correction"] else 1.0
            kron_eigs.append(self._eigenvalues(blk, self.state[blk.weight], bc2))
        if kron_eigs:
            self._kron_stats = torch.stack([torch.stack([e.double().sum() for e in kron_eigs]).sum(),
                                            torch.tensor(float(sum(e.numel() for e in kron_eigs)),
                                                         dtype=torch.float64, device=kron_eigs[0].device)])
        self._record_h_stats()

    def _eigenvalues(self, blk: _KBlock, state: dict[str, Any], bc2: float) -> torch.Tensor:
        """D~: the block's curvature eigenvalues, bias-corrected by bc2 (module docstring)."""
        if self.kind == "ekfac":
            return state["kron_S"] / bc2
        return (state["kron_LG"][:, None] / bc2) * (state["kron_LA"][None, :] / bc2)

    def _direction(self, blk: _KBlock, m_hat: torch.Tensor, rho: float, eps: float, bc2: float) -> torch.Tensor:
        """u~ = Q_G [(Q_G^T m~ Q_A) / max(rho (D~ + delta), eps)] Q_A^T for the block's momentum matrix m~."""
        state = self.state[blk.weight]
        d = self._eigenvalues(blk, state, bc2)
        delta = self.defaults["damping_relative"] * d.mean()
        qg, qa = state["kron_QG"], state["kron_QA"]
        rotated = qg.t() @ m_hat.to(qg.dtype) @ qa
        return qg @ (rotated / ((d + delta) * rho).clamp_min(eps)) @ qa.t()

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._kblocks is None:
            self._kblocks = self._blocks_from_state()
        in_block = {id(p) for k in (self._kblocks or []) for p in (k.weight, k.bias) if p is not None}
        corr: dict[int, tuple[float, float]] = {}  # id(group) -> (bc1, bc2) of this step
        diag_work = []
        for index, group in enumerate(self.param_groups):
            if any(p.grad is not None for p in group["params"]) and group["hessian_updates"] == 0:
                raise RuntimeError(
                    f"KroneckerSophia param group {index}: step() before any curvature. Call "
                    "soul.optim.estimate_hessian(model, batch, optimizer) whenever optimizer.hessian_due() is True "
                    "(always on step 0).")
            beta1, beta2 = group["betas"]
            t = group["step"] + 1
            bc1, bc2 = ((1 - beta1**t, 1 - beta2 ** group["hessian_updates"]) if group["bias_correction"]
                        else (1.0, 1.0))
            corr[id(group)] = (bc1, bc2)
            params, grads, exp_avgs, hessians = [], [], [], []
            for p in group["params"]:
                if p.grad is None or id(p) in in_block:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KroneckerSophia does not support sparse gradients")
                state = self.state[p]
                self._exp_avg(p)
                if "hessian" not in state:  # a parameter the curvature does not know: h = 0, sign steps
                    state["hessian"] = torch.zeros_like(p, dtype=_sophia._state_dtype(p))
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
            if params:
                diag_work.append((group, params, grads, exp_avgs, hessians, bc1, bc2))
        # momentum of the block parameters first (rho='auto' reads m~_1, and the clip uses it)
        block_work = []
        for blk in self._kblocks or []:
            if blk.weight.grad is None:
                continue
            group = self._group_of(blk.weight)
            ms = []
            for p in (blk.weight, blk.bias):
                if p is None:
                    ms.append(None)
                    continue
                g_p = self._group_of(p)
                if g_p["weight_decay"]:
                    p.mul_(1 - g_p["lr"] * g_p["weight_decay"])
                m = self._exp_avg(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                m.lerp_(grad.to(m.dtype), 1 - g_p["betas"][0])
                ms.append(m)
            bc1, bc2 = corr[id(group)]
            block_work.append((blk, group, blk.matrix(ms[0], ms[1]) / bc1, bc2))
        if any(group["rho"] == AUTO for group in self.param_groups):
            self._calibrate_kron_rho(diag_work, block_work)
        clipped = []
        numel = 0
        for group, params, grads, exp_avgs, hessians, bc1, bc2 in diag_work:
            kwargs = dict(lr=group["lr"], weight_decay=group["weight_decay"], beta1=group["betas"][0],
                          rho=group["rho"], eps=group["eps"], bc1=bc1, bc2=bc2)
            fn = (_sophia._multi_tensor_sophia if self._use_foreach(group, params)
                  else _sophia._single_tensor_sophia)
            clipped.append(fn(params, grads, exp_avgs, hessians, **kwargs).float())
            numel += sum(p.numel() for p in params)
        for blk, group, m_hat, bc2 in block_work:
            u = self._direction(blk, m_hat, group["rho"], group["eps"], bc2)
            clipped.append((u.abs() > 1).sum().float())
            numel += u.numel()
            step_w, step_b = blk.split(u.clamp(-1.0, 1.0))
            for p, s in ((blk.weight, step_w), (blk.bias, step_b)):
                if p is not None:
                    p.add_(s.to(p.dtype), alpha=-self._group_of(p)["lr"])
        for group in self.param_groups:
            group["step"] += 1
        if clipped:
            totals = torch.stack([torch.stack([c.to(clipped[0].device) for c in clipped]).sum(),
                                  torch.tensor(float(numel), device=clipped[0].device)])
            self._pending_clip = (totals, _sophia.all_reduce_async(totals, "sum"))
        return loss

    def _calibrate_kron_rho(self, diag_work: list[tuple], block_work: list[tuple]) -> None:
        """rho='auto' (module docstring): the target_unclipped quantile of |u~(rho=1)| and |m~_1|/h~."""
        groups = [g for g in self.param_groups if g["rho"] == AUTO]
        targets = {float(g["target_unclipped"]) for g in groups}
        if len(targets) != 1:
            raise ValueError(f"KroneckerSophia: param groups calibrated together (rho='auto') must share "
                             f"target_unclipped, got {sorted(targets)}")
        auto = {id(g) for g in groups}
        pieces: list[torch.Tensor] = []
        for group, _params, grads, exp_avgs, hessians, bc1, bc2 in diag_work:
            if id(group) not in auto:
                continue
            for g, m, h in zip(grads, exp_avgs, hessians):
                m_hat = m.lerp(g.to(m.dtype), 1 - group["betas"][0]).abs().reshape(-1) / bc1
                h_hat = h.reshape(-1) / bc2
                ratio = torch.where(h_hat > 0, m_hat / h_hat.clamp_min(torch.finfo(h_hat.dtype).tiny),
                                    torch.full_like(m_hat, math.inf))
                pieces.append(ratio[m_hat > 0])
        for blk, group, m_hat, bc2 in block_work:
            if id(group) in auto:
                u = self._direction(blk, m_hat, 1.0, group["eps"], bc2).abs().reshape(-1)
                pieces.append(u[m_hat.reshape(-1) != 0])
        total = sum(p.numel() for p in pieces)
        if total == 0:
            raise RuntimeError("KroneckerSophia rho='auto': every gradient coordinate is zero on the first step, "
                               "so there is nothing to calibrate rho on")
        generator = torch.Generator().manual_seed(RHO_SAMPLE_SEED)
        sample = []
        for piece in pieces:
            n = piece.numel()
            if total > RHO_SAMPLE_SIZE and n:
                k = max(1, math.ceil(RHO_SAMPLE_SIZE * n / total))
                piece = piece[torch.randint(0, n, (k,), generator=generator).to(piece.device)]
            sample.append(piece.double().cpu())
        rho = float(torch.quantile(torch.cat(sample), targets.pop()))
        if not (math.isfinite(rho) and rho > 0):
            raise RuntimeError(f"KroneckerSophia rho='auto': the calibrated rho is {rho}; lower target_unclipped "
                               "or give rho explicitly")
        for group in groups:
            group["rho"] = rho
            group["rho_auto"] = True

    @property
    def last_stats(self) -> dict[str, float]:
        """SophiaG's diagnostics (clip fraction over every coordinate, h_* of the diagonal part) and
        ``kron_eig_mean``, the mean of the blocks' bias-corrected eigenvalues D~ at the last refresh."""
        stats = super().last_stats
        if self._kron_stats is not None:
            total, count = self._kron_stats.tolist()
            stats["kron_eig_mean"] = total / max(count, 1.0)
        return stats


def _carry(s_old: torch.Tensor, old: Sequence[torch.Tensor | None], new: Sequence[torch.Tensor]) -> torch.Tensor:
    """The diagonal, in the Kronecker basis ``new`` = (Q_G, Q_A), of diag(S_old) in the basis ``old``:
    R_G S_old R_A with R_G = (Q_G^T Q_G_old)^2 and R_A = (Q_A_old^T Q_A)^2 elementwise (module docstring)."""
    old_qg, old_qa = old
    new_qg, new_qa = new
    s_old = s_old.to(new_qg)
    if old_qg is None or old_qa is None:
        return s_old
    r_g = (new_qg.t() @ old_qg.to(new_qg)).square()
    r_a = (old_qa.to(new_qa).t() @ new_qa).square()
    return r_g @ s_old @ r_a
