"""The end-to-end job: `reproduce` SOUL's first-order vs second-order comparison, and `sweep` its settings.

`reproduce(preset, out_dir)` reads a typed preset (`preset.load_preset`: every key checked first), then runs
the stages of `stages` in order — reference models (fine-tuned once, cached by content hash), the objective ×
optimizer × seed grid of `grid` plus one-shot influence, evaluation, and the report (`soul.report`). Each
benchmark (TOFU, copyright, detox, WMDP) is one `tasks.Task` class. `sweep(preset, out_dir)` runs a grid of
options per optimizer (× seeds) for one objective and reports the Pareto front and the best setting.

With ``attacks:`` in the preset, `reproduce` also attacks each unlearned model (`robustness`, `soul.attack`);
with ``tune:`` it first picks each optimizer's setting on tuning seeds disjoint from the evaluation seeds
(`tune`).

Module graph (no cycles, function-level imports included): preset_types, common ← tasks, grid ← tune ←
preset ← stages, robustness ← api ← this package.
"""

from __future__ import annotations

from soul.pipeline.api import reproduce, sweep
from soul.pipeline.common import Progress, hash_records, model_fingerprint
from soul.pipeline.grid import select, sweep_grid, unlearn_configs
from soul.pipeline.preset import Preset, PresetError, list_presets, load_preset, read_preset
from soul.pipeline.tasks import TASKS, Task

__all__ = ["TASKS", "Preset", "PresetError", "Progress", "Task", "hash_records", "list_presets", "load_preset",
           "model_fingerprint", "read_preset", "reproduce", "select", "sweep", "sweep_grid", "unlearn_configs"]
