"""The attacks of a `reproduce` grid (preset ``attacks:``, `soul.attack`): the target's and retain model's
side once per grid, then every configured attack on each unlearned model of the attacked seeds (and on the
one-shot influence model) while it is still in memory.

Each attacked run gets ``run["attacks"]`` (its robustness column values, `soul.attack.report.row_values`)
and ``run["attacks_file"]`` (the full `run_attacks` result, ``<out>/attacks/<run name>.json``, written
atomically); the target row gets the 4-bit etc. quantization noise and the retain row the relearning
baseline (`row_values` with role "target" / "retain").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from soul.pipeline.common import Progress, load, path_under
from soul.pipeline.preset_types import PresetError

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset


def describe(cfg: dict[str, Any]) -> str:
    """``relearn (5 steps), quantize (4-bit), paraphrase``: what one attack pass runs."""
    parts = []
    if "relearn" in cfg:
        parts.append(f"relearn ({cfg['relearn']['steps']} steps)")
    if "quantize" in cfg:
        parts.append("quantize (" + ", ".join(f"{b}-bit" for b in cfg["quantize"]["bits"]) + ")")
    if "paraphrase" in cfg:
        parts.append("paraphrase")
    return ", ".join(parts)


class Robustness:
    """The attacks of one `reproduce` call (`preset.attacks` must be set)."""

    def __init__(self, preset: Preset, out: Path, progress: Progress) -> None:
        assert preset.attacks is not None
        self.preset, self.out, self.progress = preset, out, progress
        self.cfg = preset.attacks
        wanted = preset.attack_seeds if preset.attack_seeds is not None else preset.seeds
        self.seeds = [s for s in wanted if s in preset.seeds]
        if not self.seeds:
            progress.say(f"attacks: none of attacks.seeds {wanted} is run (seeds {preset.seeds}); no unlearned "
                         "model is attacked")
        self.forget: list[dict] | None = None
        self.references: dict[str, Any] | None = None
        self.first: dict[str, Any] | None = None  # one result: the references' row values come from it

    @property
    def split(self) -> str:
        return self.preset.task_impl.splits(self.preset)[0]  # TOFU: preset.forget_split; text tasks: "forget"

    def eval_kwargs(self) -> dict[str, Any]:
        return self.preset.task_impl.eval_kwargs(self.preset)

    def check_data(self, data: dict[str, Any]) -> None:
        """The attacks' forget records, checked (two authors for relearning, paraphrases for the probe) as
        soon as the data is read: a `PresetError` naming ``attacks`` before any model is trained."""
        from soul.attack.run import check_inputs

        self.forget = self.preset.task_impl.attack_records(self.preset, data)
        try:
            check_inputs(self.cfg, {self.split: self.forget}, self.split)
        except ValueError as err:
            raise PresetError(self.preset.where, "attacks", f"{err} (forget split {self.split!r})") from None

    def wants(self, run: dict[str, Any]) -> bool:
        if run.get("role") == "influence":
            return self.preset.attack_influence
        return run.get("seed") in self.seeds

    @property
    def active(self) -> bool:
        return bool(self.seeds) or (bool(self.preset.influence_runs) and self.preset.attack_influence)

    def compute_references(self, ctx: dict[str, Any]) -> None:
        """The target's and retain model's side of every attack, each model loaded in turn (once per grid)."""
        from soul.attack import attack_references

        assert self.forget is not None, "check_data first"
        refs: dict[str, Any] = {"key": None, "target": None, "retain": None, "describe": {}}
        for row in ctx["runs"]:
            role = row["role"]
            self.progress.say(f"attacks on the {role} model (reference): {describe(self.cfg)}")
            model, tokenizer = load(row["model"], self.preset)
            one = attack_references({role: (model, tokenizer)}, attacks_cfg=self.cfg,
                                    data={self.split: self.forget}, forget_split=self.split,
                                    eval_kwargs=self.eval_kwargs())
            del model
            refs["key"], refs[role] = one["key"], one[role]
            refs["describe"][role] = str(row["model"])
        self.references = refs

    def attack(self, model: Any, tokenizer: Any, run: dict[str, Any]) -> None:
        """Every configured attack on `run`'s model; stores the column values and the result file on `run`."""
        from soul.attack import run_attacks
        from soul.attack.report import row_values

        path = path_under(self.out, "attacks", f"{run['name']}.json")
        result = run_attacks(model, tokenizer, attacks_cfg=self.cfg, data={self.split: self.forget},
                             forget_split=self.split, eval_kwargs=self.eval_kwargs(),
                             reference_results=self.references, out=path)
        run["attacks"] = row_values(result, "unlearned")
        run["attacks_file"] = str(path)
        self.first = self.first or result

    def finish(self, runs: list[dict[str, Any]]) -> None:
        """The reference rows' values (target: quantization noise; retain: the relearning baseline)."""
        from soul.attack.report import row_values

        if self.first is None:
            return
        for run in runs:
            if run.get("role") in ("target", "retain"):
                run["attacks"] = row_values(self.first, run["role"])
