"""Step time and state size of SophiaG (foreach) vs torch AdamW (foreach) on the SmolLM2-135M parameter set.

The parameters are those of ``LlamaForCausalLM`` built from the config of
``soul.models.resolve_model_path("smollm2-135m")`` (random init: only shapes matter), with fixed random
gradients. Both optimizers update the same parameters and their steps are *interleaved* (AdamW, Sophia,
Sophia, AdamW, ...) so that load from other processes on a shared machine hits both alike; the median of N timed
steps after a warm-up is reported. Sophia's Hessian refresh (``update_hessian``, every k steps) is timed
separately and reported amortised over k. Writes JSON atomically to ``--out``.

    .venv/bin/python bench/optim_step.py --steps 20 --warmup 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoConfig, LlamaForCausalLM

from soul.io import write_json_atomic
from soul.models import resolve_model_path
from soul.optim import SophiaG
from soul.optim import sophia as sophia_module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[key] = out.get(key, 0) + value.numel() * value.element_size()
    out["total"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory whose config is used")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-bucket-numel", type=int, default=None,
                        help="override soul.optim.sophia.CPU_BUCKET_NUMEL; 0 = no buckets (one foreach call per op)")
    parser.add_argument("--out", default="bench/results/optim_step.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.cpu_bucket_numel is not None:
        sophia_module.CPU_BUCKET_NUMEL = args.cpu_bucket_numel or None

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # tied embeddings counted once
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 1e-3

    adamw = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.1, foreach=True)
    sophia = SophiaG(params, lr=1e-5, weight_decay=0.1, hessian_interval=10, foreach=True)
    refresh_times = [_timed(lambda: sophia.update_hessian(scale=4096.0), device) for _ in range(3)]
    times: dict[str, list[float]] = {"adamw": [], "sophia": []}
    pair = (("adamw", adamw), ("sophia", sophia))
    for i in range(args.warmup + args.steps):
        # alternate which optimizer goes first, so neither always runs right after the other's allocations
        for name, opt in pair if i % 2 == 0 else pair[::-1]:
            elapsed = _timed(opt.step, device)
            if i >= args.warmup:
                times[name].append(elapsed)
    stats = sophia.last_stats  # the lazy reduction: included neither in the timings nor skipped

    median = {k: statistics.median(v) for k, v in times.items()}
    bytes_a, bytes_s = _state_bytes(adamw), _state_bytes(sophia)
    result = {
        "benchmark": "optim_step",
        "model": args.model,
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
        "sophia_cpu_bucket_numel": sophia_module.CPU_BUCKET_NUMEL,
        "steps": args.steps,
        "warmup": args.warmup,
        "adamw_step_s": median["adamw"],
        "sophia_step_s": median["sophia"],
        "ratio_sophia_over_adamw": median["sophia"] / median["adamw"],
        "adamw_step_s_all": times["adamw"],
        "sophia_step_s_all": times["sophia"],
        "sophia_hessian_refresh_s": statistics.median(refresh_times),
        "sophia_hessian_refresh_amortised_s": statistics.median(refresh_times) / 10,
        "adamw_state_bytes": bytes_a,
        "sophia_state_bytes": bytes_s,
        "moment_bytes_equal": bytes_s["exp_avg"] + bytes_s["hessian"] == bytes_a["exp_avg"] + bytes_a["exp_avg_sq"],
        "sophia_last_stats": stats,
        "note": "interleaved steps (order alternating), median; the machine may be shared with other processes",
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=2))
    return result


if __name__ == "__main__":
    main()
