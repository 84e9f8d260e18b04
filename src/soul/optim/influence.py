r"""One-shot influence (Newton) unlearning: the static update that SOUL makes iterative.

.. math::

    \theta \leftarrow \theta + \Delta, \qquad \Delta = \alpha\,(C + \lambda I)^{-1}\,\nabla_\theta L_{\text{forget}}(\theta)

:math:`L_{\text{forget}}` is :func:`soul.losses.answer_nll` averaged over the forget batches, :math:`C` a
curvature estimate accumulated over the retain batches (and/or the forget batches, ``hessian_data``):

* ``fisher`` — the diagonal empirical Fisher :math:`\frac1N\sum_n \nabla\ell_n\odot\nabla\ell_n` with
  :math:`\ell_n` the answer NLL of sequence :math:`n` (one backward per sequence);
* ``gnb`` (default) — the Gauss-Newton-Bartlett estimate :math:`B\,\hat g\odot\hat g` with :math:`B` the
  batch's loss-bearing tokens, exactly Sophia's per-token scaling (labels sampled from the model, see
  :mod:`soul.optim.hessian`), averaged over batches (one backward per batch): the Gauss-Newton diagonal of
  the mean per-token loss, the same curvature :math:`L_{\text{forget}}` is measured in;
* ``kfac`` / ``ekfac`` — the Kronecker-factored Gauss-Newton (true Fisher) of the mean per-token loss,
  :func:`soul.optim.kfac.fit_kfac` (``kfac_fisher`` labels, ``kfac_samples`` draws, ``kfac_modules``): one
  Kronecker block per attention/MLP projection, the GNB diagonal of the same draws for every other trainable
  parameter (embedding, norms); the step is ``KroneckerCurvature.inverse_apply``. Its curvature is always
  the mean per-token NLL's, whatever ``loss_fn`` is.

A large curvature on the retain data damps the step in the directions the retain set relies on, which is
why the update raises the forget loss more than the retain loss.

Damping relative to the curvature. The damping is set as a fraction :math:`r` of the mean curvature
(``damping_relative``, default 0.1), so the same setting means the same thing on every model and data size:
for a diagonal, :math:`\lambda = r\,\bar h` with :math:`\bar h = \frac1d\sum_i H_{ii}` over all the updated
parameters; for K-FAC / EK-FAC **per block**, :math:`\lambda_b = r\,\bar D_b` with :math:`\bar D_b` the
block's mean eigenvalue (and per tensor for its diagonal part; see :mod:`soul.optim.kfac`). An absolute
:math:`\lambda` far above the curvature (e.g. :math:`10^{-3}` against a GNB mean of :math:`\approx
3\cdot10^{-5}` on SmolLM2-135M) makes :math:`(C+\lambda I)^{-1} \approx 1/\lambda` everywhere: the "Newton"
step is then plain gradient ascent with step :math:`\alpha/\lambda`. ``damping`` still takes an absolute
:math:`\lambda` (the same for every block). :math:`\alpha` = 1 is the full damped Newton step; the step is
bounded by :math:`\alpha|g|/\lambda` where the curvature vanishes.

Diagnostics (``diagnostics=True``, the default; one more backward over the retain batches, one forward over
the forget and retain batches after the step, and for ``fisher``/``kfac``/``ekfac`` one GNB pass over the
curvature batches):

* ``cosine_with_ascent`` — cosine between :math:`\Delta` and :math:`\nabla L_{\text{forget}}` (1: plain
  ascent; lower: a step re-weighted by the curvature);
* ``cosine_with_diagonal`` — cosine between :math:`\Delta` and the diagonal-Newton GNB step
  :math:`\alpha(H_{\text{gnb}}+\lambda')^{-1}\nabla L_{\text{forget}}` on the same curvature batches with the
  same damping rule (:math:`\lambda' = \lambda` when absolute, :math:`r\,\bar h_{\text{gnb}}` when relative);
  exactly 1 for ``gnb`` (it *is* that step);
* ``step_norm`` :math:`\|\Delta\|_2`;
* the quadratic model's predicted loss changes, with :math:`C` the **undamped curvature the step used**
  (estimated on ``hessian_data``, the mean per-token loss's Gauss-Newton for ``gnb``/``kfac``/``ekfac``, the
  per-sequence empirical Fisher for ``fisher``) — the same :math:`C` for both losses, since no other
  curvature is computed:

  .. math::

      \widehat{\Delta L}_{\text{forget}} = g_f^\top\Delta + \tfrac12\Delta^\top C\Delta, \qquad
      \widehat{\Delta L}_{\text{retain}} = g_r^\top\Delta + \tfrac12\Delta^\top C\Delta,

  :math:`g_f, g_r` the gradients of the mean forget / retain loss (``loss_fn`` averaged over the batches
  passed) at :math:`\theta` (``predicted_*_change``; ``first_order_*_change`` the linear terms,
  ``quadratic_term`` :math:`\frac12\Delta^\top C\Delta`), next to the **measured** change
  (``measured_*_change``: the same mean loss on the same batches after the step minus before). Where they
  agree, the Newton model held over the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from soul.losses import answer_nll
from soul.optim.hessian import gnb_backward, loss_bearing_tokens

Batch = dict[str, Any]
DIAGONAL_HESSIANS = ("fisher", "gnb")
KRONECKER_HESSIANS = ("kfac", "ekfac")
HESSIANS = DIAGONAL_HESSIANS + KRONECKER_HESSIANS
HESSIAN_DATA = ("retain", "forget", "both")
KFAC_FISHERS = ("mc", "empirical", "exact")


def _rows(batch: Batch) -> Iterable[Batch]:
    """Split a batch into single-sequence batches (only rows with at least one answer token)."""
    size = batch["input_ids"].shape[0]
    for i in range(size):
        row = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v)
               for k, v in batch.items() if k != "refusal"}
        if loss_bearing_tokens(row) > 0:
            yield row


def _grads(params: Sequence[torch.Tensor], promote: bool = False) -> list[torch.Tensor]:
    # float32 for the diagonal estimators (as they always were); promote: at least float32, so a float64
    # model keeps float64 gradients on the K-FAC path (its factors are float64 there too).
    def dtype(p: torch.Tensor) -> torch.dtype:
        return torch.promote_types(p.dtype, torch.float32) if promote else torch.float32

    return [p.grad.detach().to(dtype(p)) if p.grad is not None else torch.zeros_like(p, dtype=dtype(p))
            for p in params]


def _zero(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def _fisher_diag(model: torch.nn.Module, batches: Sequence[Batch], params: Sequence[torch.Tensor],
                 loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in batches:
        for row in _rows(batch):
            _zero(params)
            loss_fn(model, row).backward()
            for t, g in zip(total, _grads(params)):
                t.addcmul_(g, g)
            count += 1
    return total, count


def _gnb_diag(model: torch.nn.Module, batches: Sequence[Batch], params: Sequence[torch.Tensor],
              generator: torch.Generator | None) -> tuple[list[torch.Tensor], int]:
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in batches:
        _zero(params)
        tokens = gnb_backward(model, batch, generator=generator)
        for t, g in zip(total, _grads(params)):
            t.addcmul_(g, g, value=float(tokens))
        count += 1
    return total, count


def _mean_loss_grad(model: torch.nn.Module, batches: Sequence[Batch], params: Sequence[torch.Tensor],
                    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
                    promote: bool = False) -> tuple[float, list[torch.Tensor]]:
    """The mean of ``loss_fn`` over `batches` and its gradient (``.grad`` is left holding it)."""
    _zero(params)
    total = 0.0
    for batch in batches:
        loss = loss_fn(model, batch) / len(batches)
        loss.backward()
        total += float(loss.detach())
    return total, _grads(params, promote)


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, batches: Sequence[Batch],
               loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor]) -> float:
    return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b)))


def _cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    na, nb = _dot(a, a), _dot(b, b)
    return _dot(a, b) / (na**0.5 * nb**0.5) if na > 0 and nb > 0 else float("nan")


def _diag_damping(h_mean: float, damping: float | None, damping_relative: float | None) -> float:
    if damping is not None:
        return damping
    if not h_mean > 0:
        raise ValueError("influence_unlearn: the curvature estimate is zero everywhere, so a damping "
                         "relative to it is zero too; give an absolute damping")
    assert damping_relative is not None
    return damping_relative * h_mean


def _diag_mean(diag: Sequence[torch.Tensor]) -> float:
    return float(sum(float(h.double().sum()) for h in diag) / sum(h.numel() for h in diag))


DEFAULT_DAMPING_RELATIVE = 0.1


def check_influence_options(*, alpha: Any = 1.0, damping: Any = None, damping_relative: Any = None,
                            hessian: Any = "gnb", hessian_data: Any = "retain", kfac_fisher: Any = "mc",
                            kfac_samples: Any = 1, where: str = "influence_unlearn") -> None:
    """Raise a one-line `ValueError` for the first bad option of :func:`influence_unlearn` (no model needed:
    the command line calls it before it loads anything)."""
    if hessian not in HESSIANS:
        raise ValueError(f"{where}: hessian must be one of {list(HESSIANS)}, got {hessian!r}")
    if hessian_data not in HESSIAN_DATA:
        raise ValueError(f"{where}: hessian_data must be one of {list(HESSIAN_DATA)}, got {hessian_data!r}")
    if kfac_fisher not in KFAC_FISHERS:
        raise ValueError(f"{where}: kfac_fisher must be one of {list(KFAC_FISHERS)}, got {kfac_fisher!r}")
    if isinstance(kfac_samples, bool) or not isinstance(kfac_samples, int) or kfac_samples < 1:
        raise ValueError(f"{where}: kfac_samples must be an integer >= 1, got {kfac_samples!r}")
    for name, value in (("alpha", alpha), ("damping", damping), ("damping_relative", damping_relative)):
        if value is None and name != "alpha":
            continue
        finite = isinstance(value, int | float) and not isinstance(value, bool) and value == value \
            and abs(value) != float("inf")
        if not finite or not value > 0:
            why = {"alpha": "the step size", "damping": "it keeps H + damping invertible",
                   "damping_relative": "a fraction of the mean curvature"}[name]
            raise ValueError(f"{where}: {name} must be > 0 ({why}), got {value}")
    if damping is not None and damping_relative is not None:
        raise ValueError(f"{where}: give either damping (absolute) or damping_relative (a fraction of "
                         f"the mean curvature), not both; got damping={damping}, damping_relative={damping_relative}")


def influence_unlearn(
    model: torch.nn.Module,
    forget_batches: Sequence[Batch],
    retain_batches: Sequence[Batch],
    *,
    alpha: float = 1.0,
    damping: float | None = None,
    damping_relative: float | None = None,
    hessian: str = "gnb",
    hessian_data: str = "retain",
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = answer_nll,
    params: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    kfac_fisher: str = "mc",
    kfac_samples: int = 1,
    kfac_modules: Sequence[str] | None = None,
    diagnostics: bool = True,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Apply one damped Newton *ascent* step on the forget loss, in place (module docstring).

    Args:
        forget_batches / retain_batches: tokenised batches (labels -100 where no loss is taken).
        alpha: step size :math:`\\alpha` (1 = the full damped Newton step).
        damping_relative: :math:`\\lambda` as a fraction of the mean curvature (the diagonal's mean, or per
            Kronecker block; default 0.1 when neither damping is given).
        damping: an absolute :math:`\\lambda` > 0 instead (give one of the two).
        hessian: ``gnb`` (default), ``fisher`` (diagonals), ``kfac`` or ``ekfac`` (Kronecker-factored).
            hessian_data: estimate it on ``retain``, ``forget`` or ``both``.
        kfac_fisher / kfac_samples / kfac_modules: ``fit_kfac``'s ``fisher``, ``mc_samples`` and ``modules``.
        params: the parameters to update (default: every parameter that requires grad; with K-FAC a covered
            module's weight and bias together).
        generator: the label draws of ``gnb`` / ``kfac`` / ``ekfac`` (on the model's device).
        diagnostics: compute the retain gradient, the GNB comparison step and the measured loss changes.

    Returns ``(model, stats)`` with ``forget_loss`` (before the update), ``grad_norm``, ``step_norm``
    (:math:`\\|\\Delta\\|`), ``h_mean`` (mean diagonal of :math:`C`: :math:`\\mathrm{tr}\\,C/d`),
    ``h_examples`` (sequences for fisher, batches for gnb, loss tokens for K-FAC), ``damping_absolute``
    (the :math:`\\lambda` used; NaN for K-FAC's per-block relative damping), ``damping_relative``
    (:math:`\\lambda/\\bar h`, or the ``r`` given for K-FAC), ``cosine_with_ascent``, ``curvature_seconds``,
    ``curvature_nbytes``; with ``diagnostics`` also ``cosine_with_diagonal``, ``retain_loss``,
    ``forget_loss_after``, ``retain_loss_after``, ``first_order_forget_change``,
    ``first_order_retain_change``, ``quadratic_term``, ``predicted_forget_change``,
    ``predicted_retain_change``, ``measured_forget_change``, ``measured_retain_change`` (retain entries NaN
    without retain batches). ``.grad`` is left as found.
    """
    check_influence_options(alpha=alpha, damping=damping, damping_relative=damping_relative, hessian=hessian,
                            hessian_data=hessian_data, kfac_fisher=kfac_fisher, kfac_samples=kfac_samples)
    relative = damping_relative
    if damping is None and damping_relative is None:
        damping_relative = relative = DEFAULT_DAMPING_RELATIVE
    forget_batches, retain_batches = list(forget_batches), list(retain_batches)
    if not forget_batches:
        raise ValueError("influence_unlearn: no forget batches")
    curvature_batches = {"retain": retain_batches, "forget": forget_batches,
                         "both": retain_batches + forget_batches}[hessian_data]
    if not curvature_batches:
        raise ValueError(f"influence_unlearn: no batches to estimate the Hessian on (hessian_data={hessian_data!r})")
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    kronecker = hessian in KRONECKER_HESSIANS
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: a deterministic gradient and curvature
    extra: dict[str, float] = {}
    try:
        forget_loss, grad = _mean_loss_grad(model, forget_batches, params, loss_fn, promote=kronecker)
        grad_sq = _dot(grad, grad)
        retain_loss = float("nan")
        retain_grad = None
        if diagnostics and retain_batches:  # at theta, before the step; draws no random labels
            retain_loss, retain_grad = _mean_loss_grad(model, retain_batches, params, loss_fn, promote=kronecker)
        t0 = time.perf_counter()
        if kronecker:
            steps, quad, h_mean, count, damping_abs, nbytes = _kronecker_step(
                model, curvature_batches, params, grad, alpha, damping, damping_relative, hessian, kfac_fisher,
                kfac_samples, kfac_modules, generator)
            seconds = time.perf_counter() - t0
        else:
            if hessian == "fisher":
                diag, count = _fisher_diag(model, curvature_batches, params, loss_fn)
            else:
                diag, count = _gnb_diag(model, curvature_batches, params, generator)
            seconds = time.perf_counter() - t0
            if count == 0:
                raise ValueError("influence_unlearn: the curvature batches have no answer tokens")
            nbytes = sum(h.numel() * h.element_size() for h in diag)
            with torch.no_grad():
                for h in diag:
                    h.div_(count)
                h_mean = _diag_mean(diag)
                damping_abs = _diag_damping(h_mean, damping, damping_relative)
                steps, quad = [], 0.0
                for i, g in enumerate(grad):
                    h = diag[i]
                    step = (h + damping_abs).reciprocal_().mul_(g).mul_(alpha)  # alpha * g / (H + lambda)
                    if diagnostics:
                        quad += 0.5 * float((h.double() * step.double() ** 2).sum())
                    diag[i] = None  # type: ignore[call-overload]  # free H as the step takes its place
                    steps.append(step)
        if diagnostics:
            if hessian == "gnb":
                cos_diag = 1.0  # the step is the GNB diagonal-Newton step itself
            else:  # the GNB step on the same batches and damping rule, at theta (before the update)
                gnb, gnb_count = _gnb_diag(model, curvature_batches, params, generator)
                with torch.no_grad():
                    for h in gnb:
                        h.div_(max(gnb_count, 1))
                    lam = damping if damping is not None else relative * _diag_mean(gnb)  # type: ignore[operator]
                    gnb_steps = [(h + lam).reciprocal_().mul_(g.float()).mul_(alpha) if lam > 0 else
                                 torch.full_like(h, float("nan")) for h, g in zip(gnb, grad)]
                cos_diag = _cosine(steps, gnb_steps)
                del gnb, gnb_steps
            extra["cosine_with_diagonal"] = cos_diag
        with torch.no_grad():
            for p, step in zip(params, steps):
                p.add_(step.to(p.dtype))
        step_sq = _dot(steps, steps)
        dot = _dot(steps, grad)
        if diagnostics:
            forget_after = _mean_loss(model, forget_batches, loss_fn)
            retain_after = _mean_loss(model, retain_batches, loss_fn) if retain_batches else float("nan")
            first_r = _dot(retain_grad, steps) if retain_grad is not None else float("nan")
            extra.update({"retain_loss": retain_loss, "forget_loss_after": forget_after,
                          "retain_loss_after": retain_after, "first_order_forget_change": dot,
                          "first_order_retain_change": first_r, "quadratic_term": quad,
                          "predicted_forget_change": dot + quad, "predicted_retain_change": first_r + quad,
                          "measured_forget_change": forget_after - forget_loss,
                          "measured_retain_change": retain_after - retain_loss})
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)
    cosine = dot / (step_sq**0.5 * grad_sq**0.5) if step_sq > 0 and grad_sq > 0 else float("nan")
    if kronecker:
        rel = float(damping_relative) if damping_relative is not None else float("nan")
    else:
        rel = float(damping_abs) / h_mean if h_mean > 0 else float("nan")
    stats = {"forget_loss": forget_loss, "grad_norm": grad_sq**0.5, "step_norm": step_sq**0.5,
             "h_mean": h_mean, "h_examples": float(count), "damping_absolute": float(damping_abs),
             "damping_relative": rel, "cosine_with_ascent": cosine, "curvature_seconds": seconds,
             "curvature_nbytes": float(nbytes), **extra}
    return model, stats


def _kronecker_step(model: torch.nn.Module, batches: Sequence[Batch], params: Sequence[torch.Tensor],
                    grad: Sequence[torch.Tensor], alpha: float, damping: float | None,
                    damping_relative: float | None, kind: str, fisher: str, samples: int,
                    modules: Sequence[str] | None, generator: torch.Generator | None
                    ) -> tuple[list[torch.Tensor], float, float, int, float, int]:
    """(steps, ½ΔᵀCΔ, tr C / d, loss tokens, λ or NaN, curvature bytes) for K-FAC / EK-FAC."""
    from soul.optim.kfac import fit_kfac

    curv = fit_kfac(model, batches, kind=kind, fisher=fisher, mc_samples=samples, generator=generator,
                    modules=modules)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for p in params]
    inverse = curv.inverse_apply(dict(zip(names, grad)), damping=damping,
                                 damping_relative=None if damping is not None else damping_relative)
    steps = [inverse[n].mul_(alpha) for n in names]
    cv = curv.apply(dict(zip(names, steps)))
    quad = 0.5 * _dot([cv[n] for n in names], steps)
    # tr C over the updated parameters: tr(G ⊗ A) = tr G · tr A per K-FAC block, Σ S for EK-FAC, Σ h else
    chosen, trace, numel = set(names), 0.0, 0
    for block in curv.blocks.values():
        if block.weight in chosen:
            d = block.eigenvalues(kind)
            trace += float(d.double().sum())
            numel += d.numel()
    for n, h in curv.diag.items():
        if n in chosen:
            trace += float(h.double().sum())
            numel += h.numel()
    return steps, quad, trace / max(numel, 1), curv.tokens, float(damping) if damping is not None else float("nan"), \
        curv.nbytes()
