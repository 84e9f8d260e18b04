"""The interface every `soul.pipeline` task implements: its data, its reference models, its evaluation and
its report columns. The stages (`soul.pipeline.stages`) only call these methods, so a new benchmark is one
file with one `Task` subclass and one line in `soul.pipeline.tasks.TASKS`.

The unlearning data of every task is a dict of split name → QA records (``{"question", "answer"}``) holding
the task's forget and retain splits (`splits`), ``full`` (what the target is fine-tuned on), and evaluation
inputs under task-specific keys, so `soul.train.unlearn` and one-shot influence run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from soul.pipeline.common import sha

if TYPE_CHECKING:  # annotations only
    from soul.pipeline.preset_types import Preset

Fail = Callable[[str, str], Exception]  # (key path, problem) -> the error to raise


class Task:
    name: ClassVar[str] = ""
    data_keys: ClassVar[tuple[str, ...]] = ("source",)  # keys allowed under the preset's ``data``
    eval_keys: ClassVar[tuple[str, ...]] = ("batch_size",)  # keys allowed under ``eval``
    default_prompt_format: ClassVar[str] = "auto"
    reference_roles: ClassVar[tuple[str, ...]] = ("target",)  # reference models, in fine-tuning order
    supports_sweep: ClassVar[bool] = False  # `soul sweep` needs forget quality and model utility
    report_group: ClassVar[str] = ""  # the `soul.report.results.Column.group` of this task's metrics
    supports_attacks: ClassVar[bool] = False  # preset ``attacks:`` (soul.attack: forget QA vs target/retain)

    # --- preset
    def check(self, preset: Preset, fail: Fail) -> None:
        """Task-specific preset checks (run by `load_preset`, before any work); raise ``fail(path, problem)``."""
        if not preset.data.get("source"):
            raise fail("data.source", f"task {self.name!r} needs data.source")

    def check_inputs(self, preset: Preset) -> None:
        """Read and check the task's input files before anything is written (`plan_reproduce` / `plan_sweep`
        call it; a bad file is a one-line ValueError / OSError naming it). Default: nothing to read early."""

    def meta(self, preset: Preset) -> dict[str, Any]:
        """Entries for results.json ``meta`` (e.g. ``data_licences``: the licence of each dataset used)."""
        return {}

    def splits(self, preset: Preset) -> tuple[str, str]:
        """(forget split, retain split) of the unlearning data."""
        return ("forget", "retain")

    # --- data and reference models
    def load_data(self, preset: Preset) -> dict[str, Any]:
        raise NotImplementedError

    def finetunes(self, role: str, preset: Preset) -> bool:
        """Whether reference model `role` is a fine-tune of the base (else the base or `<role>.model`)."""
        ref = getattr(preset, role)
        return not ref.model and ref.finetune is not None

    def reference_split(self, role: str, preset: Preset) -> str:
        """The split reference model `role` is fine-tuned on."""
        return "full" if role == "target" else self.splits(preset)[1]

    def attack_records(self, preset: Preset, data: dict[str, Any]) -> list[dict]:
        """The forget records the attacks of `soul.attack` score (tasks with `supports_attacks`)."""
        raise NotImplementedError(f"task {self.name!r} has no attacks")

    # --- evaluation
    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        """The task's metrics for one model (each ``{"agg_value", "value_by_index"}``)."""
        raise NotImplementedError

    def eval_cache_key(self, preset: Preset, data: dict[str, Any], reference: dict[str, Any] | None) -> Any:
        """What a cached reference-model evaluation depends on besides the model."""
        return {"task": self.name, "eval": preset.eval, "data": sha(data["_eval"])}

    def prepare_reference(self, role: str, results: dict[str, Any]) -> None:
        """Hook to complete a reference model's results (TOFU: the retain model against itself)."""

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]] | None:
        """Example generations for the report; None: the report reads TOFU's keys itself."""
        return None

    def cap(self, records: list, preset: Preset) -> list:
        """The first ``max_questions`` records (all when it is None). `load_preset` refuses anything but a
        positive integer; checked again here because a slice by 0 or -1 would silently drop records."""
        n = preset.max_questions
        if n is None:
            return records
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"preset {preset.where}: max_questions: must be a positive integer or null, got {n!r}")
        return records[:n]
