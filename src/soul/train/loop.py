"""The training loop shared by fine-tuning and unlearning, read top to bottom in `run_training`.

One optimizer step ("step") = one *group* of ``grad_accum`` micro-batches per process. Each micro-batch pairs
a forget batch (the training split) with the next retain batch; the retain split is cycled on its own, so it
may be longer or shorter than the forget split. The effective batch is ``batch_size × grad_accum ×
num_processes`` forget examples.

Data order is a pure function of ``(seed, epoch)``: epoch ``e`` of a split of ``n`` records is
``randperm(n)`` drawn from a generator seeded with ``seed``/``e``, padded cyclically to a multiple of the
number of processes, dealt out round-robin (rank r takes positions r, r + P, …) and cut into micro-batches.
So the data position is just the step counter, and `resume` restores it exactly.

Learning rate (``W`` warm-up steps, ``T`` total steps, step ``s`` counted from 0):

    lr(s) = lr · (s + 1) / W              for s < W
    lr(s) = lr · (T − s) / (T − W)        for s ≥ W      (linear decay, last step still > 0)

Per step, with ``G`` micro-batches in the group, the gradient is that of ``(1/G) Σ_g L_g`` (each process),
averaged over processes by DDP's all-reduce on the last micro-batch only (earlier ones run under
``accelerator.no_sync``). Then ``accelerator.clip_grad_norm_`` (global norm), ``optimizer.step()`` and the
scheduler step. When the optimizer is Sophia and ``optimizer.hessian_due()``, the Hessian diagonal is
estimated first, on the group's forget micro-batches, retain micro-batches, or both (``hessian_batch``).
The estimate's random draws come from a generator seeded with ``(seed, step, rank)`` and average
``hessian_samples`` draws. Optimizers that take Hessian-vector products in ``step()`` (`soul.optim.needs_create_graph`)
get ``backward(create_graph=True)`` under the math attention kernel. Each step's record also has the
update diagnostics of `soul.train.diagnostics` (``update_norm``, ``update_rms_over_lr``, ``rho``), summarised
in the run record's ``diagnostics``.

Checkpoints (`soul.train.checkpoint`: weights and optimizer state as safetensors; scheduler, progress,
every process's RNG and the run's identity as JSON; nothing pickled) are written to ``<dir>/.tmp-step-N``,
fsynced and renamed to ``<dir>/step-N`` once every process is done, so a checkpoint directory is complete or
absent. Resume refuses a checkpoint of another configuration, data or input model, naming what differs. A non-finite loss raises `NonFiniteLossError` before its backward pass,
so no checkpoint ever holds weights touched by it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from soul.io import write_json_atomic, write_text_atomic
from soul.losses import model_logits, sequence_nll
from soul.safety import fsync_path, remove_path
from soul.train.config import KEEP_BEST_METRICS, TrainConfig
from soul.train.trackers import close_run, open_for_run

LOG_NAME = "train_log.jsonl"
RUN_NAME = "run.json"
BEST_NAME = "best"
BEST_WEIGHTS = "trainable.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss (or one of its parts, or the gradient norm) became NaN/inf; training stopped before using it."""

    def __init__(self, step: int, part: str, value: float, checkpoint: Path | None) -> None:
        self.step, self.part, self.value, self.checkpoint = step, part, value, checkpoint
        kept = (f"the last good checkpoint {checkpoint} is intact (resume with resume=True / --resume)"
                if checkpoint else "no checkpoint was written before it")
        super().__init__(f"non-finite loss at step {step}: {part} = {value}; training stopped and {kept}")


# --------------------------------------------------------------------------------------------------- data
def encode_records(records: Sequence[dict], tokenizer, cfg: TrainConfig, refusals: list[str] | None = None) -> list[dict]:
    """Tokenised features (``input_ids``, ``labels``, ``index``[, ``refusal``]) for `soul.data.format.QACollator`."""
    try:
        from soul.data import QADataset
    except ImportError:  # soul.data without its dataset class: encode here with the shared formatter
        QADataset = None
    if QADataset is not None:
        ds = QADataset(list(records), tokenizer, prompt_format=cfg.prompt_format, max_length=cfg.max_length,
                       refusals=refusals)
        return [ds[i] for i in range(len(ds))]
    if refusals:
        raise RuntimeError("refusal answers need soul.data.QADataset, which is not available")
    from soul.data.format import encode_qa

    return [{**encode_qa(tokenizer, r["question"], r["answer"], prompt_format=cfg.prompt_format,
                         max_length=cfg.max_length), "index": i} for i, r in enumerate(records)]


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's micro-batches (lists of record indices) for one epoch; a pure function of its arguments."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / world) * world
    perm = [perm[i % n] for i in range(total)]  # cyclic padding: every process gets as many batches
    mine = perm[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def hash_records(records: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(records), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- helpers
class FineTuneObjective:
    """Plain fine-tuning: L = mean over sequences of the mean answer-token NLL (`soul.losses.answer_nll`)."""

    name = "finetune"
    needs_retain = False
    needs_reference = False
    needs_refusal = False

    def __call__(self, model, forget_batch, retain_batch=None, ref_model=None):
        from soul.losses import answer_nll

        loss = answer_nll(model, forget_batch)
        return _Output(loss, {"nll": loss.item()})

    def __repr__(self) -> str:
        return "FineTuneObjective()"


class _Output:
    def __init__(self, loss: torch.Tensor, parts: dict[str, float]) -> None:
        self.loss, self.parts = loss, parts


class Progress:
    """The loop's own state, saved as JSON in every checkpoint (`soul.train.checkpoint`)."""

    def __init__(self) -> None:
        self.step = 0
        self.elapsed = 0.0
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}
        self.last_probe: dict[str, Any] = {}
        self.first_probe: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "elapsed": self.elapsed, "best": self.best, "last": self.last,
                "last_probe": self.last_probe, "first_probe": self.first_probe}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed, self.best = state["step"], state["elapsed"], state["best"]
        self.last, self.last_probe, self.first_probe = state["last"], state["last_probe"], state["first_probe"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay (module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains (1-D tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Constructor options for ``build_optimizer(cfg.optimizer, ...)``; ``optimizer_options`` win.

    A library optimizer (``LIBRARY:Class``) without a ``weight_decay`` option is built without it when
    ``weight_decay`` is 0 (any other value is an error there, from the factory).
    """
    from soul.optim.factory import is_external, optimizer_options

    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(cfg.betas)
    if str(cfg.optimizer).lower() in ("sophia", "sophiag", "sophia-g"):
        kwargs["hessian_interval"] = cfg.hessian_interval
        kwargs["estimator"] = cfg.estimator
        if cfg.rho is not None:
            kwargs["rho"] = cfg.rho
        kwargs["target_unclipped"] = cfg.target_unclipped
    if is_external(cfg.optimizer) and cfg.weight_decay == 0 \
            and "weight_decay" not in optimizer_options(cfg.optimizer):
        kwargs.pop("weight_decay")
    kwargs.update(cfg.optimizer_options or {})
    return kwargs


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft); only the adapters train, and they are merged when saved."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules or "all-linear"
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA/ROCm, XPU, MPS …)."""
    probe_api = getattr(torch, "accelerator", None)
    if probe_api is not None and hasattr(probe_api, "is_available"):
        return bool(probe_api.is_available())
    return torch.cuda.is_available()


@torch.no_grad()
def probe(model: torch.nn.Module, batches: list[dict], accelerator) -> float:
    """Mean over records of exp(−mean answer-token NLL): the per-token geometric-mean answer probability."""
    probs = []
    for batch in batches:
        with accelerator.autocast():
            nll = sequence_nll(model_logits(model, batch), batch["labels"])
        probs.append(torch.exp(-nll.float()))
    return torch.cat(probs).mean().item()


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    from soul._version import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "soul": __version__}
    with contextlib.suppress(ImportError):
        import peft

        out["peft"] = peft.__version__
    return out


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable weights (gathered from every process under FSDP: collective)."""
    return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- loop
def _release_accelerator_state(wanted: str) -> None:
    """Let a run in a process that already trained with another mixed precision start (a pipeline fine-tunes
    in fp32, then unlearns in bf16): accelerate keeps one process-wide `AcceleratorState` and refuses a second
    `Accelerator` with other settings. Only that state is reset; the process group (`PartialState`) stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") not in (None, wanted):
        AcceleratorState._reset_state(reset_partial_state=False)


def _working_dir(out: Path, accelerator, main: bool, world: int) -> Path:
    """`out` itself for a new output; a fresh sibling (`soul.train.output.work_dir`) when `out` holds a previous
    one. The main process decides (and creates the sibling); every process gets the same path."""
    from soul.train.output import holds_previous_output, work_dir

    choice = [None]
    if main:
        work = work_dir(out) if holds_previous_output(out) else out
        if work != out:
            remove_path(work)  # this process's own name: a leftover of an earlier run in this process
            work.mkdir(parents=True)
        choice = [str(work)]
    if world > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(choice, from_process=0)
    return Path(choice[0])


def run_training(model: torch.nn.Module, tokenizer, *, cfg: TrainConfig, overwrite: bool = False,
                 **kwargs: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`_run_training` inside the output guard (`soul.train.output.guarded_run_output`): an unsafe ``out_dir``
    is refused before any work, and it is locked while the run lasts. `overwrite` lets the run replace a
    previous soul output in ``out_dir``."""
    from soul.train.output import guarded_run_output, launch_is_main

    cfg.validate()
    out_dir = kwargs.get("out_dir")
    if out_dir is None or not launch_is_main():
        return _run_training(model, tokenizer, cfg=cfg, **kwargs)
    with guarded_run_output(out_dir, resume=cfg.resume, overwrite=overwrite, input_model=kwargs.get("input_model"),
                            data_info=kwargs.get("data_info")):
        return _run_training(model, tokenizer, cfg=cfg, **kwargs)


def _run_training(
    model: torch.nn.Module,
    tokenizer,
    *,
    cfg: TrainConfig,
    objective: Callable,
    train_records: Sequence[dict],
    retain_records: Sequence[dict] | None = None,
    kind: str = "unlearn",
    out_dir: str | os.PathLike | None = None,
    input_model: str | None = None,
    data_info: dict[str, Any] | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `model` on `train_records` (the forget split, or the fine-tuning split) and return it with its run record.

    `objective(model, forget_batch, retain_batch, ref_model)` returns an object with ``loss`` and ``parts``.
    With `out_dir`, the final model (LoRA merged) is written there with `run.json` and `train_log.jsonl`;
    checkpoints go to ``out_dir/checkpoints`` while the run lasts. `on_step_end(step, log_record)` is called
    after every step (after its checkpoint); an exception raised there stops the run like a kill would.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    from soul.data.format import QACollator

    cfg.validate()
    started = time.time()
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    if out is not None and input_model and Path(input_model).expanduser().exists() \
            and Path(input_model).expanduser().resolve() == out:
        raise ValueError(f"refusing to write into the input model directory {out}; choose another --out")
    ckpt_root = out / "checkpoints" if out is not None else None
    if (cfg.checkpoint_every or cfg.resume or cfg.keep_best) and out is None:
        raise ValueError("checkpoints, resume and keep_best need an output directory (out_dir / --out)")

    # cpu=True on a machine without an accelerator makes `torchrun`/`accelerate launch` on CPU run multi-process
    # (gloo); without it accelerate ignores the launcher's WORLD_SIZE there and every process trains alone.
    from soul.precision import resolve_precision

    # "auto" → bf16 only where the hardware has native bf16; the reason goes into run.json.
    precision, precision_reason = resolve_precision(cfg.mixed_precision, warn=True)
    _release_accelerator_state(precision)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=1,
                              cpu=not has_accelerator())
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
        raise ValueError("with DeepSpeed set gradient accumulation in the DeepSpeed config and grad_accum=1")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.optimizer == "sophia":
        # ZeRO hands gradients to its own optimizer step only, so a Hessian estimate would see no .grad.
        raise ValueError("optimizer 'sophia' does not run under DeepSpeed ZeRO (its Hessian estimate needs the "
                         "gradients in .grad); use an FSDP or DDP accelerate config, or optimizer 'adamw'")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and (cfg.checkpoint_every or cfg.resume):
        raise ValueError("checkpoints and resume are not supported under DeepSpeed ZeRO (its optimizer state "
                         "lives in the engine); use an FSDP or DDP accelerate config")
    main = accelerator.is_main_process
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    set_seed(cfg.seed)

    # ---- data: tokenise once; batches are drawn by index so the order is a function of (seed, epoch)
    refusals = None
    if getattr(objective, "needs_refusal", False):
        from soul.data import load_refusals

        refusals = load_refusals()
    needs_retain = bool(getattr(objective, "needs_retain", False))
    if needs_retain and not retain_records:
        raise ValueError(f"objective {getattr(objective, 'name', objective)!r} needs retain data, got none")
    if not train_records:
        raise ValueError("the training split is empty")
    from soul.train.lengths import data_label, encode_within_context, model_context

    context = model_context(model, tokenizer)  # nothing longer reaches a forward pass (soul.train.lengths)
    train_role = "forget" if kind == "unlearn" else "train"
    train_feats = encode_within_context(train_records, tokenizer, cfg, refusals, context=context,
                                        where=data_label(data_info, train_role))
    retain_feats = (encode_within_context(retain_records, tokenizer, cfg, None, context=context,
                                          where=data_label(data_info, "retain")) if retain_records else None)
    collate = QACollator(tokenizer)

    def make_batch(feats: list[dict], idx: list[int]) -> dict[str, Any]:
        return to_device(collate([feats[i] for i in idx]), device)

    micro_per_epoch = len(epoch_batches(len(train_feats), cfg.batch_size, seed=cfg.seed, epoch=0, world=world))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    retain_micro = (len(epoch_batches(len(retain_feats), cfg.batch_size, seed=cfg.seed + 1, epoch=0, world=world))
                    if retain_feats else 0)

    def group_at(step: int) -> list[tuple[list[int], list[int] | None]]:
        """The (forget indices, retain indices) micro-batches of optimizer step `step` on this process."""
        epoch, k = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_feats), cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank, world=world)
        group = batches[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
        first_micro = epoch * micro_per_epoch + k * cfg.grad_accum  # global micro-batch counter -> retain cursor
        out_group = []
        for j, idx in enumerate(group):
            r_idx = None
            if retain_feats:
                r_epoch, r_pos = divmod(first_micro + j, retain_micro)
                r_idx = epoch_batches(len(retain_feats), cfg.batch_size, seed=cfg.seed + 1, epoch=r_epoch,
                                      rank=rank, world=world)[r_pos]
            out_group.append((idx, r_idx))
        return out_group

    probe_sets: dict[str, list[dict]] = {}
    if cfg.probe_every or cfg.probe_each_epoch:
        roles = {"forget": train_feats, "retain": retain_feats} if kind == "unlearn" else {"train": train_feats}
        for role, feats in roles.items():
            if feats:
                n = min(cfg.probe_size, len(feats))
                probe_sets[role] = [make_batch(feats, list(range(i, min(n, i + cfg.batch_size))))
                                    for i in range(0, n, cfg.batch_size)]

    # ---- model, frozen reference, LoRA, optimizer, schedule
    model_fp = None
    if out is not None and (cfg.checkpoint_every or cfg.resume):  # what a resumed run must start from
        from soul.train.checkpoint import fingerprint_model

        model_fp = fingerprint_model(model, input_model)
    ref_model = None
    if getattr(objective, "needs_reference", False):
        ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if cfg.lora_r:
        model = add_lora(model, cfg)
    model.train()
    from soul.optim import build_optimizer

    raw_optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.weight_decay), **optimizer_kwargs(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, lambda s: lr_factor(s, warmup, total_steps))
    # The scheduler is not prepared: accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, raw_optimizer)
    progress = Progress()
    trainable = [p for p in model.parameters() if p.requires_grad]
    from soul.optim import needs_create_graph

    # AdaHessian-like optimizers take Hessian-vector products of .grad: back-propagate with a graph, through
    # the math attention kernel (the fused SDPA kernels have no double backward).
    create_graph = needs_create_graph(raw_optimizer)
    estimate_hessian = None
    if hasattr(raw_optimizer, "hessian_due"):
        from soul.optim import estimate_hessian

    # ---- resume, or start clean
    from soul.train import checkpoint as ckpt_io

    log_path = out / LOG_NAME if out is not None else None
    work = out  # where this run's log and checkpoints live while it lasts
    resumed_from = None
    last_ckpt = latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    identity = None
    if ckpt_root is not None and (cfg.checkpoint_every or cfg.resume):
        identity = {"config": cfg.to_dict(), "world_size": world, "model": model_fp,
                    "data": {"train": hash_records(train_records),
                             **({"retain": hash_records(retain_records)} if retain_records else {})}}
    if cfg.resume and last_ckpt is not None:
        saved = ckpt_io.read_meta(last_ckpt)
        diffs = ckpt_io.resume_differences(saved, identity)
        if diffs:
            raise ValueError(f"cannot resume from {last_ckpt}: " + "; ".join(diffs))
        ckpt_io.load_checkpoint(last_ckpt, accelerator=accelerator, model=model, optimizer=raw_optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        progress.load_state_dict(saved["progress"])
        if hasattr(raw_optimizer, "_record_h_stats"):  # h_mean/h_max of the restored Hessian, not null
            raw_optimizer._record_h_stats()
        resumed_from = progress.step
        if main and log_path is not None and log_path.exists():  # drop log lines of steps after the checkpoint
            keep = ckpt_io.read_log_lines(log_path, progress.step)
            write_text_atomic(log_path, "".join(f"{ln}\n" for ln in keep))
    elif out is not None:
        # Not resuming: a previous output in `out` (its log, checkpoints, model) stays intact until the final
        # swap; this run keeps its own log and checkpoints in a sibling (`soul.train.output.work_dir`).
        work = _working_dir(out, accelerator, main, world)
        ckpt_root, log_path = work / "checkpoints", work / LOG_NAME
    accelerator.wait_for_everyone()
    run_start = time.time() - progress.elapsed
    trackers = open_for_run(cfg, out, main)  # cfg.report_to: copies of the log lines (soul.train.trackers)

    def log(record: dict) -> None:
        if main and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        trackers.log(record)

    def save_checkpoint(step: int) -> None:
        tmp, final = ckpt_root / f".tmp-step-{step:08d}", ckpt_root / f"step-{step:08d}"
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        progress.elapsed = time.time() - run_start
        meta = {**identity, "step": step, "scheduler": scheduler.state_dict(), "progress": progress.state_dict()}
        ckpt_io.save_checkpoint(tmp, accelerator=accelerator, model=model, optimizer=raw_optimizer, meta=meta)
        accelerator.wait_for_everyone()
        if main:
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(ckpt_root)
            for old in ckpt_root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def run_probes(step: int) -> None:
        model.eval()
        record = {"kind": "probe", "step": step, "epoch": step / steps_per_epoch}
        for role, batches in probe_sets.items():
            record[f"{role}_prob"] = probe(model, batches, accelerator)
        if "forget_prob" in record and "retain_prob" in record:
            record["gap"] = record["retain_prob"] - record["forget_prob"]
        model.train()
        progress.last_probe = record
        if step == 0:
            progress.first_probe = record
        log(record)
        metric = cfg.keep_best
        if metric and metric in record:
            better = KEEP_BEST_METRICS[metric] == "max"
            value = record[metric]
            if progress.best is None or (value > progress.best["value"] if better else value < progress.best["value"]):
                progress.best = {"metric": metric, "value": value, "step": step}
                state = trainable_state(accelerator.unwrap_model(model))
                if main:
                    tmp = ckpt_root / f".tmp-{BEST_NAME}"
                    tmp.mkdir(parents=True, exist_ok=True)
                    ckpt_io.save_trainable(state, tmp / BEST_WEIGHTS)
                    write_json_atomic(tmp / "best.json", progress.best)
                    if (ckpt_root / BEST_NAME).exists():
                        shutil.rmtree(ckpt_root / BEST_NAME)
                    os.replace(tmp, ckpt_root / BEST_NAME)

    def last_good() -> Path | None:  # a checkpoint --resume can continue from (one in `out`, not in a sibling)
        return latest_checkpoint(ckpt_root) if ckpt_root is not None and work == out else None

    def check_finite(step: int, loss: torch.Tensor, parts: dict[str, float]) -> None:
        bad_name, bad_value = None, None
        for name, value in parts.items():
            if not math.isfinite(value):
                bad_name, bad_value = f"loss part {name!r}", value
                break
        if bad_name is None and not torch.isfinite(loss.detach()).all():
            bad_name, bad_value = "the total loss", loss.item()
        flag = torch.tensor([0.0 if bad_name is None else 1.0], device=device)
        if world > 1:  # every process must stop together, or the others hang in the next all-reduce
            flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            raise NonFiniteLossError(step, bad_name or "a loss on another process", bad_value, last_good())

    # ---- train
    bar = tqdm(total=total_steps, initial=progress.step, disable=not (main and cfg.progress), desc=kind,
               dynamic_ncols=True)
    if probe_sets and resumed_from is None:
        run_probes(0)
    from soul.train.diagnostics import UpdateTracker

    updates = UpdateTracker(trainable, from_step=progress.step)
    optimizer.zero_grad(set_to_none=True)
    try:
        while progress.step < total_steps:
            step = progress.step + 1  # 1-based number of the step being taken
            group = group_at(progress.step)
            batches = [(make_batch(train_feats, f), make_batch(retain_feats, r) if r is not None else None)
                       for f, r in group]
            hessian_updated = False
            if estimate_hessian is not None and raw_optimizer.hessian_due():
                # The estimate uses the whole group (the step's global batch), of the role(s) asked for.
                forget_bs = [f for f, _ in batches]
                retain_bs = [r for _, r in batches if r is not None]
                h_batches = {"forget": forget_bs, "retain": retain_bs or forget_bs,
                             "both": forget_bs + retain_bs}[cfg.hessian_batch]
                # Labels (GNB) / probe vectors (Hutchinson) from a generator of (seed, step, rank): equal seeds
                # reproduce, different seeds differ, and a resumed run draws what an uninterrupted one did.
                h_gen = torch.Generator(device=device).manual_seed(
                    (cfg.seed * 1_000_003 + progress.step) * 1_009 + rank)
                with accelerator.autocast():
                    estimate_hessian(model, h_batches, raw_optimizer, estimator=cfg.estimator, generator=h_gen,
                                     samples=cfg.hessian_samples)
                hessian_updated = True
            sums: dict[str, float] = {}
            total_loss = 0.0
            for j, (forget_b, retain_b) in enumerate(batches):
                sync = j == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast(), \
                        (sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()):
                    output = objective(model, forget_b, retain_b, ref_model)
                    check_finite(step, output.loss, output.parts)
                    with warnings.catch_warnings():
                        # torch warns of a param <-> grad reference cycle; zero_grad(set_to_none) breaks it.
                        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                        accelerator.backward(output.loss / len(batches), create_graph=create_graph)
                total_loss += output.loss.item() / len(batches)
                for name, value in output.parts.items():
                    sums[name] = sums.get(name, 0.0) + value / len(batches)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
            grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(step, "the gradient norm", grad_norm, last_good())
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer_stats = getattr(raw_optimizer, "last_stats", None) or {}
            update_stats = updates.step(lr, optimizer_stats)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step = step

            # Loss parts averaged over processes so the log shows the global batch.
            names = sorted(sums)
            # float64: the logged numbers are Python floats, and a float32 tensor would round them (and their
            # mean over processes) to ~1e-7 relative.
            values = torch.tensor([total_loss, *(sums[n] for n in names)], device=device,
                                  dtype=torch.float32 if torch.device(device).type == "mps" else torch.float64)
            if world > 1:
                values = accelerator.reduce(values, reduction="mean")
            record = {"kind": "train", "step": step, "epoch": step / steps_per_epoch, "loss": values[0].item(),
                      **{n: values[i + 1].item() for i, n in enumerate(names)}, "lr": lr, "grad_norm": grad_norm,
                      "hessian_updated": hessian_updated, "time": time.time() - run_start}
            for key, value in optimizer_stats.items():
                if key != "step":  # Sophia's own counter equals ours; keep clip_fraction, h_mean, h_max …
                    value = float(value)
                    record[key] = value if math.isfinite(value) else None
            record.update(update_stats)  # update_norm, update_rms_over_lr, rho (None without one)
            progress.last = record
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}")

            if probe_sets and ((cfg.probe_every and step % cfg.probe_every == 0)
                               or (cfg.probe_each_epoch and step % steps_per_epoch == 0)):
                run_probes(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(step)
            if on_step_end is not None:
                on_step_end(step, record)
    finally:
        bar.close()

    # ---- final model: LoRA merged, best weights restored when asked, written with its run record
    diagnostics = updates.summary()  # of the trajectory's last weights, before any keep_best restore
    if probe_sets and progress.last_probe.get("step") != progress.step:
        run_probes(progress.step)
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(model)
    if cfg.keep_best and progress.best is not None:
        state = ckpt_io.load_trainable(ckpt_root / BEST_NAME / BEST_WEIGHTS)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name in state:
                    param.copy_(state[name].to(param.device))
    full_state = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        full_state = accelerator.get_state_dict(model)
        if full_state is not None and getattr(trained.config, "tie_word_embeddings", False):
            # The gathered state lists the tied output matrix twice; save it once, as a plain model does.
            full_state.pop("lm_head.weight", None)
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.eval()
    record = {
        "kind": kind,
        "config": cfg.to_dict(),
        "objective": {"name": getattr(objective, "name", type(objective).__name__),
                      "repr": repr(objective), "coefficients": getattr(objective, "coefficients", {})},
        "input_model": input_model,
        "data": data_info or {},
        "versions": versions(),
        "world_size": world,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_reason": precision_reason,
        "device": str(device),
        "steps": progress.step,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup,
        "effective_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "resumed_from_step": resumed_from,
        "wall_time_s": time.time() - run_start,
        "wall_time_this_process_s": time.time() - started,
        "final": progress.last,
        "initial_probe": progress.first_probe,
        "final_probe": progress.last_probe,
        "best": progress.best,
        "diagnostics": diagnostics,
    }
    if main and out is not None:
        from soul.models import save_model
        from soul.train.output import publish_output

        def fill(staging: Path) -> None:
            save_model(trained, tokenizer, staging, state_dict=full_state)
            record["out_dir"] = str(out)
            write_json_atomic(staging / RUN_NAME, record)
            if log_path.exists():
                shutil.copy2(log_path, staging / LOG_NAME)
            if ckpt_root.exists() and (cfg.keep_checkpoints or cfg.keep_best):
                shutil.copytree(ckpt_root, staging / "checkpoints", ignore=shutil.ignore_patterns(".tmp-*"))

        publish_output(out, fill)
        if work != out:
            remove_path(work)
    close_run(trackers, out)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return trained, record
