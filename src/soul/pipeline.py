"""The end-to-end job: `reproduce` SOUL's first-order vs second-order comparison, and `sweep` its settings.

`reproduce(preset, out_dir)` runs four stages:

1. **fine-tune** the *target* model on ``full`` and the *retain* model on the retain split (or use ready
   models named in the preset). Each is cached under ``<soul cache>/finetuned/<role>-<key>`` where
   ``key = sha256(base-model fingerprint, data hash, training config)``, so a rerun skips them;
2. **unlearn** the forget split from the target with every objective × optimizer of the preset at the same
   step budget, plus one-shot influence unlearning (`soul.optim.influence_unlearn`);
3. **evaluate** target, retain and every unlearned model (TOFU metrics + MIA) with the retain model's
   per-question results as the forget-quality reference (target/retain results are cached too);
4. **report**: `soul.report.write_report` (table, figures, report.html, results.json).

`sweep(preset, out_dir)` runs stage 1 and 3 for the reference models, then a grid (e.g. lr × γ × steps) per
optimizer for one objective, and reports the Pareto front of forget quality vs model utility.

Presets are YAML files ``src/soul/presets/reproduce-<name>.yaml`` (or any path); see `load_preset`.

Tasks (preset key ``task``): ``tofu`` (above), and three whose target is the preset's model as given (or
fine-tuned on forget + retain when ``target.finetune`` is set) and which have no retain reference model:

* ``copyright`` — forget = passages of ``data.source`` as raw-text QA records {question: first
  ``prefix_words`` words, answer: the next ``continuation_words``} (prompt format ``raw``); retain = passages
  of ``data.retain_source`` or, without one, the corpus passages after the first ``data.n_forget``. Metrics:
  BLEU / ROUGE-L of greedy continuations (`soul.eval.copyright_eval`) on forget and retain passages.
* ``detox`` — forget = `soul.data.load_detox` pairs (prompt, unsafe response); retain = the safe responses
  of the same prompts, or ``data.retain_source``/``data.retain_split`` QA records. Metrics: toxicity of
  greedy answers to the forget prompts (`soul.eval.toxicity_eval`, offline scorer by default) and the mean
  answer probability exp(−mean NLL) of the retain answers.
* ``wmdp`` — forget / retain as for ``copyright`` (a forget corpus of the hazardous topic); metrics:
  multiple-choice accuracy (`soul.eval.multiple_choice_eval`) on ``data.mc_source`` (the forget topic) and
  ``data.utility_mc_source`` (general knowledge).

All tasks share the unlearning grid (`unlearn_configs`, `run_unlearning`), one-shot influence and the report.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_PREFIX = "reproduce-"
CACHE_VERSION = 1  # bump when the meaning of a cached model or result changes
TASKS = ("tofu", "copyright", "detox", "wmdp")
# Prompt format of the unlearning data when the preset sets none: passages are raw text, not questions.
TASK_PROMPT_FORMATS = {"copyright": "raw", "wmdp": "raw"}
TASK_SPLITS = ("forget", "retain")  # split names of the non-TOFU tasks' unlearning data
PRESET_KEYS = {"name", "description", "task", "model", "dtype", "device", "data", "forget_split", "retain_split",
               "holdout_split", "utility_splits", "max_questions", "target", "retain", "unlearn", "influence",
               "eval", "sweep", "seed", "progress_bars", "prompt_format"}
DEFAULT_UTILITY_SPLITS = ["retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]


# ----------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    return sorted(p.stem.removeprefix(PRESET_PREFIX) for p in PRESET_DIR.glob(f"{PRESET_PREFIX}*.yaml"))


def load_preset(name_or_path: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A preset mapping from a name (``demo`` → ``presets/reproduce-demo.yaml``), a YAML path, or a dict;
    unknown top-level keys are an error naming the file."""
    import yaml

    if isinstance(name_or_path, dict):
        data = copy.deepcopy(name_or_path)
        where = data.pop("_where", "preset dict")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            path = PRESET_DIR / f"{PRESET_PREFIX}{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown reproduce preset {str(name_or_path)!r}; available: "
                             f"{', '.join(list_presets()) or 'none'} (or give a path to a YAML file)")
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"preset {where}: not valid YAML ({err})") from None
        data.setdefault("name", str(name_or_path) if not Path(str(name_or_path)).is_file() else path.stem)
    if not isinstance(data, dict):
        raise ValueError(f"preset {where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"preset {where}: unknown key(s) {unknown}; known: {sorted(PRESET_KEYS)}")
    task = data.get("task", "tofu")
    if task not in TASKS:
        raise ValueError(f"preset {where}: task {task!r} is not supported by `soul reproduce`; "
                         f"supported: {list(TASKS)}")
    unl = data.get("unlearn") or {}
    for key in ("objectives", "optimizers"):
        if key in unl and not isinstance(unl[key], dict):
            raise ValueError(f"preset {where}: unlearn.{key} must be a mapping of name -> options")
    data["_where"] = where
    return data


# ------------------------------------------------------------------------------------------------ hashing
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_records(records: list[dict]) -> str:
    """SHA-256 of the records' canonical JSON (key order and whitespace do not matter)."""
    return _sha(records)


_FULL_HASH_LIMIT = 1 << 30  # files up to 1 GiB are hashed whole; bigger ones by size + head + tail


def model_fingerprint(name_or_path: str | os.PathLike) -> str:
    """A content hash of a local model directory (every file's name and bytes; files over 1 GiB by size and
    their first and last 16 MiB), or ``hub:<id>`` for a hub id (which the hub versions itself)."""
    from soul.models import resolve_model_path

    resolved = Path(resolve_model_path(name_or_path))
    if not resolved.is_dir():
        return f"hub:{name_or_path}"
    h = hashlib.sha256()
    for f in sorted(p for p in resolved.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(resolved).as_posix()
        if rel in ("run.json", "train_log.jsonl") or rel.startswith("checkpoints/"):
            continue  # bookkeeping, not weights: a cached model hashes the same as its plain copy
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 24))
                fh.seek(size - (1 << 24))
                h.update(fh.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """Stage / run messages on a stream (the training loop draws its own step bars with ETA)."""

    def __init__(self, stream: TextIO | None, n_stages: int, prefix: str = "soul") -> None:
        self.stream, self.n_stages, self.prefix = stream, n_stages, prefix
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if self.stream is not None:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.prefix} {elapsed:6.0f}s] {msg}", file=self.stream, flush=True)

    def stage(self, i: int, name: str) -> None:
        self.say(f"stage {i}/{self.n_stages}: {name}")


# -------------------------------------------------------------------------------------------------- data
def _data_source(preset: dict[str, Any]) -> str:
    data = preset.get("data") or {}
    source = str(data.get("source", "bundled"))
    if source == "bundled" and data.get("bundled"):
        from soul.data import bundled_dir

        return str(bundled_dir(**data["bundled"]))
    return source


def _derived(forget_split: str, kind: str) -> str:
    import re

    m = re.fullmatch(r"forget(\d{2})", forget_split)
    if not m:
        raise ValueError(f"cannot derive the {kind} split from forget split {forget_split!r}; set {kind}_split")
    pct = int(m.group(1))
    return f"retain{100 - pct:02d}" if kind == "retain" else f"holdout{pct:02d}"


def task_of(preset: dict[str, Any]) -> str:
    return str(preset.get("task", "tofu"))


def prompt_format(preset: dict[str, Any]) -> str:
    """The preset's prompt format, else the task's default (``raw`` for text corpora, ``auto`` otherwise)."""
    return str(preset.get("prompt_format") or TASK_PROMPT_FORMATS.get(task_of(preset), "auto"))


def split_names(preset: dict[str, Any]) -> tuple[str, str]:
    """(forget split, retain split) of the unlearning data."""
    if task_of(preset) != "tofu":
        return TASK_SPLITS
    forget = preset.get("forget_split", "forget10")
    return forget, preset.get("retain_split") or _derived(forget, "retain")


def load_data(preset: dict[str, Any]) -> dict[str, list[dict]]:
    """Every split the pipeline needs, by name, evaluation sets capped at ``max_questions`` (first N)."""
    from soul.data import load_split

    if task_of(preset) != "tofu":
        from soul.tasks import load_task_data

        return load_task_data(preset)
    source = _data_source(preset)
    forget = preset.get("forget_split", "forget10")
    retain = preset.get("retain_split") or _derived(forget, "retain")
    holdout = preset.get("holdout_split") or _derived(forget, "holdout")
    names = {"full", forget, retain, holdout, *preset.get("utility_splits", DEFAULT_UTILITY_SPLITS)}
    splits = {name: load_split(source, name) for name in sorted(names)}
    cap = preset.get("max_questions")
    if cap:
        for name in (holdout, *preset.get("utility_splits", DEFAULT_UTILITY_SPLITS)):
            splits[name] = splits[name][:cap]
        splits["_forget_eval"] = splits[forget][:cap]
    else:
        splits["_forget_eval"] = splits[forget]
    return splits


def eval_splits(preset: dict[str, Any], data: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[dict]]:
    forget = preset.get("forget_split", "forget10")
    holdout = preset.get("holdout_split") or _derived(forget, "holdout")
    splits = {forget: data["_forget_eval"]}
    for name in preset.get("utility_splits", DEFAULT_UTILITY_SPLITS):
        splits[name] = data[name]
    return splits, data[holdout]


# ------------------------------------------------------------------------------------------------ models
def _device(preset: dict[str, Any]) -> str:
    device = preset.get("device", "auto")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@contextlib.contextmanager
def base_model(spec: str) -> Iterator[str]:
    """A loadable path or id for the preset's ``model``; ``tiny:<family>`` builds a tiny random model from
    `soul.testing` and saves it to a temporary directory for the duration of the run."""
    if not spec.startswith("tiny:"):
        yield spec
        return
    from soul.models import save_model
    from soul.testing import tiny_model

    model, tokenizer = tiny_model(spec.split(":", 1)[1])
    from soul.safety import TINY_PREFIX

    # The PID in the name lets a later run remove it if this one is killed (soul.safety.clean_tiny_tempdirs).
    tmp = Path(tempfile.mkdtemp(prefix=f"{TINY_PREFIX}{os.getpid()}-"))
    try:
        save_model(model, tokenizer, tmp / "model")
        yield str(tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str, preset: dict[str, Any]):
    from soul.models import load_model

    return load_model(path, dtype=preset.get("dtype"), device=_device(preset))


def reference_model(role: str, preset: dict[str, Any], base: str, base_fp: str, data: dict[str, list[dict]],
                    progress: Progress) -> tuple[str, str, float | None]:
    """``(path, fingerprint, wall_time_s)`` of the target (``role="target"``) or retain model: the preset's
    ready model when it names one, else a fine-tuned copy of `base` cached by content hash."""
    from soul.models import cache_dir

    spec = preset.get(role) or {}
    if spec.get("model"):
        progress.say(f"{role} model: using {spec['model']} as given")
        return str(spec["model"]), model_fingerprint(spec["model"]), None
    if task_of(preset) != "tofu" and not spec.get("finetune"):
        progress.say(f"{role} model: using {preset.get('model')} as given")
        return base, base_fp or model_fingerprint(base), None
    split = "full" if role == "target" else split_names(preset)[1]
    ft_cfg = dict((preset.get("target") or {}).get("finetune") or {})
    if role == "retain":
        ft_cfg.update(spec.get("finetune") or {})
    ft_cfg.setdefault("seed", preset.get("seed", 0))
    ft_cfg.setdefault("prompt_format", prompt_format(preset))
    key = _sha({"v": CACHE_VERSION, "base": base_fp, "data": hash_records(data[split]), "config": ft_cfg,
                "dtype": preset.get("dtype")})
    out = cache_dir() / "finetuned" / f"{role}-{key[:20]}"
    from soul import safety

    with safety.dir_lock(out, wait_s=safety.CACHE_WAIT_S):  # one process fills a cache entry, others wait for it
        return _cached_finetune(role, out, key, base, split, ft_cfg, preset, data, progress)


def _cached_finetune(role: str, out: Path, key: str, base: str, split: str, ft_cfg: dict[str, Any],
                     preset: dict[str, Any], data: dict[str, list[dict]], progress: Progress) -> tuple[str, str, float | None]:
    from soul.train import finetune

    run_json = out / "run.json"
    if (out / "config.json").is_file() and run_json.is_file():
        wall = json.loads(run_json.read_text()).get("wall_time_s")
        progress.say(f"{role} model: cached at {out} (skipping fine-tuning)")
        return str(out), key, wall
    progress.say(f"{role} model: fine-tuning {base} on {split} ({len(data[split])} records) -> {out}")
    model, tokenizer = _load(base, preset)
    # overwrite: a killed earlier fill of this cache entry (soul's own) is replaced.
    _, record = finetune(model, tokenizer, data={split: data[split]}, split=split, out_dir=out, overwrite=True,
                         progress=preset.get("progress_bars", True), **ft_cfg)
    del model
    return str(out), key, record.get("wall_time_s")


# ------------------------------------------------------------------------------------------------- eval
def _eval_kwargs(preset: dict[str, Any]) -> dict[str, Any]:
    ev = dict(preset.get("eval") or {})
    return {"batch_size": ev.get("batch_size", 16), "generation_batch_size": ev.get("generation_batch_size"),
            "max_new_tokens": ev.get("max_new_tokens", 200),
            "min_k": ev.get("min_k", 0.4),
            "prompt_format": ev.get("prompt_format", preset.get("prompt_format", "auto"))}


def evaluate_model(model, tokenizer, preset: dict[str, Any], data: dict[str, list[dict]],
                   reference: dict[str, Any] | None, out: Path | None) -> dict[str, Any]:
    from soul.eval import evaluate

    if task_of(preset) != "tofu":
        from soul.io import write_json_atomic
        from soul.tasks import evaluate_task

        results = evaluate_task(model, tokenizer, preset, data)
        if out is not None:
            write_json_atomic(out, results)
        return results

    splits, holdout = eval_splits(preset, data)
    return evaluate(model, tokenizer, splits, forget_split_name=preset.get("forget_split", "forget10"),
                    retain_reference=reference, holdout=holdout, out=out, **_eval_kwargs(preset))


def evaluate_cached(path: str, fingerprint: str, preset: dict[str, Any], data: dict[str, list[dict]],
                    reference: dict[str, Any] | None, out: Path, progress: Progress, label: str) -> dict[str, Any]:
    """Evaluate a reference model once per (model, eval settings, eval data, reference); cached as JSON."""
    from soul.io import write_json_atomic
    from soul.models import cache_dir

    if task_of(preset) == "tofu":
        splits, holdout = eval_splits(preset, data)
        key = _sha({"v": CACHE_VERSION, "model": fingerprint, "eval": _eval_kwargs(preset),
                    "data": {k: hash_records(v) for k, v in splits.items()}, "holdout": hash_records(holdout),
                    "reference": None if reference is None else _sha(reference.get("forget_truth_ratio"))})
    else:
        key = _sha({"v": CACHE_VERSION, "model": fingerprint, "task": task_of(preset),
                    "eval": preset.get("eval") or {}, "data": _sha(data["_eval"])})
    cached = cache_dir() / "evals" / f"{key[:24]}.json"
    if cached.is_file():
        progress.say(f"evaluating {label}: cached results {cached}")
        results = json.loads(cached.read_text())
    else:
        progress.say(f"evaluating {label}")
        model, tokenizer = _load(path, preset)
        results = evaluate_model(model, tokenizer, preset, data, reference, None)
        del model
        write_json_atomic(cached, results)
    write_json_atomic(out, results)
    return results


def _self_reference(results: dict[str, Any]) -> None:
    """The retain model's own row: forget quality of its truth ratios against themselves (KS p = 1)."""
    from soul.eval.metrics import ks_forget_quality

    trs = [v["score"] for v in results["forget_truth_ratio"]["value_by_index"].values()]
    p, d = ks_forget_quality(trs, trs)
    results["forget_quality"] = {"agg_value": p, "value_by_index": {}, "ks_statistic": d, "n": len(trs),
                                 "note": "the retain model is the reference: compared with itself"}


# --------------------------------------------------------------------------------------------- unlearning
def unlearn_configs(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """The objective × optimizer grid: one option mapping per run, ``common`` < objective < optimizer <
    ``overrides["<objective>/<optimizer>"]``. Every run gets the same step budget (``max_steps``/epochs
    from ``common``) unless an override changes it on purpose."""
    unl = preset.get("unlearn") or {}
    common = dict(unl.get("common") or {})
    objectives = unl.get("objectives") or {"graddiff": {}, "po": {}, "npo": {}}
    optimizers = unl.get("optimizers") or {"adamw": {}, "sophia": {}}
    overrides = unl.get("overrides") or {}
    runs = []
    for obj, obj_cfg in objectives.items():
        for opt, opt_cfg in optimizers.items():
            cfg = {**common, **(obj_cfg or {}), **(opt_cfg or {}), **(overrides.get(f"{obj}/{opt}") or {})}
            cfg.setdefault("seed", preset.get("seed", 0))
            # The model must see the prompt format it was fine-tuned with, in every stage.
            cfg.setdefault("prompt_format", prompt_format(preset))
            runs.append({"name": f"{obj}-{opt}", "objective": obj, "optimizer": opt, "config": cfg})
    return runs


def run_unlearning(spec: dict[str, Any], target_path: str, preset: dict[str, Any], data: dict[str, list[dict]],
                   run_dir: Path, keep_model: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Unlearn with one objective/optimizer; returns (model, tokenizer, run info). The per-step log is
    collected through the loop's step callback and written to ``run_dir/train_log.jsonl``."""
    from soul.io import write_text_atomic
    from soul.train import unlearn

    forget, retain = split_names(preset)
    model, tokenizer = _load(target_path, preset)
    log: list[dict] = []
    t0 = time.perf_counter()
    model, record = unlearn(model, tokenizer, data={forget: data[forget], retain: data[retain]},
                            forget_split=forget, retain_split=retain, objective=spec["objective"],
                            optimizer=spec["optimizer"], out_dir=run_dir / "model" if keep_model else None,
                            overwrite=True,
                            on_step_end=lambda step, rec: log.append(dict(rec)),
                            progress=preset.get("progress_bars", True), **spec["config"])
    wall = time.perf_counter() - t0
    write_text_atomic(run_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    info = {"wall_time_s": wall, "steps": record.get("steps"), "config": record.get("config")}
    return model, tokenizer, info


def run_influence(target_path: str, preset: dict[str, Any], data: dict[str, list[dict]]):
    """One-shot influence unlearning of the forget split (damped diagonal-Newton ascent step)."""
    from soul.data import QACollator, QADataset
    from soul.optim import influence_unlearn

    cfg = dict(preset.get("influence") or {})
    batch_size = int(cfg.pop("batch_size", 4))
    max_batches = cfg.pop("max_retain_batches", None)
    forget, retain = split_names(preset)
    model, tokenizer = _load(target_path, preset)
    collate = QACollator(tokenizer)

    def batches(records: list[dict], limit: int | None) -> list[dict]:
        ds = QADataset(records, tokenizer, prompt_format=prompt_format(preset))
        out = [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]
        out = out[:limit] if limit else out
        return [{k: v.to(model.device) if hasattr(v, "to") else v for k, v in b.items()} for b in out]

    t0 = time.perf_counter()
    model.train()
    model, stats = influence_unlearn(model, batches(data[forget], None), batches(data[retain], max_batches), **cfg)
    model.eval()
    return model, tokenizer, {"wall_time_s": time.perf_counter() - t0, "stats": stats, "config": cfg}


# ----------------------------------------------------------------------------------------------- pipeline
def prepare(preset: dict[str, Any], out: Path, progress: Progress, base: str) -> dict[str, Any]:
    """Stages 1 and the reference half of 3: data, target and retain models, their evaluations."""
    if task_of(preset) != "tofu":
        return prepare_task(preset, out, progress, base)
    progress.stage(1, "data and reference models (target on full, retain on the retain split)")
    data = load_data(preset)
    base_fp = model_fingerprint(base) if not ((preset.get("target") or {}).get("model") and
                                             (preset.get("retain") or {}).get("model")) else ""
    target_path, target_fp, target_wall = reference_model("target", preset, base, base_fp, data, progress)
    retain_path, retain_fp, retain_wall = reference_model("retain", preset, base, base_fp, data, progress)
    progress.stage(2, "evaluating the retain (reference) and target models")
    retain_res = evaluate_cached(retain_path, retain_fp, preset, data, None, out / "eval" / "retain.json",
                                 progress, "retain")
    _self_reference(retain_res)
    target_res = evaluate_cached(target_path, target_fp, preset, data, retain_res, out / "eval" / "target.json",
                                 progress, "target")
    runs = [{"name": "target", "role": "target", "model": target_path, "wall_time_s": target_wall,
             "metrics": target_res},
            {"name": "retain", "role": "retain", "model": retain_path, "wall_time_s": retain_wall,
             "metrics": retain_res}]
    return {"data": data, "target_path": target_path, "retain_res": retain_res, "runs": runs}


def prepare_task(preset: dict[str, Any], out: Path, progress: Progress, base: str) -> dict[str, Any]:
    """`prepare` for the copyright / detox / WMDP tasks: data, the target (no retain reference model: these
    benchmarks compare each model's task metrics, not forget quality against a retrained model)."""
    task = task_of(preset)
    progress.stage(1, f"{task} data and the target model")
    data = load_data(preset)
    base_fp = "" if (preset.get("target") or {}).get("model") else model_fingerprint(base)
    target_path, target_fp, target_wall = reference_model("target", preset, base, base_fp, data, progress)
    progress.stage(2, "evaluating the target model")
    target_res = evaluate_cached(target_path, target_fp, preset, data, None, out / "eval" / "target.json",
                                 progress, "target")
    runs = [{"name": "target", "role": "target", "model": target_path, "wall_time_s": target_wall,
             "metrics": target_res}]
    return {"data": data, "target_path": target_path, "retain_res": None, "runs": runs}


def _meta(preset: dict[str, Any], command: str) -> dict[str, Any]:
    import platform

    import torch

    return {"command": command, "task": task_of(preset), "preset": preset.get("name"),
            "preset_file": preset.get("_where"),
            "description": preset.get("description", ""), "model": preset.get("model"),
            "data": _data_source(preset), "forget_split": split_names(preset)[0],
            "device": _device(preset), "torch": torch.__version__, "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def reproduce(preset: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike, *,
              keep_models: bool = False, stream: TextIO | str | None = "stderr",
              only: list[str] | None = None) -> dict[str, Any]:
    """Run the whole comparison for `preset` and write the report into `out_dir`; returns the results
    structure (see `soul.report.results`). `only` restricts the unlearning grid to run names such as
    ``"graddiff-sophia"`` or ``"influence"``. Unlearned models are discarded after evaluation unless
    `keep_models` (saved under ``out_dir/runs/<name>/model``)."""
    from soul.report import write_report

    preset = load_preset(preset)
    stream = sys.stderr if stream == "stderr" else stream
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(stream, 4, "reproduce")
    with base_model(str(preset.get("model", "smollm2-135m"))) as base:
        ctx = prepare(preset, out, progress, base)
        data, runs = ctx["data"], ctx["runs"]
        specs = [s for s in unlearn_configs(preset) if not only or s["name"] in only]
        do_influence = preset.get("influence") is not None and (not only or "influence" in only)
        n = len(specs) + int(do_influence)
        against = "the retain reference" if ctx["retain_res"] is not None else "the task's metrics"
        progress.stage(3, f"unlearning: {n} runs, each evaluated against {against}")
        for i, spec in enumerate(specs, 1):
            run_dir = out / "runs" / spec["name"]
            progress.say(f"run {i}/{n}: {spec['name']} ({spec['objective']} + {spec['optimizer']})")
            model, tokenizer, info = run_unlearning(spec, ctx["target_path"], preset, data, run_dir, keep_models)
            progress.say(f"run {i}/{n}: {spec['name']} trained in {info['wall_time_s']:.1f} s; evaluating")
            res = evaluate_model(model, tokenizer, preset, data, ctx["retain_res"], out / "eval" / f"{spec['name']}.json")
            del model
            runs.append({"name": spec["name"], "role": "unlearned", "objective": spec["objective"],
                         "optimizer": spec["optimizer"], "wall_time_s": info["wall_time_s"], "steps": info["steps"],
                         "config": spec["config"], "log": str(run_dir / "train_log.jsonl"), "metrics": res})
        if do_influence:
            progress.say(f"run {n}/{n}: influence (one-shot Newton step)")
            model, tokenizer, info = run_influence(ctx["target_path"], preset, data)
            res = evaluate_model(model, tokenizer, preset, data, ctx["retain_res"], out / "eval" / "influence.json")
            del model
            runs.append({"name": "influence", "role": "influence", "wall_time_s": info["wall_time_s"],
                         "config": info["config"], "stats": info["stats"], "metrics": res})
    progress.stage(4, f"writing the report to {out}")
    if task_of(preset) != "tofu":
        from soul.tasks import task_examples

        for run in runs:  # the report's example generations (its default reader knows TOFU's keys only)
            run.setdefault("examples", task_examples(run["metrics"]))
    results = {"meta": _meta(preset, "reproduce"), "runs": runs}
    write_report(results, out, stream=sys.stdout if stream is not None else None)
    return results


def sweep_grid(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """One spec per grid point: per optimizer, the Cartesian product of its option lists (e.g. lr × gamma ×
    max_steps) over the sweep's base options (``unlearn.common`` < the objective's options < ``base``)."""
    sw = preset.get("sweep") or {}
    grid = sw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"preset {preset.get('_where')}: no sweep.grid (a mapping optimizer -> option -> values)")
    objective = sw.get("objective", "graddiff")
    unl = preset.get("unlearn") or {}
    base = {**(unl.get("common") or {}), **((unl.get("objectives") or {}).get(objective) or {}),
            **(sw.get("base") or {})}
    specs = []
    for opt, axes in grid.items():
        opt_base = {**base, **((unl.get("optimizers") or {}).get(opt) or {})}
        keys = list(axes)
        for values in itertools.product(*(v if isinstance(v, list) else [v] for v in axes.values())):
            point = dict(zip(keys, values))
            tag = "-".join(f"{k}{v}" for k, v in point.items())
            cfg = {**opt_base, **point}
            cfg.setdefault("seed", preset.get("seed", 0))
            cfg.setdefault("prompt_format", preset.get("prompt_format", "auto"))
            specs.append({"name": f"sweep-{objective}-{opt}-{tag}", "objective": objective, "optimizer": opt,
                          "config": cfg, "point": point})
    return specs


def sweep(preset: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike, *,
          stream: TextIO | str | None = "stderr") -> dict[str, Any]:
    """Grid over the preset's ``sweep.grid`` per optimizer; report with the Pareto front and, per optimizer,
    the best forget quality at model utility ≥ 95 % of the target's."""
    from soul.report import write_report
    from soul.report.results import OBJECTIVE_NAMES, run_label

    preset = load_preset(preset)
    if task_of(preset) != "tofu":
        raise ValueError(f"preset {preset.get('_where')}: `soul sweep` needs task 'tofu' (forget quality vs "
                         f"model utility), not {task_of(preset)!r}; use `soul reproduce` for this task")
    stream = sys.stderr if stream == "stderr" else stream
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(stream, 4, "sweep")
    specs = sweep_grid(preset)
    points = []
    with base_model(str(preset.get("model", "smollm2-135m"))) as base:
        ctx = prepare(preset, out, progress, base)
        data, runs = ctx["data"], ctx["runs"]
        progress.stage(3, f"sweep: {len(specs)} settings")
        for i, spec in enumerate(specs, 1):
            progress.say(f"run {i}/{len(specs)}: {spec['optimizer']} {spec['point']}")
            run_dir = out / "runs" / spec["name"]
            model, tokenizer, info = run_unlearning(spec, ctx["target_path"], preset, data, run_dir, False)
            res = evaluate_model(model, tokenizer, preset, data, ctx["retain_res"], out / "eval" / f"{spec['name']}.json")
            del model
            run = {"name": spec["name"], "role": "unlearned", "objective": spec["objective"],
                   "optimizer": spec["optimizer"], "wall_time_s": info["wall_time_s"], "config": spec["config"],
                   "log": str(run_dir / "train_log.jsonl"), "metrics": res}
            run["label"] = run_label(run) + " " + " ".join(f"{k}={v}" for k, v in spec["point"].items())
            runs.append(run)
            points.append({"name": spec["name"], "optimizer": spec["optimizer"], **spec["point"],
                           "forget_quality": res["forget_quality"]["agg_value"],
                           "model_utility": res["model_utility"]["agg_value"]})
    progress.stage(4, f"writing the report to {out}")
    objective = (preset.get("sweep") or {}).get("objective", "graddiff")
    results = {"meta": _meta(preset, "sweep"), "runs": runs,
               "sweep": {"objective": OBJECTIVE_NAMES.get(objective, objective), "points": points}}
    write_report(results, out, title="soul sweep: forget quality vs model utility",
                 stream=sys.stdout if stream is not None else None)
    return results
