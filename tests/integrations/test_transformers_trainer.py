"""Sophia inside `transformers.Trainer` (SophiaHessianCallback) ends with the weights of soul's own loop."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

import soul.optim
from soul.data.format import QACollator
from soul.integrations.transformers import (
    SophiaHessianCallback,
    SophiaTrainer,
    sophia_of,
    soul_loss,
    soul_order,
)
from soul.optim import SophiaG
from soul.testing import tiny_model
from soul.train import finetune, make_config
from soul.train.loop import encode_records, param_groups

NAMES = ["Ada", "Bo", "Cyrilla", "Dee", "Evangeline", "Flo", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "teal", "navy"]
# Answers of different lengths, so a token mean and a sequence mean differ.
FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes {c}" + " very much" * (i % 3) + "."}
         for i, (n, c) in enumerate(zip(NAMES, COLOURS))]
HESSIAN_SEED = 1234


def fresh_accelerate_state() -> None:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState) that the Trainer configures
    for its own run; each run here starts from a clean state, as it would in its own process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def soul_weights(monkeypatch, dtype=torch.float32, **settings) -> dict[str, torch.Tensor]:
    fresh_accelerate_state()
    real = soul.optim.estimate_hessian
    generator = torch.Generator().manual_seed(HESSIAN_SEED)
    # The loop draws the estimate's samples from torch's global generator; give it the callback's stream.
    monkeypatch.setattr(soul.optim, "estimate_hessian",
                        lambda *a, **k: real(*a, **{**k, "generator": generator}))
    model, tok = tiny_model("llama", seed=3)
    trained, record = finetune(model.to(dtype), tok, data={"full": FACTS}, split="full", progress=False, **settings)
    monkeypatch.setattr(soul.optim, "estimate_hessian", real)
    assert record["steps"] == settings["max_steps"]
    # Sophia's clipping leaves a good share of coordinates to the curvature: the Hessian estimate matters.
    assert 0.2 < record["final"]["clip_fraction"] < 0.8
    return {k: v.detach().clone() for k, v in trained.state_dict().items()}


def trainer_weights(tmp_path, trainer_cls=Trainer, loss_func=None, dtype=torch.float32,
                    **settings) -> tuple[dict, SophiaHessianCallback]:
    fresh_accelerate_state()
    cfg = make_config(split="full", **settings)
    model, tok = tiny_model("llama", seed=3)
    model = model.to(dtype)
    feats = [{k: v for k, v in f.items() if k != "index"} for f in encode_records(FACTS, tok, cfg)]
    order = soul_order(len(feats), cfg.batch_size, cfg.max_steps, seed=cfg.seed, grad_accum=cfg.grad_accum)
    optimizer = SophiaG(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay,
                        betas=tuple(cfg.betas), rho=cfg.rho, hessian_interval=cfg.hessian_interval,
                        estimator=cfg.estimator)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, train_sampling_strategy="sequential",
    )
    callback = SophiaHessianCallback(generator=torch.Generator().manual_seed(HESSIAN_SEED))
    trainer = trainer_cls(model=model, args=args, train_dataset=[feats[i] for i in order],
                          data_collator=QACollator(tok), optimizers=(optimizer, None), callbacks=[callback],
                          compute_loss_func=loss_func)
    if loss_func is not None:
        trainer.loss_is_scaled_for_ga = False  # soul averages the micro-batch losses of a step
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, callback


SOPHIA = dict(optimizer="sophia", lr=2e-2, weight_decay=0.0, betas=[0.9, 0.95], rho=10.0, hessian_interval=2,
              estimator="gnb", warmup_steps=0, max_grad_norm=1.0, seed=0)


def assert_same_weights(a: dict, b: dict, start: dict, lr: float) -> None:
    """Equal up to float rounding. The two stacks compute the same loss in a different order (the Trainer: a sum
    over answer tokens / their count; soul: per-sequence means), so gradients differ in the last bits; Sophia's
    ratio m / (rho·h) magnifies that where the curvature estimate h is near zero, so no float32 bound follows
    from eps32 alone (the exact oracle is the float64 `SophiaTrainer` test, to 1e-12). This float32 check asks
    every element to agree to 10 % of one step (lr; measured: 3.2e-5 = 0.16 % of it, under four CPU kernel
    settings) and all but 0.1 % of them to 1e-6."""
    assert a.keys() == b.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > lr / 2  # the runs really trained
    loose = 0
    total = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=lr * 1e-1, msg=lambda m, k=k: f"{k}: {m}")
        loose += int(((b[k] - a[k]).abs() > 1e-6).sum())
        total += a[k].numel()
    assert loose <= total * 1e-3, f"{loose} of {total} weights differ by more than 1e-6"


def test_plain_trainer_with_callback_matches_soul_loop(tmp_path, monkeypatch):
    # One sequence per step: the Trainer's token-mean loss is soul's sequence mean.
    settings = dict(SOPHIA, batch_size=1, grad_accum=1, max_steps=6)
    start = tiny_model("llama", seed=3)[0].state_dict()
    ours = soul_weights(monkeypatch, **settings)
    theirs, callback = trainer_weights(tmp_path, **settings)
    assert callback.hessian_updates == 3  # steps 0, 2, 4 with hessian_interval 2
    assert_same_weights(ours, theirs, start, settings["lr"])


def test_sophia_trainer_with_soul_loss_matches_exactly_with_batches_and_accumulation(tmp_path, monkeypatch):
    # soul_loss computes soul's loss the way soul does; in float64 nothing is left to rounding: equal weights.
    settings = dict(SOPHIA, batch_size=2, grad_accum=2, max_steps=4)
    start = tiny_model("llama", seed=3)[0].double().state_dict()
    ours = soul_weights(monkeypatch, torch.float64, **settings)
    theirs, callback = trainer_weights(tmp_path, SophiaTrainer, soul_loss, torch.float64, **settings)
    assert callback.hessian_updates == 2
    assert max((ours[k] - start[k]).abs().max().item() for k in ours) > settings["lr"] / 2
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # ... while the Trainer's own token-mean loss gives other weights here, which is why soul_loss exists,
    plain, _ = trainer_weights(tmp_path, dtype=torch.float64, **settings)
    assert max((plain[k] - ours[k]).abs().max().item() for k in ours) > settings["lr"] * 1e-2
    # and other Hessian draws give other weights: the callback's estimate is what the steps used.
    monkeypatch.setattr(sys.modules[__name__], "HESSIAN_SEED", HESSIAN_SEED + 1)
    other, _ = trainer_weights(tmp_path, SophiaTrainer, soul_loss, torch.float64, **settings)
    assert max((other[k] - ours[k]).abs().max().item() for k in ours) > 1e-6


def test_callback_errors(tmp_path):
    with pytest.raises(TypeError, match="needs a Sophia optimizer"):
        sophia_of(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    model, tok = tiny_model("llama")
    feats = [{k: v for k, v in f.items() if k != "index"}
             for f in encode_records(FACTS, tok, make_config(split="full"))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=QACollator(tok),
                      optimizers=(torch.optim.AdamW(model.parameters()), None), callbacks=[SophiaHessianCallback()])
    with pytest.raises(TypeError, match=r"optimizers=\(SophiaG\(\.\.\.\), None\)"):
        trainer.train()
