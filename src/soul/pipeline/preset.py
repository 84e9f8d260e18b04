"""The typed `soul reproduce` / `soul sweep` preset: `load_preset` reads a YAML file (or a mapping) and
checks every key, at every depth, before any data is read or model loaded.

Schema (top level; all optional except where a task needs them)::

    name, description: str
    task: tofu | copyright | detox | wmdp           (soul.pipeline.tasks)
    model: str                                     (a hub id, a local path, or "tiny:<family>")
    dtype: str | null;  device: str ("auto");  prompt_format: str (task default)
    data: {...}                                    (keys per task: Task.data_keys)
    forget_split, retain_split, holdout_split: str;  utility_splits: [str];  max_questions: int   (tofu)
    target, retain: {model: str, finetune: {<TrainConfig option>: value}}
    unlearn:
      common: {<TrainConfig option>: value}
      objectives: {<objective name in soul.objectives.OBJECTIVES>: {<option>: value}}
      optimizers: {<entry name>: {optimizer: <soul.optim name, default: the entry name>, <option>: value}}
      overrides: {"<objective>/<optimizer entry>": {<option>: value}}
    influence: {<influence_unlearn option> | batch_size | max_retain_batches: value} | null     (one row: "influence")
             | {<row name "influence...">: {<option>: value}, ...}  (several one-shot rows, e.g. gnb/kfac/ekfac)
    eval: {...}                                    (keys per task: Task.eval_keys)
    sweep: {objective: str, base: {<option>: value}, grid: {<optimizer entry or name>: {<option>: [values]}}}
    seed: int (0);  seeds: [int] ([seed])           (the evaluation seeds: the only ones in the table)
    tune:                                          (`soul reproduce` only; soul.pipeline.tune)
      seeds: [int]                                 (tuning seeds, disjoint from `seeds`)
      grid: {<optimizer entry>: {lr: [number > 0], max_steps: [int >= 1]}}
      rule: {metric, utility_fraction, max_abs_privleak, min_retain_rouge_fraction, tie}
      extend_edges: bool                           (true)
    progress_bars: bool
    attacks:                                       (soul.attack, run by `soul reproduce` on every unlearned model)
      relearn: {steps, lr, batch_size, seed, optimizer, heldout_fraction, questions_per_author, train_options}
      quantize: {bits: [int], group_size, symmetric, include_embeddings}
      paraphrase: {}                               (an attack mapped to null runs with its defaults)
      generate: bool;  max_new_tokens: int;  max_questions: int
      seeds: [int]                                 (whose unlearned models are attacked; default: every seed)
      influence: bool                              (attack the one-shot influence model too; default true)

Options are `soul.train.TrainConfig` fields, type-checked from its annotations (``lr: "fast"`` fails);
each run's merged options then go through `soul.train.make_config`, and objective coefficients through
`soul.objectives.build_objective`. An *optimizer entry* names a run column: ``sophia-auto: {optimizer:
sophia, rho: auto}`` runs Sophia with ρ = auto under the name ``sophia-auto``. Every error is a
`PresetError` (a ValueError) of one line: ``preset <file>: <key path>: <what is wrong>``. Names that end
up in paths (optimizer entries, sweep grid names and string values, so every run name) must be one safe path
component (`preset_types.SAFE_NAME`, no ``..``); the numbers of ``influence``, ``eval``, ``data`` and
``attacks`` are range-checked here too (`INFLUENCE_RULES`, `EVAL_RULES`, `DATA_RULES`, `BUNDLED_RULES`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from soul.pipeline.grid import grid_points, sweep_grid, tuning_specs, unlearn_configs
from soul.pipeline.preset_types import (
    MAX_SEED,
    OptimizerEntry,
    Preset,
    PresetError,
    Reference,
    Sweep,
    Tune,
    TuneRule,
    Unlearn,
    check_disjoint,
    check_seeds,
    unsafe_name,
)
from soul.pipeline.tasks import TASKS, Task

# The preset types live in `preset_types` (imported by grid and tasks without importing back); they are
# re-exported here for `from soul.pipeline.preset import Preset, PresetError`.
__all__ = ["OptimizerEntry", "Preset", "PresetError", "Reference", "Sweep", "Unlearn", "list_presets",
           "load_preset", "read_preset"]

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESET_PREFIX = "reproduce-"
DEFAULT_OBJECTIVES = ("graddiff", "po", "npo")
DEFAULT_OPTIMIZERS = ("adamw", "sophia")
# Optimizer names the optimizer factory gains on the `optim` branch; accepted here so presets naming them
# validate before that merge (build_optimizer still rejects them at run time until it knows them).
FORTHCOMING_OPTIMIZERS = ("signum", "lion")
LIB_OPTIMIZER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "pytorch_optimizer:Lion"
AUTO_OPTIONS = {"rho": "auto"}  # options that may be a keyword instead of a number
INFLUENCE_EXTRA = ("batch_size", "max_retain_batches")
INFLUENCE_ROW_PREFIX = "influence"  # every one-shot row's name starts so (`_influence`)
# Value rules, checked before any work: key -> (kind, low, high, low exclusive, may be null). Kinds: "int",
# "float" (finite), or a tuple of allowed strings. `influence_unlearn`'s own checks, and what each task reads.
Rule = tuple[Any, float | None, float | None, bool, bool]
INFLUENCE_RULES: dict[str, Rule] = {
    "alpha": ("float", 0, None, True, False),
    "damping": ("float", 0, None, True, True),
    "damping_relative": ("float", 0, None, True, True),
    "hessian": (("gnb", "fisher", "kfac", "ekfac"), None, None, False, False),
    "hessian_data": (("retain", "forget", "both"), None, None, False, False),
    "kfac_fisher": (("mc", "empirical", "exact"), None, None, False, False),
    "kfac_samples": ("int", 1, None, False, False),
    "batch_size": ("int", 1, None, False, False),
    "max_retain_batches": ("int", 1, None, False, True),
}
EVAL_RULES: dict[str, Rule] = {
    "batch_size": ("int", 1, None, False, False),
    "generation_batch_size": ("int", 1, None, False, True),
    "max_length": ("int", 2, None, False, True),
    "max_new_tokens": ("int", 1, None, False, False),
    "prefix_tokens": ("int", 1, None, False, False),
    "min_k": ("float", 0, 1, True, False),
    "threshold": ("float", 0, 1, False, False),
    "prompt_format": (("auto", "chat", "plain", "raw"), None, None, False, False),
    "mc_protocol": (("lm_eval", "cloze"), None, None, False, False),  # soul.eval.multiple_choice.PROTOCOLS
    "scorer": (str, None, None, False, False),
    "samples": ("int", 0, None, False, False),
    "sample_seed": ("int", 0, MAX_SEED, False, False),
    "top_p": ("float", 0, 1, True, False),
    "temperature": ("float", 0, None, True, False),
}
# ``data`` keys of every task (numbers: sizes and counts; the rest strings); ``data.bundled``: bundled_dir's.
DATA_RULES: dict[str, Rule] = {
    **{k: ("int", 1, None, False, True) for k in ("n_forget", "n_retain", "passage_words", "prefix_words",
                                                  "continuation_words", "n_unseen", "prefix_tokens",
                                                  "continuation_tokens", "n_heldout", "n_prompts")},
    "prompt_seed": ("int", 0, MAX_SEED, False, False),
    **{k: (str, None, None, False, True) for k in ("text_field", "retain_source", "split", "retain_split",
                                                   "mc_source", "mc_name", "mc_split", "utility_mc_source",
                                                   "utility_mc_name", "utility_mc_split", "books_dir",
                                                   "forget_book", "retain_book", "unseen_book", "safe_source",
                                                   "rtp_challenging", "rtp_nontoxic")},
}
SEED_RULE: Rule = ("int", 0, MAX_SEED, False, False)
BUNDLED_RULES: dict[str, Rule] = {"n_authors": ("int", 2, None, False, False),
                                  "qas_per_author": ("int", 1, None, False, False),
                                  "seed": SEED_RULE,
                                  "n_perturbed": ("int", 3, 5, False, False)}
# TrainConfig options the pipeline sets itself for every run (from the task and the command line).
PIPELINE_OPTIONS = ("forget_split", "retain_split", "split", "progress")


TOP_KEYS = ("name", "description", "task", "model", "dtype", "device", "data", "forget_split", "retain_split",
            "holdout_split", "utility_splits", "max_questions", "target", "retain", "unlearn", "influence",
            "eval", "sweep", "seed", "seeds", "progress_bars", "prompt_format", "attacks", "tune")
TUNE_KEYS = ("seeds", "grid", "rule", "extend_edges")
# ``tune.grid.<entry>`` axes: the learning rate (required; the edge extension moves it) and the step budget.
TUNE_AXES: dict[str, Rule] = {"lr": ("float", 0, None, True, False), "max_steps": ("int", 1, None, False, False)}


# ------------------------------------------------------------------------------------------------ reading
def list_presets() -> list[str]:
    return sorted(p.stem.removeprefix(PRESET_PREFIX) for p in PRESET_DIR.glob(f"{PRESET_PREFIX}*.yaml"))


def read_preset(name_or_path: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The raw mapping of a preset (name → ``presets/reproduce-<name>.yaml``, a YAML path, or a dict), with
    ``name`` filled in and ``_where`` naming its file; not validated (`load_preset` does that). Use it to
    edit a shipped preset before running it."""
    from soul.io import read_yaml_mapping

    if isinstance(name_or_path, dict):
        data = copy.deepcopy(name_or_path)
        data.setdefault("_where", "preset dict")
        return data
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{PRESET_PREFIX}{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown reproduce preset {str(name_or_path)!r}; available: "
                         f"{', '.join(list_presets()) or 'none'} (or give a path to a YAML file)")
    data = read_yaml_mapping(path, f"preset {path}")
    data.setdefault("name", path.stem.removeprefix(PRESET_PREFIX))
    data["_where"] = str(path)
    return data


def load_preset(name_or_path: str | os.PathLike | dict[str, Any] | Preset) -> Preset:
    """A validated `Preset` from a name, a YAML path or a mapping (see `read_preset`); raises `PresetError`
    naming the file and the key path of the first problem."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    raw = read_preset(name_or_path)
    where = str(raw.pop("_where"))
    return _build(raw, _Checker(where))


# ------------------------------------------------------------------------------------------------ checking
def _train_fields() -> dict[str, str]:
    """TrainConfig field name → its annotation (a string: the module uses postponed annotations)."""
    from soul.train.config import TrainConfig

    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _optimizer_names() -> set[str]:
    from soul.optim.factory import _ALIASES, OPTIMIZERS

    return set(OPTIMIZERS) | set(_ALIASES) | set(FORTHCOMING_OPTIMIZERS)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Checker:
    """Type and key checks that raise `PresetError` with the preset file and the key path."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._fields: dict[str, str] | None = None

    def fail(self, path: str, problem: str) -> PresetError:
        return PresetError(self.where, path, problem)

    @property
    def fields(self) -> dict[str, str]:
        if self._fields is None:
            self._fields = _train_fields()
        return self._fields

    def mapping(self, value: Any, path: str, *, allow_none: bool = True) -> dict[str, Any]:
        if value is None and allow_none:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)

    def keys(self, value: dict[str, Any], known: tuple[str, ...] | set[str], path: str, what: str = "key") -> None:
        import difflib

        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{path}.{key}" if path else str(key),
                                f"unknown {what}{hint}; known: {sorted(known)}")

    def typed(self, value: Any, path: str, kind: type | tuple[type, ...], *, allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(_is_number(value) if k is float else
                 (isinstance(value, int) and not isinstance(value, bool)) if k is int else isinstance(value, k)
                 for k in kinds)
        if not ok:
            names = " or ".join("number" if k is float else k.__name__ for k in kinds)
            raise self.fail(path, f"must be {names}{' or null' if allow_none else ''}, got {value!r}")
        return value

    def seeds(self, value: Any, path: str) -> list[int]:
        return check_seeds(value, self.where, path)

    def name(self, value: Any, path: str) -> str:
        """A name the pipeline joins into paths (run directories, result files): one safe path component."""
        problem = unsafe_name(value)
        if problem:
            raise self.fail(path, f"{problem} (it names run directories and files)")
        return value

    def ruled(self, value: Any, path: str, rule: Rule) -> Any:
        """`value` checked against `rule` (see INFLUENCE_RULES); numeric strings ("1e-5") become numbers."""
        kind, low, high, low_open, nullable = rule
        if value is None:
            if nullable:
                return None
            raise self.fail(path, "must not be null")
        if isinstance(kind, tuple):
            if value not in kind:
                raise self.fail(path, f"expected one of {list(kind)}, got {value!r}")
            return value
        if kind is str:
            return self.typed(value, path, str)
        if kind == "float" and isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        number = self.typed(value, path, int if kind == "int" else float)
        if not math.isfinite(number):
            raise self.fail(path, f"must be a finite number, got {value!r}")
        if low is not None and (number <= low if low_open else number < low):
            raise self.fail(path, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and number > high:
            raise self.fail(path, f"must be <= {high}, got {value!r}")
        return number

    def ruled_mapping(self, value: dict[str, Any], rules: dict[str, Rule], path: str) -> dict[str, Any]:
        return {k: self.ruled(v, f"{path}.{k}", rules[k]) if k in rules else v for k, v in value.items()}

    def option(self, key: str, value: Any, path: str) -> Any:
        """One TrainConfig option, type-checked from the field's annotation."""
        ann = self.fields[key]
        if value is None:
            if "None" not in ann:
                raise self.fail(path, f"must not be null ({key}: {ann})")
            return value
        if AUTO_OPTIONS.get(key) == value:
            return value
        if key == "optimizer":
            self.optimizer_name(value, path)
        elif key == "objective":
            self.objective_name(value, path, allow_finetune=True)
        elif ann.startswith("bool"):
            self.typed(value, path, bool)
        elif ann.startswith("int"):
            self.typed(value, path, int)
        elif ann.startswith("float"):
            if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string; make_config accepts it
                try:
                    value = float(value)
                except ValueError:
                    extra = f" or {AUTO_OPTIONS[key]!r}" if key in AUTO_OPTIONS else ""
                    raise self.fail(path, f"must be a number{extra}, got {value!r}") from None
            self.typed(value, path, float)
        elif ann.startswith("str"):
            self.typed(value, path, str)
        elif ann.startswith("list"):
            self.typed(value, path, list)
        elif ann.startswith("dict"):
            self.typed(value, path, dict)
        return value

    def options(self, value: Any, path: str, *, extra: tuple[str, ...] = (),
                fixed: tuple[str, ...] = ()) -> dict[str, Any]:
        """A mapping of TrainConfig options (plus `extra` keys, returned unchecked); `fixed` options are set
        by the preset's structure (e.g. the objective of a run) and are an error here."""
        opts = self.mapping(value, path)
        known = set(self.fields) | set(extra)
        self.keys(opts, known, path, "option")
        for key in fixed:
            if key in opts:
                where = ("the preset's seeds (one run per seed)" if key == "seed" else
                         "the grid (unlearn.objectives / unlearn.optimizers entries)")
                raise self.fail(f"{path}.{key}", f"{key} is set by {where}, not as an option here")
        for key in PIPELINE_OPTIONS:
            if key in opts:
                raise self.fail(f"{path}.{key}", f"{key} is set by the pipeline for every run (from the task "
                                                 "and the preset's splits), not as an option")
        return {k: (v if k in extra else self.option(k, v, f"{path}.{k}")) for k, v in opts.items()}

    def optimizer_name(self, value: Any, path: str) -> str:
        self.typed(value, path, str)
        if value.lower() not in _optimizer_names() and not LIB_OPTIMIZER.match(value):
            raise self.fail(path, f"unknown optimizer {value!r}; known: {sorted(_optimizer_names())} or "
                                  "'<module>:<Class>'")
        if LIB_OPTIMIZER.match(value):
            from soul.optim.factory import check_library

            try:  # an allowed, installed library only; nothing is imported for a preset that names another
                check_library(value)
            except ValueError as err:
                raise self.fail(path, str(err)) from None
        return value

    def objective_name(self, value: Any, path: str, *, allow_finetune: bool = False) -> str:
        from soul.objectives import OBJECTIVES

        self.typed(value, path, str)
        if value not in OBJECTIVES and not (allow_finetune and value == "finetune"):
            raise self.fail(path, f"unknown objective {value!r}; known: {sorted(OBJECTIVES)}")
        return value

    def run_config(self, cfg: dict[str, Any], objective: str, optimizer: str, path: str) -> None:
        """The merged options of one run through `make_config` and `build_objective` (value checks)."""
        from soul.objectives import build_objective
        from soul.train.config import make_config

        checked = {k: v for k, v in cfg.items() if AUTO_OPTIONS.get(k) != v}
        try:
            make_config(checked, objective=objective, optimizer=optimizer)
            if objective != "finetune":
                build_objective(objective, **{k: cfg[k] for k in ("gamma", "alpha", "beta", "delta") if k in cfg})
        except ValueError as err:
            raise self.fail(path, str(err)) from None


# ------------------------------------------------------------------------------------------------ building
def _reference(c: _Checker, value: Any, path: str) -> Reference:
    spec = c.mapping(value, path)
    c.keys(spec, ("model", "finetune"), path)
    model = c.typed(spec.get("model"), f"{path}.model", str, allow_none=True)
    ft = c.options(spec["finetune"], f"{path}.finetune") if spec.get("finetune") is not None else None
    return Reference(model=model, finetune=ft)


def _unlearn(c: _Checker, value: Any) -> Unlearn:
    unl = c.mapping(value, "unlearn")
    c.keys(unl, ("common", "objectives", "optimizers", "overrides"), "unlearn")
    run_keys = ("objective", "optimizer", "seed")
    common = c.options(unl.get("common"), "unlearn.common", fixed=run_keys)
    objectives = c.mapping(unl.get("objectives"), "unlearn.objectives") or {o: {} for o in DEFAULT_OBJECTIVES}
    objs = {}
    for name, opts in objectives.items():
        c.objective_name(name, f"unlearn.objectives.{name}")
        objs[name] = c.options(opts, f"unlearn.objectives.{name}", fixed=run_keys)
    optimizers = c.mapping(unl.get("optimizers"), "unlearn.optimizers") or {o: {} for o in DEFAULT_OPTIMIZERS}
    entries = {}
    for name, opts in optimizers.items():
        path = f"unlearn.optimizers.{name}"
        c.name(name, path)  # joined into run names, hence into paths under --out
        opts = c.options(opts, path, fixed=("objective", "seed"))
        kind = opts.pop("optimizer", None) or c.optimizer_name(str(name), path)
        entries[str(name)] = OptimizerEntry(name=str(name), optimizer=kind, options=opts)
    overrides = c.mapping(unl.get("overrides"), "unlearn.overrides")
    over = {}
    for key, opts in overrides.items():
        path = f"unlearn.overrides.{key}"
        obj, _, opt = str(key).partition("/")
        if obj not in objs or opt not in entries:
            raise c.fail(path, f"expected '<objective>/<optimizer entry>' of this preset: objectives "
                               f"{sorted(objs)}, optimizers {sorted(entries)}")
        over[str(key)] = c.options(opts, path, fixed=run_keys)
    return Unlearn(common=common, objectives=objs, optimizers=entries, overrides=over)


def _sweep(c: _Checker, value: Any, unl: Unlearn) -> Sweep | None:
    if value is None:
        return None
    sw = c.mapping(value, "sweep")
    c.keys(sw, ("objective", "base", "grid"), "sweep")
    objective = c.objective_name(sw.get("objective", "graddiff"), "sweep.objective")
    base = c.options(sw.get("base"), "sweep.base", fixed=("objective", "optimizer", "seed"))
    grid = {}
    for opt, axes in c.mapping(sw.get("grid"), "sweep.grid").items():
        path = f"sweep.grid.{opt}"
        c.name(opt, path)
        if opt not in unl.optimizers:
            c.optimizer_name(str(opt), path)
        axes = c.mapping(axes, path)
        c.keys(axes, set(c.fields), path, "option")
        for key in ("objective", "optimizer", "seed", *PIPELINE_OPTIONS):
            if key in axes:
                raise c.fail(f"{path}.{key}", f"{key} cannot be a sweep axis (seeds: the preset's seeds)")
        grid[str(opt)] = {}
        for key, values in axes.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise c.fail(f"{path}.{key}", "an empty list of values")
            grid[str(opt)][key] = [c.option(key, v, f"{path}.{key}[{i}]") for i, v in enumerate(values)]
            for i, v in enumerate(grid[str(opt)][key]):
                if isinstance(v, str):  # a grid point's values are part of its run name
                    c.name(v, f"{path}.{key}[{i}]")
    return Sweep(objective=objective, base=base, grid=grid)


def _tune_rule(c: _Checker, value: Any) -> TuneRule:
    from soul.pipeline.tune import RULE_METRICS, TIE_KEYS

    rules: dict[str, Rule] = {"metric": (RULE_METRICS, None, None, False, False),
                              "utility_fraction": ("float", 0, 1, True, True),
                              "max_abs_privleak": ("float", 0, None, False, True),
                              "min_retain_rouge_fraction": ("float", 0, 1, True, True),
                              "tie": (TIE_KEYS, None, None, False, False)}
    spec = c.mapping(value, "tune.rule")
    c.keys(spec, tuple(rules), "tune.rule")
    return TuneRule(**c.ruled_mapping(spec, rules, "tune.rule"))


def _tune_grid(c: _Checker, value: Any, unl: Unlearn) -> dict[str, dict[str, list[Any]]]:
    grid = c.mapping(value, "tune.grid")
    if not grid:
        raise c.fail("tune.grid", "missing or empty: give per optimizer entry of unlearn.optimizers an lr list, "
                                  "e.g. {adamw: {lr: [1.0e-5, 3.0e-5, 1.0e-4]}}")
    out = {}
    for name, axes in grid.items():
        path = f"tune.grid.{name}"
        if name not in unl.optimizers:
            raise c.fail(path, f"not an optimizer entry of unlearn.optimizers {sorted(unl.optimizers)}")
        axes = c.mapping(axes, path, allow_none=False)
        c.keys(axes, tuple(TUNE_AXES), path, "option")
        if "lr" not in axes:
            raise c.fail(path, "needs lr: a list of learning rates to tune")
        out[str(name)] = {key: _tune_values(c, values, f"{path}.{key}", TUNE_AXES[key]) for key, values in axes.items()}
    return out


def _tune_values(c: _Checker, values: Any, path: str, rule: Rule) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise c.fail(path, f"must be a non-empty list, got {values!r}")
    checked = [c.ruled(v, f"{path}[{i}]", rule) for i, v in enumerate(values)]
    if len(set(checked)) != len(checked):
        raise c.fail(path, f"has a repeated value: {values!r}")
    return checked


def _tune(c: _Checker, value: Any, unl: Unlearn, task: Task) -> Tune | None:
    """``tune:``: keys, seeds, grid (entries of unlearn.optimizers, positive lr values), rule and flags;
    disjointness from the evaluation seeds is checked by the caller (`check_disjoint`)."""
    if value is None:
        return None
    spec = c.mapping(value, "tune", allow_none=False)
    c.keys(spec, TUNE_KEYS, "tune")
    if not task.supports_sweep:
        raise c.fail("tune", f"task {task.name!r} cannot be tuned: the rule reads forget quality, model utility, "
                             "PrivLeak and retain ROUGE-L (task 'tofu'); remove `tune:`")
    if "seeds" not in spec:
        raise c.fail("tune.seeds", "missing: the tuning seeds (a list disjoint from the evaluation `seeds`)")
    return Tune(seeds=c.seeds(spec["seeds"], "tune.seeds"), grid=_tune_grid(c, spec.get("grid"), unl),
                rule=_tune_rule(c, spec.get("rule")),
                extend_edges=c.typed(spec.get("extend_edges", True), "tune.extend_edges", bool))


def _influence_options(c: _Checker, cfg: dict[str, Any], path: str) -> dict[str, Any]:
    # Only the options a preset can give: influence_unlearn's loss_fn, params, generator and kfac_modules are code.
    c.keys(cfg, tuple(INFLUENCE_RULES), path, "option")
    cfg = c.ruled_mapping(cfg, INFLUENCE_RULES, path)
    if cfg.get("damping") is not None and cfg.get("damping_relative") is not None:
        raise c.fail(f"{path}.damping", "give either damping (absolute) or damping_relative (a fraction of "
                                        "the mean curvature), not both")
    return cfg


def _influence(c: _Checker, value: Any) -> dict[str, Any] | None:
    """One block of options (one row, ``influence``), or named blocks (one row each; `Preset.influence_runs`).
    A block's options are scalars, named blocks map to mappings: a mixture of the two is refused."""
    if value is None:
        return None
    cfg = c.mapping(value, "influence")
    nested = [k for k, v in cfg.items() if isinstance(v, dict)]
    if not nested:
        return _influence_options(c, cfg, "influence")
    if len(nested) != len(cfg):
        flat = next(k for k in cfg if k not in nested)
        raise c.fail(f"influence.{flat}", f"give either options (one row) or named rows ({nested[0]!r}: "
                                          "{options}), not both")
    for name in cfg:
        c.name(name, f"influence.{name}")
        if not str(name).startswith(INFLUENCE_ROW_PREFIX):
            raise c.fail(f"influence.{name}", f"a one-shot row's name must start with {INFLUENCE_ROW_PREFIX!r} "
                                              "(e.g. influence-kfac), so it never clashes with an unlearning run")
    return {name: _influence_options(c, dict(entry), f"influence.{name}") for name, entry in cfg.items()}


ATTACK_PIPELINE_KEYS = ("seeds", "influence")  # `attacks:` keys the pipeline reads (not soul.attack's)
_ATTACK_MESSAGE = re.compile(r"^(attacks(?:\.\w+)*)(?::\s*|\s+)(.*)$", re.S)


def _attacks(c: _Checker, value: Any, seeds: list[int], task: Task) -> tuple[dict[str, Any] | None, list[int] | None,
                                                                            bool]:
    """``(attacks config, attacked seeds, attack influence)``: every key and value of ``attacks:`` checked
    (names and options here, values by `soul.attack.run.normalize_config`), errors as ``attacks.<key path>``."""
    if value is None:
        return None, None, True
    from soul.attack.run import ATTACKS, COMMON_KEYS, DEFAULTS, normalize_config

    spec = c.mapping(value, "attacks", allow_none=False)
    c.keys(spec, (*ATTACKS, *COMMON_KEYS, *ATTACK_PIPELINE_KEYS), "attacks")
    for name in ATTACKS:
        options = spec.get(name)
        if isinstance(options, dict):
            c.keys(options, tuple(DEFAULTS[name]), f"attacks.{name}", "option")
        elif options is not None and not isinstance(options, bool):
            raise c.fail(f"attacks.{name}", f"expected a mapping of options, null (defaults) or false (off), "
                                            f"got {options!r}")
    relearn = spec.get("relearn")
    if isinstance(relearn, dict):
        if "seed" in relearn:
            c.ruled(relearn["seed"], "attacks.relearn.seed", SEED_RULE)
        options = relearn.get("train_options")
        if isinstance(options, dict):
            for key, v in options.items():
                name = str(key).replace("-", "_")
                if name in c.fields:
                    c.option(name, v, f"attacks.relearn.train_options.{key}")
    attack_seeds = None
    if spec.get("seeds") is not None:
        attack_seeds = c.seeds(spec["seeds"], "attacks.seeds")
        missing = [s for s in attack_seeds if s not in seeds]
        if missing:
            raise c.fail("attacks.seeds", f"seed(s) {missing} are not among the preset's seeds {seeds}")
    influence = c.typed(spec.get("influence", True), "attacks.influence", bool)
    try:
        cfg = normalize_config({k: v for k, v in spec.items() if k not in ATTACK_PIPELINE_KEYS})
    except ValueError as err:
        m = _ATTACK_MESSAGE.match(str(err))
        raise (c.fail(m.group(1), m.group(2)) if m else c.fail("attacks", str(err))) from None
    if not task.supports_attacks:
        raise c.fail("attacks", f"task {task.name!r} has no attacks: they score forget-set question-answer "
                                "records against the target and retain models (task 'tofu'); remove `attacks:`")
    return cfg, attack_seeds, influence


def _build(raw: dict[str, Any], c: _Checker) -> Preset:
    c.keys(raw, TOP_KEYS, "")
    task = raw.get("task", "tofu")
    if task not in TASKS:
        raise c.fail("task", f"task {task!r} is not supported by `soul reproduce`; supported: {list(TASKS)}")
    impl = TASKS[task]()
    s = lambda key, default=None: c.typed(raw.get(key, default), key, str, allow_none=True)  # noqa: E731
    for key in ("name", "description", "model"):
        c.typed(raw.get(key), key, str, allow_none=True)
    data = c.mapping(raw.get("data"), "data")
    c.keys(data, impl.data_keys, "data")
    c.typed(data.get("source"), "data.source", str, allow_none=True)
    data = c.ruled_mapping(data, DATA_RULES, "data")
    if data.get("bundled") is not None:
        bundled = c.mapping(data["bundled"], "data.bundled")
        c.keys(bundled, tuple(BUNDLED_RULES), "data.bundled")
        data["bundled"] = c.ruled_mapping(bundled, BUNDLED_RULES, "data.bundled")
        _check_bundled(c, data["bundled"])
    ev = c.mapping(raw.get("eval"), "eval")
    c.keys(ev, impl.eval_keys, "eval")
    ev = c.ruled_mapping(ev, EVAL_RULES, "eval")
    seed = c.ruled(raw.get("seed", 0), "seed", SEED_RULE)
    seeds = c.seeds(raw["seeds"], "seeds") if "seeds" in raw else [seed]
    utility = raw.get("utility_splits")
    if utility is not None:
        c.typed(utility, "utility_splits", list)
        for i, u in enumerate(utility):
            c.typed(u, f"utility_splits[{i}]", str)
    attacks, attack_seeds, attack_influence = _attacks(c, raw.get("attacks"), seeds, impl)
    unl = _unlearn(c, raw.get("unlearn"))
    preset = Preset(
        name=str(raw.get("name", "preset")), where=c.where, task=task, task_impl=impl,
        description=str(raw.get("description", "")), model=str(raw.get("model", "smollm2-135m")),
        dtype=s("dtype"), device=s("device", "auto") or "auto", prompt_format_option=s("prompt_format"),
        data=data, forget_split=s("forget_split", "forget10") or "forget10", retain_split=s("retain_split"),
        holdout_split=s("holdout_split"), utility_splits=list(utility) if utility is not None else [],
        max_questions=c.ruled(raw.get("max_questions"), "max_questions", ("int", 1, None, False, True)),
        target=_reference(c, raw.get("target"), "target"), retain=_reference(c, raw.get("retain"), "retain"),
        unlearn=unl, influence=_influence(c, raw.get("influence")), eval=ev, sweep=_sweep(c, raw.get("sweep"), unl),
        seed=seed, seeds=seeds, progress_bars=c.typed(raw.get("progress_bars", True), "progress_bars", bool),
        attacks=attacks, attack_seeds=attack_seeds, attack_influence=attack_influence,
        tune=_tune(c, raw.get("tune"), unl, impl))
    check_disjoint(preset.tune, preset.seeds, c.where)
    if utility is None and task == "tofu":
        preset.utility_splits = list(impl.default_utility_splits)
    impl.check(preset, c.fail)
    _check_runs(preset, c)
    return preset


def _check_bundled(c: _Checker, bundled: dict[str, Any]) -> None:
    """``data.bundled``: the ranges `soul.data.bundled_dir` (`check_benchmark_args`) enforces."""
    from soul.data.generate import check_benchmark_args

    try:
        check_benchmark_args(bundled.get("n_authors", 20), bundled.get("qas_per_author", 10),
                             bundled.get("n_perturbed", 4))
    except ValueError as err:
        key = next((k for k in ("n_authors", "qas_per_author", "n_perturbed") if str(err).startswith(k)), "")
        raise c.fail(f"data.bundled.{key}" if key else "data.bundled", str(err)) from None


def _check_runs(preset: Preset, c: _Checker) -> None:
    """Every run's merged options are a valid TrainConfig and objective (value ranges, coefficients), and
    every run name is one safe path component (the names' parts were checked where they were given)."""
    for spec in unlearn_configs(preset):
        c.name(spec["name"], f"unlearn run {spec['group']}")
        c.run_config(spec["config"], spec["objective"], spec["optimizer_type"], f"unlearn run {spec['group']}")
    if preset.sweep is not None and preset.sweep.grid:
        for spec in sweep_grid(preset):
            c.name(spec["name"], f"sweep run {spec['group']}")
            c.run_config(spec["config"], spec["objective"], spec["optimizer_type"], f"sweep run {spec['group']}")
    if preset.tune is not None:
        for obj in preset.unlearn.objectives:
            for opt, axes in preset.tune.grid.items():
                for spec in tuning_specs(preset, obj, opt, grid_points(axes), preset.tune.seeds):
                    c.name(spec["name"], f"tune run {spec['group']}")
                    c.run_config(spec["config"], spec["objective"], spec["optimizer_type"], f"tune run {spec['group']}")
    for role in ("target", "retain"):
        ft = getattr(preset, role).finetune
        if ft:
            c.run_config(ft, "finetune", "adamw", f"{role}.finetune")
