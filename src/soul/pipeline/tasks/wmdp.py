"""Hazardous knowledge (WMDP-style): forget / retain as for the copyright task (a forget corpus of the
hazardous topic); metrics: multiple-choice accuracy (`soul.eval.multiple_choice_eval`) on ``data.mc_source``
(the forget topic, ``forget_mc_accuracy``) and ``data.utility_mc_source`` (general knowledge,
``utility_mc_accuracy``).

Preset ``data``: the copyright task's corpus keys plus ``mc_source``, ``mc_name``, ``mc_split`` ("test") and
``utility_mc_source``, ``utility_mc_name``, ``utility_mc_split``. ``eval``: ``batch_size`` (16),
``mc_protocol`` ("lm_eval": lettered choices scored as lm-evaluation-harness's wmdp / mmlu tasks do, the
protocol of published numbers; "cloze": each choice's text as the answer, see `soul.eval.multiple_choice`),
``prompt_format`` (cloze only; "plain", i.e. "Question: …\\nAnswer:").

lm-eval's description names the topic: for WMDP from ``mc_name`` (``wmdp-bio`` → biology, …), for MMLU from
each record's ``subject`` field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from soul.pipeline.tasks.base import Fail, Task
from soul.pipeline.tasks.copyright import CORPUS_KEYS, corpus_qa

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset

DEFAULT_PROTOCOL = "lm_eval"  # published WMDP / MMLU accuracies are lm-eval's


class WmdpTask(Task):
    name = "wmdp"
    data_keys = (*CORPUS_KEYS, "mc_source", "mc_name", "mc_split", "utility_mc_source", "utility_mc_name",
                 "utility_mc_split")
    eval_keys = ("batch_size", "prompt_format", "mc_protocol")
    default_prompt_format = "raw"
    report_group = "wmdp"

    def check(self, preset: Preset, fail: Fail) -> None:
        super().check(preset, fail)
        for key in ("mc_source", "utility_mc_source"):
            if not preset.data.get(key):
                raise fail(f"data.{key}", f"task 'wmdp' needs data.{key} (a multiple-choice set)")

    def load_data(self, preset: Preset) -> dict[str, Any]:
        from soul.data import load_multiple_choice

        data = preset.data
        _, _, forget, retain = corpus_qa(preset)
        ev = {f"{role}_mc": self.cap(load_multiple_choice(data[f"{prefix}mc_source"], data.get(f"{prefix}mc_name"),
                                                          data.get(f"{prefix}mc_split", "test")), preset)
              for role, prefix in (("forget", ""), ("utility", "utility_"))}
        return {"forget": forget, "retain": retain, "full": forget + retain, "_eval": ev}

    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        from soul.eval import multiple_choice_eval
        from soul.eval.multiple_choice import WMDP_SUBJECTS

        model.eval()
        fmt, bs = str(preset.eval.get("prompt_format", "plain")), int(preset.eval.get("batch_size", 16))
        return {f"{role}_mc_accuracy": multiple_choice_eval(
                    model, tokenizer, data["_eval"][f"{role}_mc"], protocol=self.protocol(preset),
                    subject=WMDP_SUBJECTS.get(str(preset.data.get(f"{prefix}mc_name"))), prompt_format=fmt,
                    batch_size=bs)["mc_accuracy"]
                for role, prefix in (("forget", ""), ("utility", "utility_"))}

    @staticmethod
    def protocol(preset: Preset) -> str:
        return str(preset.eval.get("mc_protocol", DEFAULT_PROTOCOL))

    def eval_cache_key(self, preset: Preset, data: dict[str, Any], reference: dict[str, Any] | None) -> Any:
        # The protocol in force, not only what the preset spells: a cached evaluation from before lm_eval
        # became the default (the preset silent on it) was cloze, and must not be reused.
        return {**super().eval_cache_key(preset, data, reference), "mc_protocol": self.protocol(preset)}

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        return {"forget": [], "retain": []}  # multiple choice records no generations
