"""Questions per second of the full TOFU metric set: batched evaluation vs the one-question-at-a-time reference.

Both implementations compute the same numbers (probability, ROUGE-L of greedy generations, truth ratio,
normalised probability, MIA scores, memorisation) on the same records; the benchmark also reports how far
apart they are (max absolute difference over every per-question number; generations compared exactly).

    .venv/bin/python bench/eval_speed.py --n-per-split 8 --max-new-tokens 32 --out bench/eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int, int]:
    """(max |a − b| over per-question floats, number of numbers compared, number of differing strings)."""
    worst, n, differ = 0.0, 0, 0
    for key, entry in a.items():
        if key == "meta" or not isinstance(entry, dict):
            continue
        for field in ("value_by_index", "holdout_value_by_index"):
            for idx, values in entry.get(field, {}).items():
                for name, x in values.items():
                    y = b[key][field][idx][name]
                    if isinstance(x, float):
                        worst, n = max(worst, abs(x - y)), n + 1
                    elif x != y:
                        differ += 1
    return worst, n, differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="bundled")
    p.add_argument("--n-per-split", type=int, default=8, help="questions taken from each of forget, retain, "
                   "real authors, world facts (and holdout records for MIA)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
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
    kw = {"holdout": holdout, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    evaluate(model, tokenizer, {"forget": splits["forget"][:2]}, max_new_tokens=2)  # warm-up (lazy init)
    timings, results = {}, {}
    for impl in ("batched", "reference"):
        t0 = time.perf_counter()
        results[impl] = evaluate(model, tokenizer, splits, implementation=impl, **kw)
        timings[impl] = time.perf_counter() - t0
    worst, compared, differ = compare(results["batched"], results["reference"])
    report = {
        "model": args.model, "questions": questions, "holdout_records": len(holdout),
        "sequences_scored_per_run": sum(len(r["perturbed_answer"]) + 1 + ("paraphrased_answer" in r and role in
                                        ("forget", "retain")) for role, recs in splits.items() for r in recs)
        + len(holdout),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "batched_seconds": round(timings["batched"], 3), "reference_seconds": round(timings["reference"], 3),
        "batched_questions_per_second": round(questions / timings["batched"], 3),
        "reference_questions_per_second": round(questions / timings["reference"], 3),
        "speedup": round(timings["reference"] / timings["batched"], 2),
        "max_abs_diff": worst, "numbers_compared": compared, "strings_differing": differ,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        write_json_atomic(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
