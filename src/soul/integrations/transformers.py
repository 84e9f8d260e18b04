"""Sophia inside `transformers.Trainer`: a callback that runs soul's Hessian estimate on Sophia's schedule.

    from soul.integrations.transformers import SophiaHessianCallback
    from soul.optim import SophiaG

    optimizer = SophiaG(model.parameters(), lr=1e-5, hessian_interval=10, estimator="gnb")
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                      optimizers=(optimizer, None), callbacks=[SophiaHessianCallback()])
    trainer.train()

How it fits the Trainer's step: a forward pre-hook on the model records each training micro-batch of the
current optimizer step (``input_ids``, ``attention_mask``, ``labels`` as they reach ``model.forward``). In
``on_pre_optimizer_step`` — after every micro-batch's backward and the gradient clipping, before
``optimizer.step()`` — when ``optimizer.hessian_due()`` the callback calls
`soul.optim.estimate_hessian` on those micro-batches (the step's global batch on this process, as soul's own
loop does with ``hessian_batch="forget"``). The estimate puts the accumulated gradients back afterwards, so
the clipped step is unchanged; the weights have not moved since the micro-batches' forward passes, so the
estimate is the one soul's loop makes before its forward passes.

The labels must reach ``model.forward``: that is the Trainer's default (the model computes the loss). A
Trainer that pops them first (``compute_loss_func``, label smoothing, a ``compute_loss`` of its own) should
mix in `SophiaTrainerMixin`, which hands each micro-batch to the callback before ``training_step``.

Matching soul's own loop (checked in tests/integrations): the same weights after N steps need the same data
order (``train_sampling_strategy="sequential"`` over the examples in soul's order, `soul_order`), the same
schedule (soul: ``lr·(s+1)/W`` during warm-up, ``"linear"`` in transformers: ``lr·s/W``; they agree for
``warmup_steps=0``), the same parameter groups (`soul.train.loop.param_groups`), the same Hessian random draws
(pass both the same ``generator``) and the same loss: soul's fine-tuning loss is the mean over sequences of
each sequence's mean answer-token NLL, the Trainer's default is the mean over all answer tokens of the
accumulated batch — equal when each micro-batch holds one sequence and ``gradient_accumulation_steps=1``, or
when every answer has the same number of tokens; otherwise use `soul_loss` as ``compute_loss_func`` with
`SophiaTrainer` (or the mixin) and ``trainer.loss_is_scaled_for_ga = False``. With `soul_loss` the two
stacks do the same arithmetic: float64 runs end with identical weights. The Trainer's default loss sums the
answer tokens and divides by their count where soul averages per sequence, so in float32 the gradients differ in
the last bits, which Sophia's ratio m / (rho·h) magnifies where h is near zero (measured: every weight within
1 % of one step, all but 0.1 % within 1e-6).

accelerate's state (`AcceleratorState`, `GradientState`) is process-wide; the Trainer configures it for its own
run, so run soul's loop and a Trainer in separate processes (or reset that state between them, as the tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def sophia_of(optimizer: Any) -> Any:
    """The Sophia optimizer behind the Trainer's optimizer (accelerate wraps it); TypeError for any other."""
    inner = optimizer
    for _ in range(4):  # AcceleratedOptimizer (.optimizer), possibly nested
        if hasattr(inner, "hessian_due") and hasattr(inner, "update_hessian"):
            return inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
    raise TypeError(f"SophiaHessianCallback needs a Sophia optimizer (soul.optim.SophiaG) passed as "
                    f"Trainer(optimizers=(SophiaG(...), None)), got {type(optimizer).__name__}")


class SophiaHessianCallback(TrainerCallback):
    """Estimate the diagonal Hessian for `soul.optim.SophiaG` whenever it is due (see the module docstring).

    Args:
        estimator: ``gnb`` | ``hutchinson``; default: the optimizer's own ``estimator``.
        loss_fn: the loss Hutchinson differentiates, ``loss_fn(model, batch)`` (default `soul.losses.answer_nll`).
        generator: the random source of the estimate's samples (GNB's sampled labels, Hutchinson's signs);
            default: torch's global generator.
    """

    def __init__(self, estimator: str | None = None, loss_fn: Callable | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.estimator, self.loss_fn, self.generator = estimator, loss_fn, generator
        self.hessian_updates = 0
        self._batches: list[dict[str, torch.Tensor]] = []
        self._explicit = False
        self._estimating = False
        self._handle = None

    # -- recording the step's micro-batches ----------------------------------------------------------------
    def record_batch(self, inputs: dict[str, Any]) -> None:
        """Record one micro-batch explicitly (`SophiaTrainerMixin`); the forward hook then stands aside."""
        self._explicit = True
        self._batches.append(self._batch(inputs))

    @staticmethod
    def _batch(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, labels = inputs.get("input_ids"), inputs.get("labels")
        if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError("SophiaHessianCallback: a training batch without input_ids/labels tensors reached the "
                             "model; the Hessian estimate needs both (labels -100 where no loss is taken). If your "
                             "Trainer pops the labels, use SophiaTrainerMixin")
        mask = inputs.get("attention_mask")
        return {"input_ids": ids.detach(), "labels": labels.detach(),
                "attention_mask": mask.detach() if isinstance(mask, torch.Tensor) else torch.ones_like(ids)}

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._estimating or self._explicit or not module.training or not torch.is_grad_enabled():
            return
        inputs = dict(kwargs)
        if args and "input_ids" not in inputs:
            inputs["input_ids"] = args[0]
        self._batches.append(self._batch(inputs))

    # -- Trainer events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sophia_of(optimizer)  # fail before the first step
        if self._handle is None and model is not None:
            self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._batches, self._explicit = [], False

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        from soul.optim import estimate_hessian

        sophia = sophia_of(optimizer)
        if sophia.hessian_due():
            if not self._batches:
                raise RuntimeError("SophiaHessianCallback: the Hessian is due but no training batch was recorded "
                                   "this step (did the model's forward run with labels?)")
            self._estimating = True
            try:
                estimate_hessian(model, self._batches, sophia, estimator=self.estimator, loss_fn=self.loss_fn,
                                 generator=self.generator)
            finally:
                self._estimating = False
            self.hessian_updates += 1
        self._batches, self._explicit = [], False

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SophiaTrainerMixin:
    """Hands every micro-batch (with its labels) to the `SophiaHessianCallback` before ``training_step``, for
    Trainers whose loss pops the labels before ``model.forward``::

        class MyTrainer(SophiaTrainerMixin, Trainer): ...
    """

    def training_step(self, model, inputs, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SophiaHessianCallback):
                callback.record_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


class SophiaTrainer(SophiaTrainerMixin, Trainer):
    """`transformers.Trainer` with `SophiaTrainerMixin`."""


def soul_loss(outputs, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """soul's fine-tuning loss as a Trainer ``compute_loss_func``: the mean over sequences of each sequence's
    mean answer-token NLL (labels shifted by one, -100 ignored), i.e. `soul.losses.answer_nll`.

    The Trainer takes a ``compute_loss_func`` loss as already scaled for gradient accumulation; soul's loop
    averages the micro-batch losses of a step, (1/G) Σ_g L_g, so set ``trainer.loss_is_scaled_for_ga = False``
    (the Trainer then divides by G itself). `num_items_in_batch` is not used."""
    from soul.losses import sequence_nll

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    return sequence_nll(logits, labels).mean()


def soul_order(n: int, batch_size: int, steps: int, *, seed: int, grad_accum: int = 1) -> list[int]:
    """The record indices soul's loop (one process) trains on, in order, for `steps` optimizer steps: hand
    ``[records[i] for i in soul_order(...)]`` to a Trainer with ``train_sampling_strategy="sequential"``."""
    from soul.train.loop import epoch_batches

    micro = steps * grad_accum
    order: list[int] = []
    epoch = 0
    batches: Sequence[list[int]] = []
    while micro > 0:
        batches = epoch_batches(n, batch_size, seed=seed, epoch=epoch)
        per_epoch = len(batches)
        # soul rounds a partial last group up to a whole step: ceil(per_epoch / grad_accum) steps per epoch
        take = batches[:micro]
        for b in take:
            if len(b) != batch_size:
                raise ValueError(f"{n} records do not fill batches of {batch_size}: the Trainer would batch "
                                 "across soul's epoch boundary; choose n divisible by batch_size")
            order.extend(b)
        micro -= len(take)
        if per_epoch % grad_accum:
            raise ValueError("soul's epoch does not split into whole accumulation groups; choose other sizes")
        epoch += 1
    return order
