r"""Diagonal-Hessian estimators for Sophia, and `estimate_hessian`, the call a training loop makes.

``gnb`` — Gauss-Newton-Bartlett. At every loss-bearing position :math:`i` (label != -100, after the causal
shift) sample :math:`\hat y_i \sim \mathrm{softmax}(z_i)` from the model's own prediction, back-propagate
the mean cross-entropy of the sampled labels over the :math:`B` loss-bearing tokens of the *global* batch
(all micro-batches, all data-parallel processes) and use :math:`\hat h = B\,\hat g\odot\hat g`. By
Bartlett's identity :math:`\mathbb E[\nabla\ell_i\nabla\ell_i^\top] = J_i^\top(\mathrm{diag}\,p_i - p_ip_i^\top)J_i`
and the independent samples make cross-token terms vanish, so :math:`\mathbb E[\hat h]` is the diagonal of
the Gauss-Newton matrix of the mean loss. Only an ordinary backward is needed (works under DDP/FSDP). The
gradient is *not* clipped before squaring (that would shrink :math:`h`). With ``samples=n`` (TrainConfig
``hessian_samples``) the estimate averages :math:`n` independent label draws,
:math:`\hat h = \frac1n\sum_{k=1}^n B\,\hat g_k\odot\hat g_k` (:math:`n` backward passes): the same
expectation, :math:`1/n` of the variance. On small unlearning batches a single draw is noisy enough to
inflate :math:`|\tilde m|/\tilde h` severalfold where the draw happens to give a tiny :math:`\hat g_i`.

``hutchinson`` — :math:`\hat h = u\odot(Hu)` with Rademacher :math:`u\in\{-1,+1\}^d` and :math:`H` the
Hessian of ``loss_fn(model, batch)`` (default: :func:`soul.losses.answer_nll`), via a double backward.
:math:`\mathbb E[u\odot Hu] = \mathrm{diag}\,H` since :math:`\mathbb E[u_iu_j]=\delta_{ij}`. Single
estimates can be negative; the optimizer clamps them at ``eps``. ``samples=n`` averages :math:`n` vectors
:math:`u` (and re-runs the forward pass of each micro-batch once per vector). Needs double backward, which sharded
(FSDP/DTensor) parameters do not provide; the forward runs under the math SDPA kernel because the fused
attention kernels have no double backward.

``gradsq`` — :math:`\hat h = g\odot g` of the training gradients on every step, computed inside
``SophiaG.step()`` (the official SOUL code). Nothing to estimate here.

``kfac`` / ``ekfac`` — not a diagonal: the Kronecker-factored Gauss-Newton of :mod:`soul.optim.kfac`
(``fisher="mc"``, ``samples`` label draws), fitted on the batch and folded into a
:class:`~soul.optim.ksophia.KroneckerSophia` by its ``refresh_curvature``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from soul.losses import IGNORE_INDEX, answer_nll, upcast
from soul.optim._dist import all_reduce_sum, world_size

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def _as_batches(batch: Batch | Sequence[Batch]) -> list[Batch]:
    batches = [batch] if isinstance(batch, dict) else list(batch)
    for i, b in enumerate(batches):
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in b]
        if missing:
            raise KeyError(f"batch {i} for the Hessian estimate lacks {missing}; expected input_ids, "
                           "attention_mask and labels (labels -100 where no loss is taken)")
    return batches


def loss_bearing_tokens(batch: Batch) -> int:
    """Number of positions that carry a loss: labels != -100 after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _sharded(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter"


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def gnb_backward(model: torch.nn.Module, batch: Batch | Sequence[Batch], *,
                 generator: torch.Generator | None = None) -> int:
    """Back-propagate the GNB loss into ``.grad`` and return B, the global number of loss-bearing tokens.

    Each micro-batch contributes ``sum_i CE(z_i, y^_i) * W / B``: the data-parallel wrapper averages gradients
    over the W processes, so the result is the gradient of the mean over all B tokens of the global batch.
    """
    batches = _as_batches(batch)
    device = _model_device(model)
    local = torch.tensor(float(sum(loss_bearing_tokens(b) for b in batches)), device=device)
    total = int(all_reduce_sum(local).item())
    if total == 0:
        raise ValueError("GNB Hessian estimate: the batch has no loss-bearing tokens (all labels are -100)")
    scale = world_size() / total
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        mask = b["labels"][:, 1:].to(device) != IGNORE_INDEX
        selected = upcast(logits[:, :-1, :][mask])
        if selected.numel() == 0:
            # Still backward (a zero): under DDP/FSDP every process must join each gradient reduction.
            (logits.sum() * 0.0).backward()
            continue
        with torch.no_grad():
            probs = torch.softmax(selected, dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        (F.cross_entropy(selected, sampled, reduction="sum") * scale).backward()
    return total


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform over {-1, +1}: randint's upper bound is exclusive, so draw from {0, 1} and map."""
    bits = torch.randint(0, 2, p.shape, generator=generator, device=p.device)
    return (bits * 2 - 1).to(p.dtype)


def hutchinson_diagonal(loss: torch.Tensor, params: Sequence[torch.Tensor], *,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One unbiased sample u ⊙ (H u) of diag(∇²loss) for each parameter (may be negative)."""
    for p in params:
        if _sharded(p):
            raise NotImplementedError(
                "the hutchinson Hessian estimator needs a double backward (Hessian-vector product), which "
                f"sharded parameters ({type(p).__name__}, e.g. FSDP/DTensor) do not support; use estimator='gnb'"
            )
    try:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(p, g, rademacher_like(p, generator)) for p, g in zip(params, grads)
                 if g is not None and g.requires_grad]
        if not pairs:
            raise RuntimeError("the gradient has no graph (no parameter's gradient depends on the parameters)")
        hvps = torch.autograd.grad([g for _, g, _ in pairs], [p for p, _, _ in pairs],
                                   grad_outputs=[u for _, _, u in pairs], allow_unused=True)
    except RuntimeError as err:
        raise RuntimeError(
            "hutchinson Hessian estimate: double backward failed. It is unavailable for sharded parameters "
            "and for some fused kernels (load the model with attn_implementation='eager'); use "
            f"estimator='gnb' otherwise. Original error: {err}"
        ) from err
    by_param = {id(p): (u * hv if hv is not None else torch.zeros_like(p)) for (p, _, u), hv in zip(pairs, hvps)}
    return [by_param.get(id(p), torch.zeros_like(p)).detach() for p in params]


class _GradStash:
    """Take `.grad` away from the parameters during an estimate and put it back afterwards."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)

    def __enter__(self) -> _GradStash:
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc: object) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g


def _gnb(model: torch.nn.Module, batch: Batch | Sequence[Batch], optimizer: Any, *,
         loss_fn: LossFn | None, generator: torch.Generator | None, samples: int = 1) -> dict[str, float]:
    if samples == 1:
        tokens = gnb_backward(model, batch, generator=generator)
        optimizer.update_hessian(scale=float(tokens))
        return {"tokens": float(tokens)}
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    sums: dict[torch.Tensor, torch.Tensor] = {}
    tokens = 0
    for _ in range(samples):
        for p in params:
            p.grad = None
        tokens = gnb_backward(model, batch, generator=generator)
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    continue
                g = upcast(p.grad)
                if p in sums:
                    sums[p].addcmul_(g, g)
                else:
                    sums[p] = g * g
    with torch.no_grad():
        estimates = {p: s.mul_(float(tokens) / samples) for p, s in sums.items()}
    optimizer.update_hessian(estimates=estimates)
    return {"tokens": float(tokens), "samples": float(samples)}


def _hutchinson(model: torch.nn.Module, batch: Batch | Sequence[Batch], optimizer: Any, *,
                loss_fn: LossFn | None, generator: torch.Generator | None, samples: int = 1) -> dict[str, float]:
    if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or hasattr(model, "_fsdp_wrapped_module"):
        raise NotImplementedError("the hutchinson estimator needs a double backward, which FSDP does not "
                                  "support; use estimator='gnb'")
    loss_fn = loss_fn or answer_nll
    batches = [batch] if isinstance(batch, dict) else list(batch)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    total: list[torch.Tensor] | None = None
    for _ in range(samples):
        for b in batches:  # micro-batches (and samples): average the per-batch HVP estimates
            # The fused SDPA kernels have no double backward; the math kernel is plain differentiable ops.
            with sdpa_kernel([SDPBackend.MATH]):
                loss = loss_fn(model, b)
            diag = hutchinson_diagonal(loss, params, generator=generator)
            total = diag if total is None else [t + d for t, d in zip(total, diag)]
    assert total is not None
    estimates = {p: d / (len(batches) * samples) for p, d in zip(params, total)}
    optimizer.update_hessian(estimates=estimates)
    return {"tokens": float(sum(loss_bearing_tokens(b) for b in batches if "labels" in b))}


def _kronecker(model: torch.nn.Module, batch: Batch | Sequence[Batch], optimizer: Any, *,
               loss_fn: LossFn | None, generator: torch.Generator | None, samples: int = 1) -> dict[str, float]:
    if not hasattr(optimizer, "refresh_curvature"):
        raise TypeError(f"the kfac / ekfac estimators need a KroneckerSophia (build_optimizer('sophia', ..., "
                        f"estimator='kfac')), got {type(optimizer).__name__}")
    return optimizer.refresh_curvature(model, _as_batches(batch), generator=generator, samples=samples)


HESSIAN_ESTIMATORS: dict[str, Callable[..., dict[str, float]]] = {"gnb": _gnb, "hutchinson": _hutchinson,
                                                                   "kfac": _kronecker, "ekfac": _kronecker}


def estimate_hessian(
    model: torch.nn.Module,
    batch: Batch | Sequence[Batch],
    optimizer: Any,
    estimator: str | None = None,
    loss_fn: LossFn | None = None,
    *,
    generator: torch.Generator | None = None,
    samples: int = 1,
) -> dict[str, float]:
    """Estimate the diagonal Hessian on `batch` (a batch or a list of micro-batches) and feed it to `optimizer`.

    ``samples`` independent draws (GNB labels, Hutchinson vectors) are averaged into one estimate.
    ``generator`` (on the model's device) makes the draws reproducible; None uses the global RNG.
    Call it before the step's own forward/backward whenever ``optimizer.hessian_due()``. Gradients present
    in ``.grad`` before the call are put back afterwards (None stays None), so the loop's own backward and
    any gradient accumulation are unaffected. ``estimator`` defaults to the optimizer's ``estimator``.
    Returns ``{"tokens": B}`` (loss-bearing tokens the estimate used on this process or globally for GNB).
    """
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        raise ValueError(f"estimate_hessian: samples (hessian_samples) must be an integer >= 1, got {samples!r}")
    if not hasattr(optimizer, "update_hessian"):
        raise TypeError(f"estimate_hessian needs a SophiaG optimizer, got {type(optimizer).__name__}")
    name = estimator or optimizer.defaults.get("estimator", "gnb")
    kind = getattr(optimizer, "kind", None)  # a KroneckerSophia's factors are of one kind
    if kind is not None and name != kind:
        raise ValueError(f"estimate_hessian: this KroneckerSophia holds {kind} factors; estimator {name!r} "
                         "cannot refresh them")
    if name == "gradsq":
        raise ValueError("estimator 'gradsq' is computed inside SophiaG.step() from the training gradients "
                         "(official SOUL behaviour); there is nothing to estimate beforehand")
    if name not in HESSIAN_ESTIMATORS:
        raise ValueError(f"unknown Hessian estimator {name!r}; expected one of {sorted(HESSIAN_ESTIMATORS)} "
                         "or 'gradsq'")
    was_training = model.training
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    seen.update({id(p): p for g in optimizer.param_groups for p in g["params"]})
    with _GradStash(list(seen.values())):
        try:
            return HESSIAN_ESTIMATORS[name](model, batch, optimizer, loss_fn=loss_fn, generator=generator,
                                            samples=samples)
        finally:
            model.train(was_training)
