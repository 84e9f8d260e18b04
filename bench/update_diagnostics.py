"""Cost of the per-step update diagnostics (`soul.train.diagnostics.UpdateTracker`) on SmolLM2-135M's parameters.

The loop measures ``update_norm = ‖θ_t − θ_{t−1}‖`` after every optimizer step. This times
``UpdateTracker.step`` against a SophiaG (foreach) step on the same parameters (random init from the model's
config: only shapes matter; fixed random gradients), interleaved step by step so load from other processes
falls on both, and reports the medians, their ratio and the tracker's extra memory (two copies of the
trainable parameters). A whole unlearning step (forward, backward, Hessian estimate, optimizer) costs far more
than the optimizer step, so ``ratio_over_sophia_step`` is an upper bound of the share in a training step.

    .venv/bin/python bench/update_diagnostics.py --steps 10 --threads 1
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
from soul.train.diagnostics import UpdateTracker


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory whose config is used")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="bench/results/update_diagnostics.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    sophia = SophiaG(params, lr=1e-5, weight_decay=0.1, foreach=True)
    sophia.update_hessian(scale=4096.0)
    tracker = UpdateTracker(params)
    times: dict[str, list[float]] = {"sophia_step": [], "tracker_step": []}
    for i in range(args.warmup + args.steps):
        t_opt = _timed(sophia.step, device)
        t_track = _timed(lambda: tracker.step(1e-5), device)
        if i >= args.warmup:
            times["sophia_step"].append(t_opt)
            times["tracker_step"].append(t_track)
    median = {k: statistics.median(v) for k, v in times.items()}
    extra = 2 * sum(p.numel() * p.element_size() for p in params)
    result = {
        "benchmark": "update_diagnostics",
        "model": args.model,
        "parameters": sum(p.numel() for p in params),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
        "steps": args.steps,
        "sophia_step_s": median["sophia_step"],
        "tracker_step_s": median["tracker_step"],
        "ratio_over_sophia_step": median["tracker_step"] / median["sophia_step"],
        "tracker_extra_bytes": extra,
        "last_update_rms_over_lr": tracker.rms_over_lr[-1],
        "sophia_step_s_all": times["sophia_step"],
        "tracker_step_s_all": times["tracker_step"],
        "note": "interleaved, median; the machine may be shared with other processes",
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=2))
    return result


if __name__ == "__main__":
    main()
