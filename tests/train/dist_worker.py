"""Worker for tests/train/test_distributed.py: one unlearning run through the real training loop.

Launched by the test as ``accelerate launch --config_file configs/accelerate/cpu_2proc_{ddp,fsdp}.yaml
tests/train/dist_worker.py …`` (two CPU processes, gloo), and imported by the test for the single-process
reference run, so both sides use exactly the same options and the same label sampler.

Two things make a CPU run of accelerate 1.15 distributed, and are done here only:

* ``ACCELERATE_USE_CPU=true`` must be in the environment: ``accelerate launch`` starts the processes with
  torchrun for ``MULTI_GPU``/``FSDP`` configs but forwards ``use_cpu`` only on its single-process path;
  without it every process silently trains alone (``DistributedType.NO``).
* FSDP on CPU: `AcceleratorState` turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only when the
  process group was classified as a GPU-family type, never ``MULTI_CPU`` — an FSDP config on CPU silently
  becomes DDP. `enable_fsdp_on_cpu` initialises the gloo process group as accelerate would, then labels it
  ``MULTI_GPU`` so accelerate's own FSDP2 path (``fully_shard`` over a CPU device mesh) is taken. Torch's
  FSDP2 itself supports CPU/gloo; nothing of the training loop is patched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

# Options of the run; the single-process reference uses the same with batch_size × world.
RUN_OPTIONS: dict[str, Any] = dict(
    objective="graddiff", optimizer="sophia", estimator="gnb", hessian_interval=2, max_steps=4,
    lr=3e-3, weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0, rho=0.04, seed=0, mixed_precision="no",
    checkpoint_every=2, keep_checkpoints=True, progress=False,
)


def deterministic_multinomial(probs: torch.Tensor, num_samples: int = 1, replacement: bool = False, *,
                              generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF sampling with u_i a fixed, numerically robust function of row i itself.

    GNB draws its labels with the process's RNG, so two processes holding half a batch each draw other labels
    than one process holding all of it. For an exact distributed-vs-single comparison the draw must depend
    only on the row: u_i = frac(0.5 + φ·argmax_j p_ij) (φ the golden ratio, so u spreads over (0, 1)), then
    ŷ_i = min{k : Σ_{j≤k} p_ij ≥ u_i}. The argmax, unlike the probabilities' digits, does not move when the
    batch is split differently and the logits change in the last bits.
    """
    if num_samples != 1 or out is not None:
        raise NotImplementedError("the test sampler draws one sample per row")
    p = probs.detach().double()
    u = torch.frac(0.5 + 0.6180339887 * p.argmax(-1, keepdim=True).double())
    cdf = p.cumsum(-1) / p.sum(-1, keepdim=True)
    return torch.searchsorted(cdf, u).clamp_max(p.shape[-1] - 1)


def enable_fsdp_on_cpu() -> None:
    """Make accelerate take its FSDP path on CPU processes (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)  # gloo process group, as accelerate sets it up for MULTI_CPU
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a MULTI_CPU process group to relabel, got {state.distributed_type}")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def load_data(path: str | os.PathLike) -> dict[str, list[dict]]:
    return json.loads(Path(path).read_text())


def run(model_dir: str, data: dict[str, list[dict]], out_dir: str | os.PathLike, batch_size: int,
        dtype: torch.dtype = torch.float64, **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One graddiff + Sophia(GNB) run through `soul.train.unlearn` with the weights (and so every computation
    of the loop) in `dtype`; returns ``(model, run record)``."""
    from soul.models import load_model
    from soul.train import unlearn

    model, tokenizer = load_model(model_dir, dtype=dtype)
    options = {**RUN_OPTIONS, **overrides}
    return unlearn(model, tokenizer, data=data, forget_split="forget", retain_split="retain", out_dir=out_dir,
                   batch_size=batch_size, **options)


def hutchinson_refusal(model_dir: str, data: dict[str, list[dict]], out_dir: Path, batch_size: int) -> str:
    """The error a Hutchinson run gives on sharded parameters ('' when it wrongly succeeds)."""
    try:
        run(model_dir, data, out_dir, batch_size, estimator="hutchinson", max_steps=1, checkpoint_every=0,
            keep_checkpoints=False)
    except (NotImplementedError, RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


class Stop(Exception):
    pass


def stopped_and_resumed(model_dir: str, data: dict[str, list[dict]], out_dir: Path, batch_size: int) -> int:
    """Run until step 3 (checkpoint at step 2), stop every process there, resume; the resumed-from step."""
    def stop_at_3(step: int, record: dict) -> None:
        if step == 3:
            raise Stop

    with contextlib.suppress(Stop):
        run(model_dir, data, out_dir, batch_size, on_step_end=stop_at_3)
    _, record = run(model_dir, data, out_dir, batch_size, resume=True)
    return record["resumed_from_step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSON file {'forget': [...], 'retain': [...]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--check-hutchinson", action="store_true")
    parser.add_argument("--check-resume", action="store_true", help="also stop a run after step 3 and resume it")
    parser.add_argument("--also-float32", action="store_true",
                        help="also train in float32 (into OUT/model32): the smoke run of the real precision")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.multinomial = deterministic_multinomial  # the GNB sampler reads torch.multinomial at call time
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        enable_fsdp_on_cpu()

    from accelerate import PartialState
    from torch.distributed.fsdp import FSDPModule

    data = load_data(args.data)
    out = Path(args.out)
    model, record = run(args.model, data, out / "model", args.batch_size)
    report: dict[str, Any] = {
        "world_size": record["world_size"],
        "device": record["device"],
        "final": record["final"],
        # What the loop trained: under FSDP2, DTensor parameters, every decoder layer its own FSDP unit.
        "param_types": sorted({type(p).__name__ for p in model.parameters()}),
        "root_sharded": isinstance(model, FSDPModule),
        "layers_sharded": [isinstance(layer, FSDPModule) for layer in model.model.layers],
    }
    from accelerate.state import AcceleratorState

    report["distributed_type"] = str(AcceleratorState().distributed_type)
    if args.also_float32:
        run(args.model, data, out / "model32", args.batch_size, dtype=torch.float32)
    if args.check_resume:
        report["resumed_from_step"] = stopped_and_resumed(args.model, data, out / "resumed", args.batch_size)
    if args.check_hutchinson:
        report["hutchinson_error"] = hutchinson_refusal(args.model, data, out / "hutchinson", args.batch_size)
    state = PartialState()
    if state.is_main_process:
        tmp = out / ".worker.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, out / "worker.json")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
