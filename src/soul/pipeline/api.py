"""`reproduce` and `sweep`: the stages of `soul.pipeline.stages`, top to bottom."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from soul.io import write_json_atomic
from soul.pipeline.common import Progress, base_model, path_under, resolve_device
from soul.pipeline.grid import select, sweep_grid, unlearn_configs, with_choice
from soul.pipeline.preset import Preset, load_preset
from soul.pipeline.preset_types import check_disjoint
from soul.pipeline.robustness import Robustness, describe
from soul.pipeline.stages import evaluate_run, influence_run, reference_models, unlearning_run
from soul.pipeline.tune import cached_run, chosen_options, record_key, run_tuning, tuned_label
from soul.report import write_report
from soul.report.results import run_label

PresetLike = str | os.PathLike | dict[str, Any] | Preset


def _meta(preset: Preset, command: str) -> dict[str, Any]:
    import torch

    task = preset.task_impl
    return {"command": command, "task": preset.task, "preset": preset.name, "preset_file": preset.where,
            "description": preset.description, "model": preset.model,
            "data": str(preset.data.get("source", "bundled")), "forget_split": task.splits(preset)[0],
            "seeds": ", ".join(map(str, preset.seeds)),
            **({"tune_seeds": ", ".join(map(str, preset.tune.seeds))} if preset.tune is not None else {}),
            "device": resolve_device(preset.device),
            "torch": torch.__version__, "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), **task.meta(preset)}


def _stream(stream: TextIO | str | None) -> TextIO | None:
    return sys.stderr if stream == "stderr" else stream  # type: ignore[return-value]


def _with_examples(preset: Preset, runs: list[dict[str, Any]]) -> None:
    """The report's example generations, for tasks whose metrics the report cannot read itself."""
    task = preset.task_impl
    for run in runs:
        examples = task.examples(run["metrics"])
        if examples is not None:
            run.setdefault("examples", examples)


def plan_reproduce(preset: PresetLike, only: list[str] | None = None, seeds: list[int] | None = None,
                   tune_seeds: list[int] | None = None, no_tune: bool = False
                   ) -> tuple[Preset, list[dict[str, Any]], list[str]]:
    """(preset, run specs, the one-shot influence rows to run): every check of the preset, `only`, `seeds` (evaluation),
    `tune_seeds` and `no_tune`, with no side effect — the command line calls it before it creates the report
    directory. The specs are the evaluation runs at the preset's options (tuning replaces them later)."""
    preset = load_preset(preset)
    if seeds is not None:
        preset = preset.with_seeds(seeds)
    if no_tune:
        preset = preset.without_tune()
    elif tune_seeds is not None:
        preset = preset.with_tune_seeds(tune_seeds)
    flags = [f for f, v in (("--seeds", seeds), ("--tune-seeds", tune_seeds)) if v is not None]
    check_disjoint(preset.tune, preset.seeds, preset.where, f" (after {' and '.join(flags)})" if flags else "")
    influence = list(preset.influence_runs)
    specs = select(unlearn_configs(preset), only, tuple(influence))
    preset.task_impl.check_inputs(preset)  # the data files, before the report directory exists
    return preset, specs, [name for name in influence if not only or name in only]


def plan_sweep(preset: PresetLike, seeds: list[int] | None = None) -> tuple[Preset, list[dict[str, Any]]]:
    """(preset, sweep specs) after every check, with no side effect (see `plan_reproduce`)."""
    preset = load_preset(preset)
    if seeds is not None:
        preset = preset.with_seeds(seeds)
    if not preset.task_impl.supports_sweep:
        raise ValueError(f"preset {preset.where}: `soul sweep` needs task 'tofu' (forget quality vs model "
                         f"utility), not {preset.task!r}; use `soul reproduce` for this task")
    preset.task_impl.check_inputs(preset)
    return preset, sweep_grid(preset)


def _attack(robust: Robustness | None, model: Any, tokenizer: Any, run: dict[str, Any], progress: Progress,
            where: str) -> None:
    if robust is None or not robust.wants(run):
        return
    progress.say(f"{where}: attacking {run['name']}: {describe(robust.cfg)}")
    robust.attack(model, tokenizer, run)


def _earlier_run(out: Path, name: str, spec: dict[str, Any], preset: Preset, ctx: dict[str, Any],
                 robust: Robustness | None, attacked: bool, keep_models: bool
                 ) -> tuple[Path, str, dict[str, Any] | None]:
    """(record path, key, the run an earlier call into this report directory finished) for run `name`; the run
    is None when no record holds `key` or a file it names is gone (then the run is redone and its record
    written under `key`). The key is everything a tuning record depends on (`record_key`) plus the attacks the
    run went through (their settings and the references' key) and whether its model was kept."""
    from soul.pipeline.common import sha
    from soul.safety import read_json_object

    record = path_under(out, "runs", name, "record.json")
    attacks = ({"cfg": robust.cfg, "references": (robust.references or {}).get("key")}
               if attacked and robust is not None else None)
    key = sha({"run": record_key(spec, ctx, preset), "attacks": attacks, "keep_model": keep_models})
    run = cached_run(record, key)
    if run is None or (keep_models and not (record.parent / "model").is_dir()):
        return record, key, None
    if attacked and robust is not None:
        result = read_json_object(run.get("attacks_file", ""))
        if result is None:
            return record, key, None
        robust.first = robust.first or result  # the reference rows' attack values come from one result
    return record, key, run


def _tuning_run(spec: dict[str, Any], preset: Preset, ctx: dict[str, Any], out: Path) -> dict[str, Any]:
    """One tuning run: unlearn and evaluate (no attacks, no model kept); its record is what the rule reads."""
    model, tokenizer, run = unlearning_run(spec, ctx["target_path"], preset, ctx["data"],
                                           path_under(out, "tune", "runs", spec["name"]), False)
    run["metrics"] = evaluate_run(model, tokenizer, preset, ctx["data"], ctx["reference"], None)
    del model
    return run


def reproduce(preset: PresetLike, out_dir: str | os.PathLike, *, keep_models: bool = False,
              stream: TextIO | str | None = "stderr", only: list[str] | None = None,
              seeds: list[int] | None = None, tune_seeds: list[int] | None = None,
              no_tune: bool = False) -> dict[str, Any]:
    """Run the whole comparison for `preset` and write the report into `out_dir`; returns the results
    structure (see `soul.report.results`). `only` restricts the grid to run names (``graddiff-sophia-s1``),
    groups (``graddiff-sophia``: every seed) or one-shot rows (``influence``, ``influence-kfac``); `seeds` replaces the preset's (evaluation)
    seeds. With the preset's ``tune:`` (unless `no_tune`; `tune_seeds` replaces its seeds) each tuned
    setting first runs its grid on the tuning seeds and the evaluation runs use the chosen options
    (`soul.pipeline.tune`; records under ``out_dir/tune/``, reused by a rerun).
    Everything is checked before any model is loaded. Unlearned models are discarded after evaluation
    unless `keep_models` (saved under ``out_dir/runs/<name>/model``). With the preset's ``attacks:``, each
    unlearned model of ``attacks.seeds`` (and influence) is attacked after its evaluation
    (`soul.pipeline.robustness`; results under ``out_dir/attacks/``, robustness columns in the table)."""
    preset, specs, influence_rows = plan_reproduce(preset, only, seeds, tune_seeds, no_tune)
    stream = _stream(stream)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tuning_on = preset.tune is not None and bool(specs)
    progress = Progress(stream, 4 + tuning_on, "reproduce")
    tuning: dict[str, Any] | None = None
    robust = Robustness(preset, out, progress) if preset.attacks is not None else None
    with base_model(preset.model) as base:
        # 1 + 2. reference models and their evaluations
        ctx = reference_models(preset, out, progress, base, **({"check_data": robust.check_data} if robust else {}))
        runs = ctx["runs"]
        if robust is not None and robust.active:  # the references' side of every attack, once per grid
            robust.compute_references(ctx)
        # 3. tuning (preset tune:): each tuned setting's grid on the tuning seeds; the evaluation runs then
        # use the chosen options, on the evaluation seeds only
        if tuning_on:
            assert preset.tune is not None
            progress.stage(3, f"tuning on seed(s) {preset.tune.seeds}: {', '.join(preset.tune.grid)}")
            tuning = run_tuning(preset, specs, ctx, out, progress,
                                lambda spec: _tuning_run(spec, preset, ctx, out))
            specs = with_choice(specs, chosen_options(tuning))
        # 3 (4 with tuning). every unlearning run, evaluated as soon as it is trained (one model in memory)
        n = len(specs) + len(influence_rows)
        against = "the retain reference" if ctx["reference"] is not None else "the task's metrics"
        progress.stage(3 + tuning_on, f"unlearning: {n} runs ({len(preset.seeds)} seed(s)), each evaluated "
                                      f"against {against}")
        # Each finished run leaves its record (runs/<name>/record.json, keyed by what it depends on): a rerun
        # into the same directory reuses those and runs the rest, so a killed grid resumes where it stopped.
        for i, spec in enumerate(specs, 1):
            attacked = robust is not None and robust.wants({"seed": spec["seed"], "role": "unlearned"})
            record, key, done = _earlier_run(out, spec["name"], spec, preset, ctx, robust, attacked, keep_models)
            if done is not None:
                progress.say(f"run {i}/{n}: {spec['name']}: finished by an earlier call, record {record}")
                runs.append(done)
                continue
            progress.say(f"run {i}/{n}: {spec['name']} ({spec['objective']} + {spec['optimizer']}, seed {spec['seed']})")
            model, tokenizer, run = unlearning_run(spec, ctx["target_path"], preset, ctx["data"],
                                                   path_under(out, "runs", spec["name"]), keep_models)
            progress.say(f"run {i}/{n}: {spec['name']} trained in {run['wall_time_s']:.1f} s; evaluating")
            run["metrics"] = evaluate_run(model, tokenizer, preset, ctx["data"], ctx["reference"],
                                          path_under(out, "eval", f"{spec['name']}.json"))
            if tuning is not None:  # the row shows the chosen lr (or that this entry was not tuned)
                run["label"] = tuned_label(run_label(run), tuning["settings"].get(f"{spec['objective']}/"
                                                                                  f"{spec['optimizer']}"))
            _attack(robust, model, tokenizer, run, progress, f"run {i}/{n}")
            del model
            write_json_atomic(record, {"key": key, "run": run})
            runs.append(run)
        for i, name in enumerate(influence_rows, len(specs) + 1):
            attacked = robust is not None and robust.wants({"role": "influence"})
            as_spec = {"objective": "influence", "optimizer_type": name,
                       "config": {**preset.influence_runs[name], "seed": preset.seed}}
            record, key, done = _earlier_run(out, name, as_spec, preset, ctx, robust, attacked, False)
            if done is not None:
                progress.say(f"run {i}/{n}: {name}: finished by an earlier call, record {record}")
                runs.append(done)
                continue
            progress.say(f"run {i}/{n}: {name} (one-shot Newton step)")
            model, tokenizer, run = influence_run(ctx["target_path"], preset, ctx["data"], name)
            run["metrics"] = evaluate_run(model, tokenizer, preset, ctx["data"], ctx["reference"],
                                          path_under(out, "eval", f"{name}.json"))
            _attack(robust, model, tokenizer, run, progress, f"run {i}/{n}")
            del model
            write_json_atomic(record, {"key": key, "run": run})
            runs.append(run)
    if robust is not None:
        robust.finish(runs)
    # 4. report
    progress.stage(4 + tuning_on, f"writing the report to {out}")
    _with_examples(preset, runs)
    results = {"meta": _meta(preset, "reproduce"), "runs": runs, **({"tuning": tuning} if tuning else {})}
    write_report(results, out, stream=sys.stdout if stream is not None else None)
    return results


def sweep(preset: PresetLike, out_dir: str | os.PathLike, *, stream: TextIO | str | None = "stderr",
          seeds: list[int] | None = None) -> dict[str, Any]:
    """Grid over the preset's ``sweep.grid`` per optimizer × seed; the report shows the Pareto front and, per
    optimizer, the best setting (forget quality at model utility ≥ 95 % of the target's, means over seeds),
    warning when it lies at the edge of the grid's learning rates."""
    preset, specs = plan_sweep(preset, seeds)
    stream = _stream(stream)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(stream, 4, "sweep")
    if preset.attacks is not None:
        progress.say("attacks: run by `soul reproduce` only; a sweep does not attack its runs")
    points = []
    with base_model(preset.model) as base:
        ctx = reference_models(preset, out, progress, base)
        runs = ctx["runs"]
        progress.stage(3, f"sweep: {len(specs)} runs")
        for i, spec in enumerate(specs, 1):
            progress.say(f"run {i}/{len(specs)}: {spec['optimizer']} {spec['point']} seed {spec['seed']}")
            model, tokenizer, run = unlearning_run(spec, ctx["target_path"], preset, ctx["data"],
                                                   path_under(out, "runs", spec["name"]), False)
            res = evaluate_run(model, tokenizer, preset, ctx["data"], ctx["reference"],
                               path_under(out, "eval", f"{spec['name']}.json"))
            del model
            run["metrics"] = res
            run["label"] = run_label(run) + " " + " ".join(f"{k}={v}" for k, v in spec["point"].items())
            runs.append(run)
            points.append({"name": spec["name"], "group": spec["group"], "seed": spec["seed"],
                           "optimizer": spec["optimizer"], "optimizer_type": spec["optimizer_type"], **spec["point"],
                           "forget_quality": res["forget_quality"]["agg_value"],
                           "model_utility": res["model_utility"]["agg_value"]})
    progress.stage(4, f"writing the report to {out}")
    results = {"meta": _meta(preset, "sweep"), "runs": runs,
               "sweep": {"objective": preset.sweep.objective if preset.sweep else "", "points": points,
                         "axes": {opt: list(axes) for opt, axes in (preset.sweep.grid if preset.sweep else {}).items()}}}
    write_report(results, out, title="soul sweep: forget quality vs model utility",
                 stream=sys.stdout if stream is not None else None)
    return results
