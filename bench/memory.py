"""Peak resident memory of a GradDiff unlearning run with AdamW vs Sophia(GNB) vs Sophia(Hutchinson).

Each configuration runs in a fresh Python process (``--child NAME``) so that peaks do not mix: the child
loads the model (``--model``, default the bundled SmolLM2-135M), records its resident set size, runs
`soul.train.unlearn` for ``--steps`` steps (Hessian interval ``--k``; the first step always estimates the
Hessian, so a run of ≥ 1 step covers the estimator's peak), and reports

    peak_rss_mb      = ru_maxrss of the child (the whole run, model load included)
    train_delta_mb   = peak_rss_mb − RSS after loading the model (what training added: optimizer state,
                       gradients, activations, the estimator's extra graph)
    cuda_peak_mb     = torch.cuda.max_memory_allocated, when a GPU is used

and the parent writes the ratios to AdamW; target: Sophia(GNB) peak ≤ 1.05× AdamW's. (Sophia keeps two
state tensors per parameter, m and h, exactly as many as AdamW's exp_avg / exp_avg_sq.)

    .venv/bin/python bench/memory.py --steps 3 --out bench/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from soul.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unlearn_step import CONFIGS, load_records, machine_info


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_mb()


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process; returns its memory figures."""
    import torch

    from soul.models import load_model
    from soul.train import unlearn

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_records(args.data, args.forget_split, args.retain_split)
    model, tokenizer = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    after_load = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    unlearn(model, tokenizer, data=data, forget_split="forget", retain_split="retain", objective="graddiff",
            max_steps=args.steps, batch_size=args.batch_size, hessian_interval=args.k, warmup_steps=0,
            mixed_precision="no", max_length=args.max_length, progress=False, lr=1e-5, **CONFIGS[args.child])
    result = {"config": args.child, "rss_after_load_mb": after_load, "peak_rss_mb": _peak_mb(),
              "seconds": time.perf_counter() - t0,
              "params": sum(p.numel() for p in model.parameters())}
    result["train_delta_mb"] = result["peak_rss_mb"] - after_load
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bundled")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--retain-split", default="retain90")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--k", type=int, default=10, help="Hessian interval")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")

    if args.child:  # inside the fresh process: one run, JSON on the last stdout line
        print(json.dumps(child(args)))
        return 0

    machine = machine_info()
    passthrough = ["--model", args.model, "--data", args.data, "--forget-split", args.forget_split,
                   "--retain-split", args.retain_split, "--steps", str(args.steps), "--k", str(args.k),
                   "--batch-size", str(args.batch_size)]
    if args.max_length:
        passthrough += ["--max-length", str(args.max_length)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, Any]] = {}
    for name in args.configs:
        print(f"[memory] {name}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", name, *passthrough], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"[memory] the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "adamw" in results:
        base = results["adamw"]
        for r in results.values():
            r["peak_ratio_vs_adamw"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            r["train_delta_ratio_vs_adamw"] = (r["train_delta_mb"] / base["train_delta_mb"]
                                               if base["train_delta_mb"] > 0 else None)
            if "cuda_peak_mb" in r:
                r["cuda_peak_ratio_vs_adamw"] = r["cuda_peak_mb"] / base["cuda_peak_mb"]
    report = {
        "benchmark": "memory",
        "objective": "graddiff",
        "model": args.model,
        "settings": {"steps": args.steps, "k": args.k, "batch_size": args.batch_size, "max_length": args.max_length},
        "machine": machine,
        "results": results,
        "target": {"sophia_gnb_peak_ratio_vs_adamw_max": 1.05,
                   "met": (results["sophia_gnb"]["peak_ratio_vs_adamw"] <= 1.05
                           if "sophia_gnb" in results and "adamw" in results else None)},
    }
    print(json.dumps(report, indent=1, sort_keys=True))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
