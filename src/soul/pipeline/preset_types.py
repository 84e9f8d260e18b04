"""The types of a validated `soul reproduce` / `soul sweep` preset (`Preset` and its parts) and `PresetError`.

This module imports no other `soul.pipeline` module, so the grid (`grid`), the tasks (`tasks`) and the
stages can all import it while `preset` (the reader and checker) imports them: no import circle. A
`Preset` carries its task object (`task_impl`, set by `soul.pipeline.preset.load_preset`) instead of
looking it up in the task registry, which would import the tasks from here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

# A name the pipeline joins into a path (optimizer entries, objectives, run names, sweep values): one path
# component that can neither climb (``..``) nor descend (``/``), nor hide (a leading dot) or read as an option.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
SAFE_NAME_TEXT = "letters, digits and . _ + - (starting with a letter or digit, no '..')"
MAX_SEED = 2**32 - 1  # numpy's and Python's random seeders accept 0..2**32-1 (torch more)


def unsafe_name(name: Any) -> str | None:
    """Why `name` cannot be joined into a path as one component, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {name!r}"
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        return f"{name!r} is not a safe name: use {SAFE_NAME_TEXT}"
    return None


class PresetError(ValueError):
    """A bad preset: ``preset <file>: <key path>: <problem>``."""

    def __init__(self, where: str, path: str, problem: str) -> None:
        self.where, self.path, self.problem = where, path, problem
        super().__init__(f"preset {where}: {path + ': ' if path else ''}{problem}")


def check_seeds(value: Any, where: str, path: str) -> list[int]:
    """`value` as a list of seeds: non-empty, integers in 0..2**32-1, no repeats; else a `PresetError`."""
    if not isinstance(value, list) or not value:
        raise PresetError(where, path, f"must be a non-empty list of integers, got {value!r}")
    for i, s in enumerate(value):
        if not isinstance(s, int) or isinstance(s, bool):
            raise PresetError(where, f"{path}[{i}]", f"must be int, got {s!r}")
        if not 0 <= s <= MAX_SEED:
            raise PresetError(where, f"{path}[{i}]", f"must be a seed in 0..{MAX_SEED}, got {s!r}")
    if len(set(value)) != len(value):
        raise PresetError(where, path, f"has a repeated seed: {value!r}")
    return list(value)


@dataclass
class OptimizerEntry:
    """One optimizer column of the grid: `name` labels the runs, `optimizer` is what `build_optimizer`
    builds, `options` are TrainConfig options (lr, rho, hessian_interval, ...)."""

    name: str
    optimizer: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reference:
    """A reference model (target or retain): a ready `model`, or a fine-tune of the base with `finetune`."""

    model: str | None = None
    finetune: dict[str, Any] | None = None


@dataclass
class Unlearn:
    common: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizers: dict[str, OptimizerEntry] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Sweep:
    objective: str = "graddiff"
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@dataclass
class TuneRule:
    """How the tuning stage picks a setting (see `soul.pipeline.tune`): the highest mean `metric` among the
    admissible points; a guard left at None is off."""

    metric: str = "forget_quality"
    utility_fraction: float | None = 0.95  # mean model utility >= fraction × the target's
    max_abs_privleak: float | None = None  # |PrivLeak| (percent) <= this: no over-unlearning
    min_retain_rouge_fraction: float | None = None  # retain ROUGE-L >= fraction × the target's
    tie: str = "update_norm_total"  # metric ties (rel 1e-9) go to the smaller mean of this diagnostic


@dataclass
class Tune:
    """The preset's ``tune:`` block: per optimizer entry an option grid (``lr`` [, ``max_steps``]) run on the
    tuning `seeds`, which never overlap the evaluation seeds."""

    seeds: list[int] = field(default_factory=list)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    rule: TuneRule = field(default_factory=TuneRule)
    extend_edges: bool = True


def check_disjoint(tune: Tune | None, seeds: list[int], where: str, after: str = "") -> None:
    """Tuning and evaluation seeds must not overlap: a setting chosen on a seed and scored on it again would
    be scored on the data order it was picked for (`after` names the flags that changed either set)."""
    if tune is None:
        return
    both = sorted(set(tune.seeds) & set(seeds))
    if both:
        raise PresetError(where, "tune.seeds", f"seed(s) {both} are both tuning seeds {tune.seeds} and evaluation "
                                               f"seeds {seeds}{after}; the two sets must be disjoint")


@dataclass
class Preset:
    """A validated preset (see `soul.pipeline.preset`). `where` is the file it came from (for messages);
    `task_impl` is the `soul.pipeline.tasks.Task` object of `task` (typed Any: see the module doc)."""

    name: str
    where: str
    task: str = "tofu"
    task_impl: Any = field(default=None, repr=False, compare=False)
    description: str = ""
    model: str = "smollm2-135m"
    dtype: str | None = None
    device: str = "auto"
    prompt_format_option: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    forget_split: str = "forget10"
    retain_split: str | None = None
    holdout_split: str | None = None
    utility_splits: list[str] = field(default_factory=list)
    max_questions: int | None = None
    target: Reference = field(default_factory=Reference)
    retain: Reference = field(default_factory=Reference)
    unlearn: Unlearn = field(default_factory=Unlearn)
    influence: dict[str, Any] | None = None  # one block of options, or named blocks (see `influence_runs`)
    eval: dict[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    progress_bars: bool = True
    attacks: dict[str, Any] | None = None  # `soul.attack.run.normalize_config`'s output (run_attacks' attacks_cfg)
    attack_seeds: list[int] | None = None  # the seeds whose unlearned models are attacked (None: every seed)
    attack_influence: bool = True  # attack the one-shot influence model too
    tune: Tune | None = None  # the tuning protocol of `soul reproduce` (None: every run at its preset options)

    @property
    def influence_runs(self) -> dict[str, dict[str, Any]]:
        """One-shot influence rows, name -> options: ``{"influence": block}`` for one block of options, the
        named blocks as given (``influence-kfac: {hessian: kfac, ...}``), ``{}`` without ``influence``."""
        if self.influence is None:
            return {}
        if self.influence and all(isinstance(v, dict) for v in self.influence.values()):
            return {name: dict(cfg) for name, cfg in self.influence.items()}
        return {"influence": dict(self.influence)}

    @property
    def prompt_format(self) -> str:
        """The preset's prompt format, else the task's default (``raw`` for text corpora, ``auto`` else)."""
        return self.prompt_format_option or self.task_impl.default_prompt_format

    def with_seeds(self, seeds: list[int]) -> Preset:
        """A copy running `seeds` instead (the command line's ``--seeds``)."""
        return dataclasses.replace(self, seeds=check_seeds(seeds, self.where, "seeds"))

    def with_tune_seeds(self, seeds: list[int]) -> Preset:
        """A copy tuning on `seeds` instead (the command line's ``--tune-seeds``); needs a ``tune:`` block."""
        if self.tune is None:
            raise PresetError(self.where, "tune", "--tune-seeds needs a tune: block in the preset (the grid to "
                                                  "tune); this preset has none")
        tune = dataclasses.replace(self.tune, seeds=check_seeds(seeds, self.where, "tune.seeds"))
        return dataclasses.replace(self, tune=tune)

    def without_tune(self) -> Preset:
        """A copy with no tuning stage (``--no-tune``): every run at its preset options."""
        return dataclasses.replace(self, tune=None)
