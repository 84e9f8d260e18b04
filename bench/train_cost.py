"""What one training step of a model costs on this machine, by batch shape: the number every CPU preset is
sized by (copyright-cpu, detox-cpu, tofu-cpu, the demo).

For each ``B×T`` shape (random token ids, the last half of each row as loss tokens, float32, ``model.train()``)
the forward pass, the backward pass and one ``torch.optim.AdamW`` step are timed separately, ``--repeats``
times after one warm-up, medians reported, with

    forward_gflops_per_s   = 2 · N · B·T / forward_s            (N = parameter count; the usual 2N FLOP/token)
    backward_gflops_per_s  = 4 · N · B·T / backward_s
    ms_per_token           = (forward_s + backward_s) / (B·T) · 1000

and, for one 8×48 step, the share of wall time spent in matrix products (torch.profiler, self CPU time of
``aten::mm``/``aten::addmm``/``aten::bmm``): when that share is ~90 % the step is compute-bound and only
fewer tokens make it cheaper. The CPU model and torch threads are recorded: the numbers mean little without
them (a shared VM's speed can also vary from one day to the next).

    .venv/bin/python bench/train_cost.py --out bench/results/train_cost.json [--model smollm2-135m | --tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # unlearn_step's machine_info, run from anywhere

from kfac import cpu_model
from soul.io import write_json_atomic
from unlearn_step import machine_info

SHAPES = ((2, 48), (8, 48), (4, 128), (8, 96))
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def time_shape(model: Any, opt: Any, batch: int, length: int, repeats: int, vocab: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    rows: list[tuple[float, float, float]] = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if r:  # the first pass allocates and warms up
            rows.append((t1 - t0, t2 - t1, t3 - t2))
    fwd, bwd, step = (statistics.median(c) for c in zip(*rows))
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * length
    return {"batch": batch, "length": length, "tokens": tokens, "forward_s": fwd, "backward_s": bwd, "adamw_s": step,
            "forward_gflops_per_s": 2 * n_params * tokens / fwd / 1e9,
            "backward_gflops_per_s": 4 * n_params * tokens / bwd / 1e9,
            "ms_per_token": (fwd + bwd) / tokens * 1000}


def matmul_share(model: Any, batch: int, length: int, vocab: int) -> float:
    import torch

    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile() as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total if total else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory (soul.models.load_model)")
    parser.add_argument("--tiny", action="store_true", help="soul.testing's tiny random Llama (checks the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from soul.testing import tiny_llama

        (model, _), name = tiny_llama(), "tiny:llama"
        shapes: tuple[tuple[int, int], ...] = ((2, 16), (4, 16))
    else:
        from soul.models import load_model

        model, _ = load_model(args.model)
        name, shapes = args.model, SHAPES
    model = model.float().train()
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    results: dict[str, Any] = {
        "model": name, "parameters": sum(p.numel() for p in model.parameters()), "cpu": cpu_model(),
        "machine": machine_info(), "dtype": "float32", "repeats": args.repeats,
        "shapes": [time_shape(model, opt, b, t, args.repeats, vocab) for b, t in shapes]}
    b, t = shapes[1]
    results["matmul_share"] = {"batch": b, "length": t, "share": matmul_share(model, b, t, vocab)}
    write_json_atomic(args.out, results)
    for row in results["shapes"]:
        print(f"{row['batch']}x{row['length']}: forward {row['forward_s']:.2f} s, backward {row['backward_s']:.2f} s, "
              f"AdamW {row['adamw_s']:.2f} s, {row['ms_per_token']:.1f} ms/token, "
              f"{row['forward_gflops_per_s']:.0f}/{row['backward_gflops_per_s']:.0f} GFLOP/s fwd/bwd")
    print(f"matrix products: {results['matmul_share']['share']:.0%} of a {b}x{t} forward + backward")
    return results


if __name__ == "__main__":
    main()
