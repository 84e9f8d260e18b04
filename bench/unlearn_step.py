"""Wall time per unlearning step: GradDiff with AdamW vs Sophia(GNB, k) vs Sophia(Hutchinson, k) on SmolLM2.

Each configuration is a real `soul.train.unlearn` run (the accelerate loop, model = ``--model``, default the
bundled SmolLM2-135M) of ``1 + cycles·k`` steps. Step 1 is warm-up (lazy init, first Hessian estimate) and
is not counted; the ``cycles·k`` measured steps hold exactly ``cycles`` Hessian estimates (steps k+1,
2k+1, … in 1-based numbering), so the mean step time is the average over a whole Hessian cycle:

    step_s            = (time of the measured steps) / (cycles·k)
    ratio_vs_adamw    = step_s / step_s(adamw)                      target: sophia_gnb ≤ 1.10
    hessian_share     = (time inside estimate_hessian during the measured steps) / (their total time)
    tokens_per_s      = (non-padding tokens of the forget + retain batches of the measured steps) / their time

The ``rounds`` repetitions run the configurations interleaved (A, B, C, A, B, C, …) so load from other
processes on a shared machine falls on all of them alike; the median over rounds is reported.

    .venv/bin/python bench/unlearn_step.py --k 10 --batch-size 2 --out bench/results/unlearn_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from soul.io import write_json_atomic

# name -> unlearn() options; the objective is GradDiff everywhere.
CONFIGS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw"},
    "sophia_gnb": {"optimizer": "sophia", "estimator": "gnb"},
    "sophia_hutchinson": {"optimizer": "sophia", "estimator": "hutchinson"},
}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    import torch
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)  # other processes sharing the machine
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_records(data: str, forget_split: str, retain_split: str) -> dict[str, list[dict]]:
    from soul.data import load_split

    return {"forget": load_split(data, forget_split), "retain": load_split(data, retain_split)}


class CountingObjective:
    """GradDiff, counting the non-padding tokens it processes (forget + retain) for tokens/s."""

    def __init__(self, name: str = "graddiff") -> None:
        from soul.objectives import build_objective

        self.inner = build_objective(name)
        self.name = name
        for attr in ("needs_retain", "needs_reference", "needs_refusal"):
            setattr(self, attr, getattr(self.inner, attr, False))
        self.tokens: list[int] = []  # per call (= per micro-batch)

    def __call__(self, model, forget_batch, retain_batch=None, ref_model=None):
        n = int(forget_batch["attention_mask"].sum())
        if retain_batch is not None and self.needs_retain:
            n += int(retain_batch["attention_mask"].sum())
        self.tokens.append(n)
        return self.inner(model, forget_batch, retain_batch, ref_model)


class HessianTimer:
    """Wraps `soul.optim.estimate_hessian` (the loop imports it at run time) and records its wall time."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __enter__(self) -> HessianTimer:
        import soul.optim

        self._orig = soul.optim.estimate_hessian

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self._orig(*args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - t0)

        soul.optim.estimate_hessian = timed
        return self

    def __exit__(self, *exc: object) -> None:
        import soul.optim

        soul.optim.estimate_hessian = self._orig


def run_config(name: str, model_name: str, data: dict[str, list[dict]], *, k: int, cycles: int,
               batch_size: int, lr: float, max_length: int | None, seed: int = 0) -> dict[str, Any]:
    """One unlearning run of ``1 + cycles·k`` steps; timings of the measured steps (all but the first)."""
    from soul.models import load_model
    from soul.train import unlearn

    model, tokenizer = load_model(model_name)
    objective = CountingObjective()
    step_end: list[float] = []
    hessian_steps: list[int] = []
    steps = 1 + cycles * k

    def on_step_end(step: int, record: dict) -> None:
        step_end.append(time.perf_counter())
        if record.get("hessian_updated"):
            hessian_steps.append(step)

    with HessianTimer() as timer:
        t_start = time.perf_counter()
        unlearn(model, tokenizer, data=data, forget_split="forget", retain_split="retain", objective=objective,
                max_steps=steps, batch_size=batch_size, lr=lr, hessian_interval=k, warmup_steps=0,
                mixed_precision="no", max_length=max_length, seed=seed, progress=False, on_step_end=on_step_end,
                **CONFIGS[name])
    measured = step_end[-1] - step_end[0]  # steps 2 .. steps
    # Hessian time inside the measured steps: every call but the one of step 1.
    hess = sum(timer.calls[1:]) if timer.calls else 0.0
    tokens = sum(objective.tokens[1:])  # grad_accum = 1: one objective call per step
    return {
        "steps_measured": steps - 1,
        "step_s": measured / (steps - 1),
        "first_step_s": step_end[0] - t_start,
        "hessian_estimates_measured": max(0, len(timer.calls) - 1),
        "hessian_steps": hessian_steps,
        "hessian_s_per_estimate": (hess / (len(timer.calls) - 1)) if len(timer.calls) > 1 else None,
        "hessian_share": hess / measured if measured > 0 else None,
        "tokens_per_step": tokens / (steps - 1),
        "tokens_per_s": tokens / measured if measured > 0 else None,
    }


def summarise(rounds: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median over rounds of each number; ratios to AdamW from the medians."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        keys = [key for key, value in rounds[0][name].items() if isinstance(value, int | float)]
        out[name] = {key: statistics.median(r[name][key] for r in rounds if r[name][key] is not None)
                     if any(r[name][key] is not None for r in rounds) else None for key in keys}
        out[name]["step_s_per_round"] = [r[name]["step_s"] for r in rounds]
        out[name]["hessian_steps"] = rounds[0][name]["hessian_steps"]
    if "adamw" in out:
        for name in out:
            out[name]["ratio_vs_adamw"] = out[name]["step_s"] / out["adamw"]["step_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bundled")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--retain-split", default="retain90")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--k", type=int, default=10, help="Hessian interval (Sophia); also the measured cycle length")
    p.add_argument("--cycles", type=int, default=1, help="measured Hessian cycles per run")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (median reported)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences (tokens)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    args = p.parse_args(argv)
    if args.k < 1 or args.cycles < 1 or args.rounds < 1:
        p.error("--k, --cycles and --rounds must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine = machine_info()
    data = load_records(args.data, args.forget_split, args.retain_split)
    rounds = []
    for r in range(args.rounds):
        results = {}
        for name in args.configs:
            print(f"[unlearn_step] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            results[name] = run_config(name, args.model, data, k=args.k, cycles=args.cycles,
                                       batch_size=args.batch_size, lr=args.lr, max_length=args.max_length)
        rounds.append(results)
    summary = summarise(rounds)
    report = {
        "benchmark": "unlearn_step",
        "objective": "graddiff",
        "model": args.model,
        "data": {"source": args.data, "forget": args.forget_split, "retain": args.retain_split},
        "settings": {"k": args.k, "cycles": args.cycles, "rounds": args.rounds, "batch_size": args.batch_size,
                     "max_length": args.max_length, "lr": args.lr},
        "machine": {**machine, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
        if hasattr(os, "getloadavg") else machine,
        "results": summary,
        "target": {"sophia_gnb_ratio_vs_adamw_max": 1.10,
                   "met": (summary["sophia_gnb"]["ratio_vs_adamw"] <= 1.10
                           if "sophia_gnb" in summary and "adamw" in summary else None)},
    }
    print(json.dumps(report, indent=1, sort_keys=True))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
