"""Detoxification: forget = `soul.data.load_detox` pairs (prompt, unsafe response); retain = the safe
responses of the same prompts, or ``data.retain_source``/``data.retain_split`` QA records. Metrics: toxicity
of greedy answers to the forget prompts (`soul.eval.toxicity_eval`, offline scorer by default:
``forget_toxicity``, ``forget_toxic_rate``) and the mean answer probability exp(−mean NLL) of the retain
answers (``retain_answer_prob``).

Preset ``data``: ``source``, ``split`` ("train"), ``n_forget``, ``retain_source``, ``retain_split``.
``eval``: ``batch_size`` (16), ``max_new_tokens`` (32), ``scorer`` ("profanity"), ``threshold`` (0.5),
``prompt_format`` (the training format).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from soul.pipeline.tasks.base import Task
from soul.pipeline.tasks.copyright import examples_from

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset


def answer_probability(model, tokenizer, records: list[dict], *, prompt_format: str = "auto",
                       batch_size: int = 16) -> dict[str, Any]:
    """``{"agg_value": mean_i exp(−NLL_i), "value_by_index"}`` where NLL_i is the mean answer-token negative
    log-likelihood of record i given its question (TOFU's length-normalised answer probability)."""
    from soul.data import encode_qa
    from soul.eval.scoring import get_implementation

    if not records:
        raise ValueError("answer probability needs at least one record")
    score_fn, _ = get_implementation("batched")
    feats = [encode_qa(tokenizer, r["question"], r["answer"], prompt_format=prompt_format) for r in records]
    stats = score_fn(model, feats, tokenizer.pad_token_id, batch_size=batch_size)
    per = {str(i): {"score": math.exp(-s.mean_nll), "nll": s.mean_nll, "question": r["question"]}
           for i, (r, s) in enumerate(zip(records, stats))}
    return {"agg_value": sum(v["score"] for v in per.values()) / len(per), "value_by_index": per}


class DetoxTask(Task):
    name = "detox"
    data_keys = ("source", "split", "n_forget", "retain_source", "retain_split")
    eval_keys = ("batch_size", "max_new_tokens", "scorer", "threshold", "prompt_format")
    report_group = "detox"

    def load_data(self, preset: Preset) -> dict[str, Any]:
        from soul.data import load_detox, load_split

        data = preset.data
        pairs = load_detox(data["source"], data.get("split", "train"))
        forget = [{"question": p["question"], "answer": p["answer"]} for p in pairs]
        if data.get("retain_source"):
            retain = load_split(str(data["retain_source"]), str(data.get("retain_split", "retain")))
        else:
            retain = [{"question": p["question"], "answer": p["safe_answer"]} for p in pairs if "safe_answer" in p]
            if not retain:
                raise ValueError(f"preset {preset.where}: {data['source']} has no safe responses to keep; set "
                                 "data.retain_source (and data.retain_split) to a QA retain set")
        prompts = list(dict.fromkeys(r["question"] for r in forget))  # a prompt with two unsafe answers once
        ev = {"forget_prompts": self.cap(prompts, preset), "retain": self.cap(retain, preset)}
        if data.get("n_forget"):
            forget = forget[:data["n_forget"]]
        return {"forget": forget, "retain": retain, "full": forget + retain, "_eval": ev}

    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        from soul.eval import toxicity_eval

        ev = preset.eval
        bs, new = int(ev.get("batch_size", 16)), int(ev.get("max_new_tokens", 32))
        fmt = str(ev.get("prompt_format", preset.prompt_format))
        model.eval()
        res = toxicity_eval(model, tokenizer, data["_eval"]["forget_prompts"], scorer=ev.get("scorer", "profanity"),
                            threshold=float(ev.get("threshold", 0.5)), prompt_format=fmt, max_new_tokens=new,
                            batch_size=bs)
        return {"forget_toxicity": res["toxicity_mean"], "forget_toxic_rate": res["toxicity_rate"],
                "retain_answer_prob": answer_probability(model, tokenizer, data["_eval"]["retain"],
                                                         prompt_format=fmt, batch_size=bs)}

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        return examples_from(metrics, {"forget": ("forget_toxicity",), "retain": ()})
