"""The runs a preset asks for: the objective × optimizer × seed grid of `soul reproduce`, the tuning grid of its
``tune:`` block and the per-optimizer option grid × seed of `soul sweep`. Pure functions of the preset (no
data, no models).

A *spec* is ``{"name", "group", "objective", "optimizer", "optimizer_type", "seed", "config"}`` (sweep specs
add ``"point"``): ``name`` is unique per run (``graddiff-sophia-s1``), ``group`` is the same for every seed of
one setting (``graddiff-sophia``) and is what the report aggregates over; ``optimizer`` is the preset's
optimizer entry name and ``optimizer_type`` what `soul.optim.build_optimizer` builds.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from soul.pipeline.preset_types import Preset


def _per_seed(preset: Preset, group: str, base: dict[str, Any], cfg: dict[str, Any],
              seeds: list[int] | None = None) -> list[dict[str, Any]]:
    specs = []
    for seed in preset.seeds if seeds is None else seeds:
        # The seed drives data order and GNB label sampling (the preset cannot set it per run: see preset.py).
        config = {**cfg, "seed": seed}
        # The model must see the prompt format it was fine-tuned with, in every stage.
        config.setdefault("prompt_format", preset.prompt_format)
        specs.append({**base, "name": f"{group}-s{config['seed']}", "group": group, "seed": config["seed"],
                      "config": config})
    return specs


def unlearn_configs(preset: Preset) -> list[dict[str, Any]]:
    """One spec per objective × optimizer entry × seed; options ``common`` < objective < optimizer entry <
    ``overrides["<objective>/<entry>"]``. Every run gets the same step budget (``max_steps``/epochs from
    ``common``) unless an override changes it on purpose."""
    specs = []
    for obj in preset.unlearn.objectives:
        for name, entry in preset.unlearn.optimizers.items():
            base = {"objective": obj, "optimizer": name, "optimizer_type": entry.optimizer}
            specs += _per_seed(preset, f"{obj}-{name}", base, run_options(preset, obj, name))
    return specs


def run_options(preset: Preset, objective: str, optimizer: str) -> dict[str, Any]:
    """The merged options of one objective × optimizer entry (before the seed): ``common`` < objective <
    optimizer entry < ``overrides["<objective>/<entry>"]``."""
    unl = preset.unlearn
    return {**unl.common, **unl.objectives[objective], **unl.optimizers[optimizer].options,
            **unl.overrides.get(f"{objective}/{optimizer}", {})}


def grid_points(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of option lists, in order: ``{"lr": [1, 2], "max_steps": [8]}`` → 2 points."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def point_tag(point: dict[str, Any]) -> str:
    """A grid point as a run-name fragment: ``lr0.0001-max_steps8``."""
    return "-".join(f"{k}{v}" for k, v in point.items())


def tuning_specs(preset: Preset, objective: str, optimizer: str, points: list[dict[str, Any]],
                 seeds: list[int]) -> list[dict[str, Any]]:
    """One spec per point × tuning seed of one objective × optimizer entry: the evaluation run's options
    (`run_options`) with the point's on top, so the chosen point later runs exactly as it was tuned.
    Groups are ``tune-<objective>-<entry>-<point tag>``; specs add ``"point"`` and ``"key"``."""
    base = {"objective": objective, "optimizer": optimizer,
            "optimizer_type": preset.unlearn.optimizers[optimizer].optimizer}
    specs = []
    for point in points:
        cfg = {**run_options(preset, objective, optimizer), **point}
        specs += [{**s, "point": point, "key": f"{objective}/{optimizer}"} for s in _per_seed(
            preset, f"tune-{objective}-{optimizer}-{point_tag(point)}", base, cfg, seeds)]
    return specs


def with_choice(specs: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`specs` with each tuned setting's chosen options (``chosen["<objective>/<entry>"]``) over its
    config; names, groups and seeds are unchanged."""
    out = []
    for spec in specs:
        options = chosen.get(f"{spec['objective']}/{spec['optimizer']}")
        out.append({**spec, "config": {**spec["config"], **options}} if options else spec)
    return out


def sweep_grid(preset: Preset) -> list[dict[str, Any]]:
    """One spec per grid point × seed: per optimizer, the Cartesian product of its option lists (e.g. lr ×
    gamma × max_steps) over the sweep's base options (``unlearn.common`` < the objective's options < the
    optimizer entry's < ``sweep.base`` < the point)."""
    sw = preset.sweep
    if sw is None or not sw.grid:
        raise ValueError(f"preset {preset.where}: sweep.grid: missing (a mapping optimizer -> option -> values)")
    unl = preset.unlearn
    base = {**unl.common, **unl.objectives.get(sw.objective, {})}
    specs = []
    for opt, axes in sw.grid.items():
        entry = unl.optimizers.get(opt)
        kind = entry.optimizer if entry else opt
        opt_base = {**base, **(entry.options if entry else {}), **sw.base}
        for point in grid_points(axes):
            specs += [{**s, "point": point} for s in _per_seed(
                preset, f"sweep-{sw.objective}-{opt}-{point_tag(point)}",
                {"objective": sw.objective, "optimizer": opt, "optimizer_type": kind}, {**opt_base, **point})]
    return specs


def select(specs: list[dict[str, Any]], only: list[str] | None, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The specs `only` names (a run name ``graddiff-sophia-s1``, a group ``graddiff-sophia`` for all its
    seeds), all when `only` is empty. A name matching nothing (nor one of `extra`, e.g. ``influence``) is a
    ValueError listing what exists, raised before anything runs."""
    if not only:
        return specs
    known = {s["name"] for s in specs} | {s["group"] for s in specs} | set(extra)
    unknown = [n for n in only if n not in known]
    if unknown:
        groups = sorted({s["group"] for s in specs})
        raise ValueError(f"--only {' '.join(unknown)}: no such run; runs: {', '.join(groups + list(extra))} "
                         f"(add -s<seed> for one seed)")
    return [s for s in specs if s["name"] in only or s["group"] in only]
