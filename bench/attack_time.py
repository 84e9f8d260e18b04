"""Wall time the robustness attacks add to a `soul reproduce` grid (issue: ≤ 3 min on the demo, 2-core CPU).

The attacks' cost does not depend on what a model has learned (only on its size, the questions, the
relearning steps and, a little, on how soon generations stop), so the base model stands in for the
target, the retain model and every unlearned model. Measured: `attack_references` (the target's and retain
model's side, once per grid) and one `run_attacks` call (per unlearned model, median of ``--rounds``), then

    grid_estimate_s = references_s + runs × per_model_s

with ``--runs`` the unlearned models of the preset's grid (objectives × optimizers, + 1 for one-shot
influence). Data, forget split, prompt format and evaluation settings come from the preset (default
``demo``); the attacks from its ``attacks:`` key when it has one, else ``--attacks`` (JSON).

    .venv/bin/python bench/attack_time.py --preset demo --out bench/results/attack_time.json
    .venv/bin/python bench/attack_time.py --model tiny:llama --preset tiny --out /tmp/a.json   # smoke run
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

DEFAULT_ATTACKS = {"relearn": {}, "quantize": {"bits": [4]}, "paraphrase": None}
TARGET_S = 180.0


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def _grid_runs(preset: dict[str, Any]) -> int:
    unlearn = preset.get("unlearn") or {}
    n = len(unlearn.get("objectives") or {}) * len(unlearn.get("optimizers") or {})
    return n + (1 if preset.get("influence") else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the preset's model; 'tiny:llama' for a smoke run")
    p.add_argument("--preset", default="demo")
    p.add_argument("--attacks", default=None, help=f"JSON attacks config (default: preset's, else {DEFAULT_ATTACKS})")
    p.add_argument("--runs", type=int, default=None, help="unlearned models in the grid (default: the preset's)")
    p.add_argument("--rounds", type=int, default=1, help="run_attacks calls timed (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from soul.attack import attack_references, run_attacks
    from soul.data import bundled_dir, load_split
    from soul.io import write_json_atomic
    from soul.pipeline import load_preset

    preset = load_preset(args.preset)
    spec = args.model or preset.get("model", "smollm2-135m")
    if spec.startswith("tiny:"):
        from soul.testing import tiny_model

        model, tokenizer = tiny_model(spec.split(":", 1)[1])
    else:
        from soul.models import load_model

        model, tokenizer = load_model(spec)
    data_cfg = preset.get("data") or {}
    source = str(data_cfg.get("source", "bundled"))
    if source == "bundled" and data_cfg.get("bundled"):
        source = str(bundled_dir(**data_cfg["bundled"]))
    forget_split = preset.get("forget_split", "forget10")
    data = {forget_split: load_split(source, forget_split)}
    ev = dict(preset.get("eval") or {})
    eval_kwargs = {"batch_size": ev.get("batch_size", 16), "generation_batch_size": ev.get("generation_batch_size"),
                   "max_new_tokens": ev.get("max_new_tokens", 200),
                   "prompt_format": ev.get("prompt_format", preset.get("prompt_format", "auto"))}
    attacks = json.loads(args.attacks) if args.attacks else preset.get("attacks") or DEFAULT_ATTACKS
    runs = args.runs if args.runs is not None else _grid_runs(preset)

    started = time.perf_counter()
    refs = attack_references({"target": (model, tokenizer), "retain": (model, tokenizer)}, tokenizer,
                             attacks_cfg=attacks, data=data, forget_split=forget_split, eval_kwargs=eval_kwargs)
    references_s = time.perf_counter() - started
    per_model, sections = [], {}
    for _ in range(args.rounds):
        started = time.perf_counter()
        result = run_attacks(model, tokenizer, attacks_cfg=attacks, data=data, forget_split=forget_split,
                             eval_kwargs=eval_kwargs, reference_results=refs)
        per_model.append(time.perf_counter() - started)
        sections = {k: v.get("wall_time_s") for k, v in result.items() if isinstance(v, dict) and k != "meta"}
    per_model_s = statistics.median(per_model)
    estimate = references_s + runs * per_model_s
    report = {
        "benchmark": "attack_time", "model": spec, "preset": args.preset, "forget_split": forget_split,
        "n_forget": len(data[forget_split]), "attacks": result["meta"]["config"], "eval": result["meta"]["eval"],
        "references_s": references_s, "per_model_s": per_model_s, "per_model_rounds_s": per_model,
        "per_model_sections_s": sections, "runs": runs, "grid_estimate_s": estimate,
        "target": {"grid_estimate_s_max": TARGET_S, "met": estimate <= TARGET_S}, "machine": machine_info(),
    }
    text = json.dumps(report, indent=1)
    print(text)
    write_json_atomic(args.out, report)
    print(f"bench/attack_time.py: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
