"""K-FAC / EK-FAC cost on a model: factor fit time, inverse-apply time, peak RSS, factor bytes, and the time of
one Kronecker-Sophia step (no refresh) against one diagonal Sophia step.

Data: the first ``--n`` (64) records of the bundled ``retain90`` split in the plain ``Question: … Answer:``
format, batches of ``--batch-size``. For each kind (``--kinds``, default kfac and ekfac):

* ``fit_s``: ``soul.optim.fit_kfac(model, batches, kind=..., fisher="mc")`` over all N sequences (one label
  draw), wall time; ``factor_bytes``: the curvature's ``nbytes()``;
* ``inverse_apply_s``: median of ``--repeats`` calls of ``inverse_apply`` (default relative damping) on a
  random vector over every trainable parameter;
* ``peak_rss_mb``: ``ru_maxrss`` of this process after the fits (model load included) and at the end.

Step timing: the same batch (the first ``--batch-size`` records), the same model, forward + backward
(mean answer-token NLL) + ``optimizer.step()``, for ``SophiaG`` (GNB) and ``KroneckerSophia`` (each kind),
each with its curvature estimated once beforehand and ``hessian_interval`` large, so no timed step refreshes
it; ``--steps`` timed steps per optimizer after ``--warmup``, interleaved (order alternating), median
reported; lr 1e-7 so the weights barely move. ``step_ratio`` = Kronecker / diagonal.

Targets (issue 21): fit ≤ 180 s, peak RSS ≤ 6 GB, step ratio ≤ 1.3. ``--tiny`` runs the same on soul.testing's
tiny random Llama (a check that the script works, in seconds; its numbers mean nothing).

    .venv/bin/python bench/kfac.py [--model smollm2-135m | --tiny] [--n 64] [--batch-size 8] \\
        [--kinds kfac ekfac] [--steps 5] [--threads T] --out bench/results/kfac.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # unlearn_step's machine_info, run from anywhere

from soul.io import write_json_atomic
from unlearn_step import machine_info

TARGETS = {"fit_s_max": 180.0, "peak_rss_mb_max": 6 * 1024.0, "step_ratio_max": 1.3}


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def batches_of(tokenizer: Any, n: int, batch_size: int, max_length: int | None) -> list[dict]:
    from soul.data import load_split
    from soul.data.format import QACollator
    from soul.train.config import make_config
    from soul.train.loop import encode_records

    records = load_split("bundled", "retain90")[:n]
    cfg = make_config(prompt_format="plain", max_length=max_length)
    feats = encode_records(records, tokenizer, cfg)
    collate = QACollator(tokenizer)
    return [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]


def main(argv: list[str] | None = None) -> dict:
    import torch

    from soul.losses import answer_nll
    from soul.optim import build_optimizer, estimate_hessian, fit_kfac
    from soul.train.loop import param_groups

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory (soul.models.load_model)")
    parser.add_argument("--tiny", action="store_true", help="soul.testing's tiny random Llama instead of --model")
    parser.add_argument("--n", type=int, default=64, help="retain sequences the factors are fitted on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--kinds", nargs="+", default=["kfac", "ekfac"], choices=["kfac", "ekfac"])
    parser.add_argument("--repeats", type=int, default=3, help="inverse_apply calls (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps each (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="bench/results/kfac.json")
    args = parser.parse_args(argv)
    for name in ("n", "batch_size", "repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()

    start = time.perf_counter()
    if args.tiny:
        from soul.testing import tiny_model

        model, tokenizer = tiny_model("llama")
        model_name = "tiny-llama (soul.testing)"
    else:
        from soul.models import load_model

        model, tokenizer = load_model(args.model)
        model_name = args.model
    model.float()
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_mb()
    batches = batches_of(tokenizer, args.n, args.batch_size, args.max_length)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)

    fits: dict[str, dict[str, Any]] = {}
    for kind in args.kinds:
        t0 = time.perf_counter()
        curv = fit_kfac(model, batches, kind=kind, fisher="mc", seed=0)
        fit_s = time.perf_counter() - t0
        vec = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in curv.params]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            curv.inverse_apply(vec)
            times.append(time.perf_counter() - t0)
        fits[kind] = {"fit_s": fit_s, "inverse_apply_s": statistics.median(times), "factor_bytes": curv.nbytes(),
                      "blocks": len(curv.blocks), "diagonal_params": len(curv.diag)}
        del curv, vec
    rss_after_fits = peak_rss_mb()

    # -- one step: forward + backward + optimizer.step(), no curvature refresh
    batch = batches[0]
    optimizers = {"sophia_gnb": build_optimizer("sophia", param_groups(model, 0.0), lr=1e-7, estimator="gnb",
                                                hessian_interval=10**9)}
    for kind in args.kinds:
        optimizers[f"sophia_{kind}"] = build_optimizer("sophia", param_groups(model, 0.0), lr=1e-7, estimator=kind,
                                                       hessian_interval=10**9)
    for opt in optimizers.values():
        estimate_hessian(model, batch, opt, generator=torch.Generator().manual_seed(0))
    model.train()
    step_times: dict[str, list[float]] = {name: [] for name in optimizers}
    order = list(optimizers)
    for i in range(args.warmup + args.steps):
        for name in order if i % 2 == 0 else order[::-1]:
            opt = optimizers[name]
            assert not opt.hessian_due()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            answer_nll(model, batch).backward()
            opt.step()
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                step_times[name].append(elapsed)
    step_s = {name: statistics.median(v) for name, v in step_times.items()}
    clip = {name: opt.last_stats.get("clip_fraction") for name, opt in optimizers.items()}
    peak = peak_rss_mb()

    kinds_out = {}
    for kind, f in fits.items():
        ratio = step_s[f"sophia_{kind}"] / step_s["sophia_gnb"]
        kinds_out[kind] = {
            **f, "fit_s_target": TARGETS["fit_s_max"], "fit_met": f["fit_s"] <= TARGETS["fit_s_max"],
            "step_s": step_s[f"sophia_{kind}"], "step_ratio_vs_diagonal": ratio,
            "step_ratio_target": TARGETS["step_ratio_max"], "step_ratio_met": ratio <= TARGETS["step_ratio_max"],
        }
    result = {
        "benchmark": "kfac",
        "model": model_name,
        "parameters": sum(p.numel() for p in trainable),
        "n_sequences": sum(len(b["input_ids"]) for b in batches),
        "batch_size": args.batch_size,
        "loss_tokens": tokens,
        "prompt_format": "plain",
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "kinds": kinds_out,
        "diagonal_sophia_step_s": step_s["sophia_gnb"],
        "step_s_all": step_times,
        "clip_fraction_last_step": clip,
        "peak_rss_mb": {"after_load": rss_after_load, "after_fits": rss_after_fits, "end": peak,
                        "target": TARGETS["peak_rss_mb_max"], "met": peak <= TARGETS["peak_rss_mb_max"]},
        "machine": machine,
        "note": "steps interleaved (order alternating), median; the machine may be shared with other processes",
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}, indent=2))
    return result


if __name__ == "__main__":
    main()
