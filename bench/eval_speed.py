"""Questions per second of the full TOFU metric set: batched evaluation vs the one-question-at-a-time reference.

Both implementations compute the same numbers (probability, ROUGE-L of greedy generations, truth ratio,
normalised probability, MIA scores, memorisation) on the same records; the benchmark also reports how far
apart they are (max absolute and max scaled difference over every per-question number, see `compare`;
generations compared exactly).

* ``reference``: one sequence per forward pass, no padding, no sharing (`score_reference`), and
  ``model.generate`` on one prompt at a time (`generate_reference`): the straightforward implementation.
* ``batched``: the production path (`evaluate`'s default): every sequence packed into prefix trees so each
  shared prefix (prompt template, question, an answer's frame) runs once, prompt caches filled the same way,
  and a batched greedy loop (``2 × --batch-size`` rows) that drops finished rows.
* ``batched_plain`` (``--with-plain``): the earlier fast path (whole sequences in batches, ``model.generate``),
  to show what prefix sharing adds.

Each prompt format (``--prompt-formats``; the demo uses ``plain``: ``Question: …\nAnswer:``) is timed in
``--rounds`` interleaved rounds (reference, batched, reference, …) so load from other processes falls on both;
the medians of wall time and of this process's CPU time are reported (with one thread, CPU time is far less
sensitive to other processes than wall time), and the speed-up of each.

    .venv/bin/python bench/eval_speed.py --n-per-split 8 --max-new-tokens 32 --threads 1 --rounds 3 \
        --out bench/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int, int]:
    """Over the per-question numbers of two results: (max |a − b|, max |a − b| / max(1, |b|), numbers compared,
    strings differing).

    The second is the criterion: an absolute tolerance on numbers in [−1, 1] (probabilities, ROUGE, truth-ratio
    statistics) and a relative one on unbounded numbers (a raw truth ratio p_false/p_true of 32, MIA scores),
    whose float32 rounding scales with their size: both implementations' per-token log-probabilities are
    within ~3e-5 of each other however the batches are laid out, and a ratio of 32 turns a 4e-6 difference
    of log-ratio into 1.3e-4."""
    worst, worst_scaled, n, differ = 0.0, 0.0, 0, 0
    for key, entry in a.items():
        if key == "meta" or not isinstance(entry, dict):
            continue
        for field in ("value_by_index", "holdout_value_by_index"):
            for idx, values in entry.get(field, {}).items():
                for name, x in values.items():
                    y = b[key][field][idx][name]
                    if isinstance(x, float):
                        worst, n = max(worst, abs(x - y)), n + 1
                        worst_scaled = max(worst_scaled, abs(x - y) / max(1.0, abs(y)))
                    elif x != y:
                        differ += 1
    return worst, worst_scaled, n, differ


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other processes sharing the machine
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bundled")
    p.add_argument("--n-per-split", type=int, default=8, help="questions taken from each of forget, retain, "
                   "real authors, world facts (and holdout records for MIA)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--generation-batch-size", type=int, default=None,
                   help="rows per greedy decoding step (default: evaluate's, 2 × --batch-size)")
    p.add_argument("--prompt-formats", nargs="+", default=["plain", "chat"], choices=["plain", "chat"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; medians are reported")
    p.add_argument("--with-plain", action="store_true", help="also time the batched path without prefix sharing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the JSON result here too (atomically)")
    args = p.parse_args(argv)

    import torch

    from soul.data import load_split
    from soul.eval import evaluate, write_json_atomic
    from soul.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n_per_split
    splits = {role: load_split(args.data, name)[:n] for role, name in (
        ("forget", "forget10_perturbed"), ("retain", "retain_perturbed"),
        ("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed"))}
    holdout = load_split(args.data, "holdout10")[:n]
    questions = sum(len(v) for v in splits.values())
    model, tokenizer = load_model(args.model)
    model.eval()
    machine = machine_info()
    impls = ["reference", "batched"] + (["batched_plain"] if args.with_plain else [])
    evaluate(model, tokenizer, {"forget": splits["forget"][:2]}, max_new_tokens=2)  # warm-up (lazy init)
    by_format = {}
    for fmt in args.prompt_formats:
        kw = {"holdout": holdout, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "generation_batch_size": args.generation_batch_size, "prompt_format": fmt}
        wall: dict[str, list[float]] = {i: [] for i in impls}
        cpu: dict[str, list[float]] = {i: [] for i in impls}
        results = {}
        for _ in range(args.rounds):
            for impl in impls:
                t0, c0 = time.perf_counter(), time.process_time()
                results[impl] = evaluate(model, tokenizer, splits, implementation=impl, **kw)
                wall[impl].append(time.perf_counter() - t0)
                cpu[impl].append(time.process_time() - c0)
                print(f"{fmt} {impl}: {wall[impl][-1]:.1f} s wall, {cpu[impl][-1]:.1f} s cpu", file=sys.stderr)
        entry: dict[str, Any] = {"prompt_format": fmt}
        for impl in impls:
            w, c = statistics.median(wall[impl]), statistics.median(cpu[impl])
            entry[impl] = {"wall_seconds": [round(x, 2) for x in wall[impl]], "median_wall_seconds": round(w, 3),
                           "median_cpu_seconds": round(c, 3), "questions_per_second": round(questions / w, 3)}
            if impl != "reference":
                worst, worst_scaled, compared, differ = compare(results[impl], results["reference"])
                entry[impl].update({
                    "speedup_wall": round(statistics.median(wall["reference"]) / w, 2),
                    "speedup_cpu": round(statistics.median(cpu["reference"]) / c, 2),
                    "max_abs_diff_vs_reference": worst, "max_scaled_diff_vs_reference": worst_scaled,
                    "numbers_compared": compared,
                    "strings_differing": differ})
        by_format[fmt] = entry
    report = {
        "model": args.model, "questions": questions, "holdout_records": len(holdout),
        "sequences_scored_per_run": sum(len(r["perturbed_answer"]) + 1 + ("paraphrased_answer" in r and role in
                                        ("forget", "retain")) for role, recs in splits.items() for r in recs)
        + len(holdout),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "generation_batch_size": results["batched"]["meta"]["generation_batch_size"], "rounds": args.rounds,
        "target": "speedup >= 5 with max |a - b| / max(1, |b|) <= 1e-4 and no differing strings",
        "by_prompt_format": by_format,
        "target_met": {fmt: e["batched"]["speedup_wall"] >= 5 and e["batched"]["max_scaled_diff_vs_reference"] <= 1e-4
                       and e["batched"]["strings_differing"] == 0 for fmt, e in by_format.items()},
        "machine": {**machine, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
        if hasattr(os, "getloadavg") else machine,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
