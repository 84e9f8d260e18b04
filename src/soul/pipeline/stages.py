"""The pipeline's stages, in the order `soul.pipeline.reproduce` runs them:

1. `reference_models` — data, then the target (and, for TOFU, the retain) model: the preset's ready model,
   or a fine-tune of the base cached under ``<soul cache>/finetuned/<role>-<key>`` where ``key = sha256(
   base-model fingerprint, data hash, training config)``; fine-tuned once with the preset's ``seed``;
2. `unlearning_run` / `influence_run` — one unlearning run (objective × optimizer entry × seed) or one
   one-shot influence row, each returning the model and a run record (wall time, steps, config, diagnostics);
3. `evaluate_run` / `evaluate_reference` — the task's metrics (reference models cached by content hash);
4. the report, written by `soul.report.write_report` from the run records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soul.columns import CURVATURE_NAMES
from soul.io import write_json_atomic, write_text_atomic
from soul.pipeline.common import CACHE_VERSION, Progress, hash_records, load, model_fingerprint, sha
from soul.pipeline.preset_types import Preset
from soul.report.diagnostics import run_diagnostics


# ------------------------------------------------------------------------------------ 1. reference models
def _reference_model(role: str, preset: Preset, base: str, base_fp: str, data: dict[str, Any],
                     progress: Progress) -> tuple[str, str, float | None]:
    """``(path, fingerprint, wall_time_s)`` of reference model `role` ("target" or "retain")."""
    from soul.paths import cache_dir

    task = preset.task_impl
    ref = getattr(preset, role)
    if ref.model:
        progress.say(f"{role} model: using {ref.model} as given")
        return ref.model, model_fingerprint(ref.model), None
    if not task.finetunes(role, preset):
        progress.say(f"{role} model: using {preset.model} as given")
        return base, base_fp or model_fingerprint(base), None
    split = task.reference_split(role, preset)
    ft_cfg = dict(preset.target.finetune or {})
    if role == "retain":
        ft_cfg.update(preset.retain.finetune or {})
    ft_cfg.setdefault("seed", preset.seed)
    ft_cfg.setdefault("prompt_format", preset.prompt_format)
    key = sha({"v": CACHE_VERSION, "base": base_fp, "data": hash_records(data[split]), "config": ft_cfg,
               "dtype": preset.dtype})
    out = cache_dir() / "finetuned" / f"{role}-{key[:20]}"
    from soul import safety

    with safety.dir_lock(out, wait_s=safety.CACHE_WAIT_S):  # one process fills a cache entry, others wait for it
        return _cached_finetune(role, out, key, base, split, ft_cfg, preset, data, progress)


def _cached_finetune(role: str, out: Path, key: str, base: str, split: str, ft_cfg: dict[str, Any],
                     preset: Preset, data: dict[str, Any], progress: Progress) -> tuple[str, str, float | None]:
    from soul.train import finetune

    run_json = out / "run.json"
    if (out / "config.json").is_file() and run_json.is_file():
        wall = json.loads(run_json.read_text()).get("wall_time_s")
        progress.say(f"{role} model: cached at {out} (skipping fine-tuning)")
        return str(out), key, wall
    progress.say(f"{role} model: fine-tuning {base} on {split} ({len(data[split])} records) -> {out}")
    model, tokenizer = load(base, preset)
    # overwrite: a killed earlier fill of this cache entry (soul's own) is replaced.
    _, record = finetune(model, tokenizer, data={split: data[split]}, split=split, out_dir=out, overwrite=True,
                         progress=preset.progress_bars, **ft_cfg)
    del model
    return str(out), key, record.get("wall_time_s")


def reference_models(preset: Preset, out: Path, progress: Progress, base: str,
                     check_data: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Stage 1 and the reference half of stage 3: the data, the task's reference models and their (cached)
    evaluations. Returns ``{"data", "target_path", "target_fingerprint" (a content hash of the target),
    "reference" (the retain model's results or None), "runs" (one record per reference model)}``. `check_data` sees the data before any model is trained."""
    task = preset.task_impl
    roles = task.reference_roles
    progress.stage(1, f"{preset.task} data and reference models ({', '.join(roles)})")
    data = task.load_data(preset)
    if check_data is not None:
        check_data(data)
    needs_base = any(task.finetunes(r, preset) or not getattr(preset, r).model for r in roles)
    base_fp = model_fingerprint(base) if needs_base else ""
    models = {role: _reference_model(role, preset, base, base_fp, data, progress) for role in roles}
    progress.stage(2, f"evaluating the reference models ({', '.join(reversed(roles))})")
    results: dict[str, dict[str, Any]] = {}
    reference = None
    for role in reversed(roles):  # the retain model first: it is every other model's reference
        path, fp, _ = models[role]
        results[role] = evaluate_reference(path, fp, preset, data, reference, out / "eval" / f"{role}.json",
                                           progress, role)
        if role == "retain":
            reference = results[role]
    runs = [{"name": role, "role": role, "model": models[role][0], "wall_time_s": models[role][2],
             "metrics": results[role]} for role in roles]
    return {"data": data, "target_path": models["target"][0], "target_fingerprint": models["target"][1],
            "reference": reference, "runs": runs}


# ------------------------------------------------------------------------------------------ 2. unlearning
def unlearning_run(spec: dict[str, Any], target_path: str, preset: Preset, data: dict[str, Any], run_dir: Path,
                   keep_model: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Unlearn with one spec of `soul.pipeline.grid`; returns (model, tokenizer, run record). The per-step log
    is collected through the loop's step callback and written to ``run_dir/train_log.jsonl``; the record's
    ``diagnostics`` come from the loop's own summary when it has one, else from that log.

    ``report_to`` (trackers, `soul.train.trackers`) is handled here rather than by the loop, which needs an
    output directory the run usually has not (models are discarded): each run logs its step lines into its
    own ``run_dir/trackers``, under the run's name, so runs never share a tracker directory."""
    from soul.train import unlearn
    from soul.train.trackers import TrackerLog, check_report_to

    forget, retain = preset.task_impl.splits(preset)
    config = dict(spec["config"])
    trackers = TrackerLog(check_report_to(config.pop("report_to", None)), run_dir / "trackers",
                          run_name=spec["name"], config=spec["config"])
    model, tokenizer = load(target_path, preset)
    log: list[dict] = []

    def on_step_end(step: int, rec: dict) -> None:
        log.append(dict(rec))
        trackers.log(rec)

    t0 = time.perf_counter()
    try:
        model, record = unlearn(model, tokenizer, data={forget: data[forget], retain: data[retain]},
                                forget_split=forget, retain_split=retain, objective=spec["objective"],
                                optimizer=spec["optimizer_type"], out_dir=run_dir / "model" if keep_model else None,
                                overwrite=True, on_step_end=on_step_end,
                                progress=preset.progress_bars, **config)
    finally:
        trackers.finish()
    wall = time.perf_counter() - t0
    write_text_atomic(run_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    run = {"name": spec["name"], "group": spec["group"], "seed": spec["seed"], "role": "unlearned",
           "objective": spec["objective"], "optimizer": spec["optimizer"], "optimizer_type": spec["optimizer_type"],
           "wall_time_s": wall, "steps": record.get("steps"), "config": spec["config"],
           "diagnostics": run_diagnostics(record.get("diagnostics"), log, spec["config"]),
           "log": str(run_dir / "train_log.jsonl")}
    if trackers.names:
        run["trackers"] = str(run_dir / "trackers")
    return model, tokenizer, run


def influence_run(target_path: str, preset: Preset, data: dict[str, Any],
                  name: str = "influence") -> tuple[Any, Any, dict[str, Any]]:
    """One-shot influence unlearning of the forget split (one damped Newton ascent step, with the curvature of
    the row's ``hessian``): row `name` of `Preset.influence_runs`. With several rows each is labelled by its
    estimator in the table ("Influence (one-shot, K-FAC)"); a single row keeps the plain label."""
    from soul.data import QACollator, QADataset
    from soul.optim import influence_unlearn

    rows = preset.influence_runs
    cfg = dict(rows[name])
    batch_size = int(cfg.pop("batch_size", 4))
    max_batches = cfg.pop("max_retain_batches", None)
    forget, retain = preset.task_impl.splits(preset)
    model, tokenizer = load(target_path, preset)
    collate = QACollator(tokenizer)

    def batches(records: list[dict], limit: int | None) -> list[dict]:
        ds = QADataset(records, tokenizer, prompt_format=preset.prompt_format)
        out = [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]
        out = out[:limit] if limit else out
        return [{k: v.to(model.device) if hasattr(v, "to") else v for k, v in b.items()} for b in out]

    import torch

    # The GNB label draws get their own generator: without it they would depend on whatever ran before in
    # the process (a fresh run fine-tunes first), and the one-shot step is sensitive to the draw.
    generator = torch.Generator(device=model.device).manual_seed(preset.seed)
    t0 = time.perf_counter()
    model.train()
    model, stats = influence_unlearn(model, batches(data[forget], None), batches(data[retain], max_batches),
                                     generator=generator, **cfg)
    model.eval()
    run = {"name": name, "role": "influence", "wall_time_s": time.perf_counter() - t0,
           "config": dict(rows[name]), "stats": stats}
    if len(rows) > 1:
        hessian = rows[name].get("hessian", "gnb")
        label = f"Influence (one-shot, {CURVATURE_NAMES.get(hessian, hessian)})"
        same = [n for n, c in rows.items() if c.get("hessian", "gnb") == hessian]
        run["label"] = label if len(same) == 1 else f"{label} {name}"
    return model, tokenizer, run


# ------------------------------------------------------------------------------------------ 3. evaluation
def evaluate_run(model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None, out: Path | None) -> dict[str, Any]:
    """The task's metrics for one model, written to `out` (atomically) when given."""
    results = preset.task_impl.evaluate(model, tokenizer, preset, data, reference)
    if out is not None:
        write_json_atomic(out, results)
    return results


def evaluate_reference(path: str, fingerprint: str, preset: Preset, data: dict[str, Any],
                       reference: dict[str, Any] | None, out: Path, progress: Progress, role: str) -> dict[str, Any]:
    """Evaluate a reference model once per (model, eval settings, eval data, reference); cached as JSON."""
    from soul.paths import cache_dir

    task = preset.task_impl
    key = sha({"v": CACHE_VERSION, "model": fingerprint, **task.eval_cache_key(preset, data, reference)})
    cached = cache_dir() / "evals" / f"{key[:24]}.json"
    if cached.is_file():
        progress.say(f"evaluating {role}: cached results {cached}")
        results = json.loads(cached.read_text())
    else:
        progress.say(f"evaluating {role}")
        model, tokenizer = load(path, preset)
        results = evaluate_run(model, tokenizer, preset, data, reference, None)
        del model
        write_json_atomic(cached, results)
    task.prepare_reference(role, results)
    write_json_atomic(out, results)
    return results
