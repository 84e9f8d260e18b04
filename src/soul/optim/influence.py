r"""One-shot influence (Newton) unlearning: the static update that SOUL makes iterative.

.. math::

    \theta \leftarrow \theta + \alpha\,(H + \lambda I)^{-1}\,\nabla_\theta L_{\text{forget}}(\theta)

:math:`L_{\text{forget}}` is :func:`soul.losses.answer_nll` averaged over the forget batches, :math:`H` a
diagonal curvature estimate accumulated over the retain batches (and/or the forget batches):

* ``fisher`` — the diagonal empirical Fisher :math:`\frac1N\sum_n \nabla\ell_n\odot\nabla\ell_n` with
  :math:`\ell_n` the answer NLL of sequence :math:`n` (one backward per sequence);
* ``gnb`` (default) — the Gauss-Newton-Bartlett estimate :math:`B\,\hat g\odot\hat g` with :math:`B` the
  batch's loss-bearing tokens, exactly Sophia's per-token scaling (labels sampled from the model, see
  :mod:`soul.optim.hessian`), averaged over batches (one backward per batch): the Gauss-Newton diagonal of
  the mean per-token loss, the same curvature :math:`L_{\text{forget}}` is measured in.

A large curvature on the retain data damps the step in the coordinates the retain set relies on, which is
why the update raises the forget loss more than the retain loss.

Damping relative to the curvature. The damping is set as a fraction :math:`r` of the mean diagonal,
:math:`\lambda = r\,\bar h` with :math:`\bar h = \frac1d\sum_i H_{ii}` (``damping_relative``, default 0.1), so
the same setting means the same thing on every model and data size. An absolute :math:`\lambda` far above
the diagonal (e.g. :math:`10^{-3}` against a GNB mean of :math:`\approx 3\cdot10^{-5}` on SmolLM2-135M)
makes :math:`(H+\lambda I)^{-1} \approx 1/\lambda` everywhere: the "Newton" step is then plain gradient
ascent with step :math:`\alpha/\lambda`. ``damping`` still takes an absolute :math:`\lambda`. The returned
``cosine_with_ascent`` (cosine between the step and :math:`\nabla L_{\text{forget}}`) shows how much the
curvature turned the step: 1 is plain ascent, lower values a step re-weighted by :math:`H`.
:math:`\alpha` = 1 is the full damped Newton step; the step is bounded by :math:`\alpha|g|/\lambda` where
the curvature vanishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from soul.losses import answer_nll
from soul.optim.hessian import gnb_backward, loss_bearing_tokens

Batch = dict[str, Any]
HESSIANS = ("fisher", "gnb")
HESSIAN_DATA = ("retain", "forget", "both")


def _rows(batch: Batch) -> Iterable[Batch]:
    """Split a batch into single-sequence batches (only rows with at least one answer token)."""
    size = batch["input_ids"].shape[0]
    for i in range(size):
        row = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v)
               for k, v in batch.items() if k != "refusal"}
        if loss_bearing_tokens(row) > 0:
            yield row


def _grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
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


DEFAULT_DAMPING_RELATIVE = 0.1


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
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Apply one damped diagonal-Newton *ascent* step on the forget loss, in place.

    Args:
        forget_batches / retain_batches: tokenised batches (labels -100 where no loss is taken).
        alpha: step size :math:`\\alpha` (1 = the full damped Newton step).
        damping_relative: :math:`\\lambda` as a fraction of the mean curvature,
            :math:`\\lambda = r\\,\\bar h` (default 0.1 when neither damping is given).
        damping: an absolute :math:`\\lambda` > 0 instead (give one of the two).
        hessian: ``gnb`` (default) or ``fisher``. hessian_data: accumulate it over ``retain``, ``forget``
            or ``both``.
        params: the parameters to update (default: every parameter that requires grad).

    Returns ``(model, stats)`` with ``forget_loss`` (before the update), ``grad_norm``, ``step_norm``,
    ``h_mean`` (:math:`\\bar h`), ``h_examples`` (sequences for fisher, batches for gnb),
    ``damping_absolute`` (the :math:`\\lambda` used), ``damping_relative`` (:math:`\\lambda/\\bar h`) and
    ``cosine_with_ascent`` (cosine between the step and :math:`\\nabla L_{\\text{forget}}`). ``.grad`` is
    left as found.
    """
    if hessian not in HESSIANS:
        raise ValueError(f"influence_unlearn: hessian must be one of {list(HESSIANS)}, got {hessian!r}")
    if hessian_data not in HESSIAN_DATA:
        raise ValueError(f"influence_unlearn: hessian_data must be one of {list(HESSIAN_DATA)}, got {hessian_data!r}")
    if damping is not None and damping_relative is not None:
        raise ValueError("influence_unlearn: give either damping (absolute) or damping_relative (a fraction of "
                         f"the mean curvature), not both; got damping={damping}, damping_relative={damping_relative}")
    if damping is not None and not damping > 0:
        raise ValueError(f"influence_unlearn: damping must be > 0 (it keeps H + damping invertible), got {damping}")
    if damping_relative is not None and not damping_relative > 0:
        raise ValueError(f"influence_unlearn: damping_relative must be > 0 (a fraction of the mean curvature), "
                         f"got {damping_relative}")
    if damping is None and damping_relative is None:
        damping_relative = DEFAULT_DAMPING_RELATIVE
    forget_batches, retain_batches = list(forget_batches), list(retain_batches)
    if not forget_batches:
        raise ValueError("influence_unlearn: no forget batches")
    curvature_batches = {"retain": retain_batches, "forget": forget_batches,
                         "both": retain_batches + forget_batches}[hessian_data]
    if not curvature_batches:
        raise ValueError(f"influence_unlearn: no batches to estimate the Hessian on (hessian_data={hessian_data!r})")
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: a deterministic gradient and curvature
    try:
        _zero(params)
        forget_loss = 0.0
        for batch in forget_batches:
            loss = loss_fn(model, batch) / len(forget_batches)
            loss.backward()
            forget_loss += float(loss.detach())
        grad = _grads(params)
        grad_sq = float(sum(float((g.double() ** 2).sum()) for g in grad))
        if hessian == "fisher":
            diag, count = _fisher_diag(model, curvature_batches, params, loss_fn)
        else:
            diag, count = _gnb_diag(model, curvature_batches, params, generator)
        if count == 0:
            raise ValueError("influence_unlearn: the curvature batches have no answer tokens")
        with torch.no_grad():
            for h in diag:
                h.div_(count)
            h_mean = float(sum(float(h.double().sum()) for h in diag) / sum(h.numel() for h in diag))
            if damping is None:
                if not h_mean > 0:
                    raise ValueError("influence_unlearn: the curvature estimate is zero everywhere, so a damping "
                                     "relative to it is zero too; give an absolute damping")
                damping = damping_relative * h_mean
            step_sq = dot = 0.0
            for p, g, h in zip(params, grad, diag):
                step = h.add_(damping).reciprocal_().mul_(g).mul_(alpha)  # alpha * g / (H + lambda), in place
                p.add_(step.to(p.dtype))
                step_sq += float((step.double() ** 2).sum())
                dot += float((step.double() * g.double()).sum())
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)
    cosine = dot / (step_sq**0.5 * grad_sq**0.5) if step_sq > 0 and grad_sq > 0 else float("nan")
    stats = {"forget_loss": forget_loss, "grad_norm": grad_sq**0.5, "step_norm": step_sq**0.5,
             "h_mean": h_mean, "h_examples": float(count), "damping_absolute": float(damping),
             "damping_relative": float(damping) / h_mean if h_mean > 0 else float("nan"),
             "cosine_with_ascent": cosine}
    return model, stats
