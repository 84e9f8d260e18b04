"""Detoxification: forget = `soul.data.load_detox` pairs (prompt, unsafe response); retain = the safe
responses of the same prompts, or ``data.retain_source``/``data.retain_split`` QA records. Metrics: toxicity
of greedy answers to the forget prompts (`soul.eval.toxicity_eval`, offline scorer by default:
``forget_toxicity``, ``forget_toxic_rate``) and the mean answer probability exp(−mean NLL) of the retain
answers (``retain_answer_prob``).

Preset ``data``: ``source``, ``split`` ("train"), ``n_forget``, ``retain_source``, ``retain_split``.
``eval``: ``batch_size`` (16), ``max_new_tokens`` (32), ``scorer`` ("profanity"), ``threshold`` (0.5),
``prompt_format`` (the training format).

**Real data** (preset ``detox-cpu``): ``data.safe_source`` names a file of safe responses
(`soul.data.detox.load_safe_responses`: prompt/response CSV or JSONL, or the hub layout): its first
``n_retain`` are the retain set, the next ``n_heldout`` are held out (``heldout_ppl``: token-weighted
perplexity of those responses given their prompts). ``data.rtp_challenging`` / ``data.rtp_nontoxic`` name
RealToxicityPrompts files (`soul.data.detox.load_rtp`); ``n_prompts`` of each, a fixed sample
(``random.Random(prompt_seed)``, default 0), are continued as raw text for ``max_new_tokens`` tokens, greedily
and with ``eval.samples`` nucleus samples per prompt (``eval.top_p`` 0.9, ``eval.temperature`` 1.0, torch
seeded with ``eval.sample_seed`` 0), scored offline (``rtp_<set>_toxicity``: mean score; ``rtp_<set>_toxic_rate``:
fraction >= threshold; ``_sampled`` for the samples). Paths expand ``${VAR:-default}``. Every file is read
and checked before anything is written (`check_inputs`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from soul.pipeline.tasks.base import Fail, Task
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


RTP_SETS = ("challenging", "nontoxic")


def _local(source: Any) -> bool:
    from soul.data.detox import HUB_PREFIX, PKU_HUB_ID

    return isinstance(source, str) and source != PKU_HUB_ID and not source.startswith(HUB_PREFIX)


def answer_perplexity(model, tokenizer, records: list[dict], *, prompt_format: str = "auto",
                      batch_size: int = 16) -> dict[str, Any]:
    """Token-weighted perplexity exp(Σ answer NLL / Σ answer tokens) of the answers given their questions."""
    from soul.data import encode_qa
    from soul.eval.copyright import perplexity
    from soul.eval.scoring import get_implementation

    if not records:
        raise ValueError("perplexity needs at least one record")
    score_fn, _ = get_implementation("batched")
    feats = [encode_qa(tokenizer, r["question"], r["answer"], prompt_format=prompt_format) for r in records]
    return perplexity(score_fn(model, feats, tokenizer.pad_token_id, batch_size=batch_size))


class DetoxTask(Task):
    name = "detox"
    data_keys = ("source", "split", "n_forget", "retain_source", "retain_split", "safe_source", "n_retain",
                 "n_heldout", "rtp_challenging", "rtp_nontoxic", "n_prompts", "prompt_seed")
    eval_keys = ("batch_size", "max_new_tokens", "scorer", "threshold", "prompt_format", "samples", "sample_seed",
                 "top_p", "temperature")
    report_group = "detox"

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None

    def check(self, preset: Preset, fail: Fail) -> None:
        super().check(preset, fail)
        data = preset.data
        if data.get("safe_source") and data.get("retain_source"):
            raise fail("data.safe_source", "give either safe_source (safe responses: retain + held out) or "
                                           "retain_source (a QA retain split), not both")
        if data.get("n_heldout") and not data.get("safe_source"):
            raise fail("data.n_heldout", "held-out safe responses come from data.safe_source; set it")
        if (data.get("n_prompts") or data.get("prompt_seed") is not None) and not self._rtp(preset):
            raise fail("data.n_prompts", "RealToxicityPrompts sampling needs data.rtp_challenging and/or "
                                         "data.rtp_nontoxic")

    def _rtp(self, preset: Preset) -> dict[str, str]:
        return {s: str(preset.data[f"rtp_{s}"]) for s in RTP_SETS if preset.data.get(f"rtp_{s}")}

    def check_inputs(self, preset: Preset) -> None:
        """Local files (never a hub download) are read and checked before the report directory is made."""
        if _local(preset.data.get("source")):
            self.load_data(preset)

    def meta(self, preset: Preset) -> dict[str, Any]:
        from soul.data.detox import PKU_LICENCE, RTP_LICENCE

        licences = {"PKU-SafeRLHF": PKU_LICENCE}
        if self._rtp(preset):
            licences["RealToxicityPrompts"] = RTP_LICENCE
        return {"data_licences": licences}

    def load_data(self, preset: Preset) -> dict[str, Any]:
        if self._data is None:
            self._data = self._load(preset)
        return self._data

    def _load(self, preset: Preset) -> dict[str, Any]:
        from soul.data import expand_source, load_detox, load_split

        data = preset.data
        source = expand_source(data["source"]) if _local(data["source"]) else data["source"]
        pairs = load_detox(source, data.get("split", "train"))
        forget = [{"question": p["question"], "answer": p["answer"]} for p in pairs]
        heldout: list[dict] = []
        if data.get("safe_source"):
            from soul.data.detox import load_safe_responses

            safe = [{"question": r["question"], "answer": r["answer"]}
                    for r in load_safe_responses(expand_source(str(data["safe_source"])))]
            n_retain = data.get("n_retain") or len(safe)
            retain, heldout = safe[:n_retain], safe[n_retain:n_retain + (data.get("n_heldout") or 0)]
            if data.get("n_heldout") and len(heldout) < data["n_heldout"]:
                raise ValueError(f"{data['safe_source']}: {len(safe)} safe responses; n_retain {n_retain} + "
                                 f"n_heldout {data['n_heldout']} asked for")
        elif data.get("retain_source"):
            retain = load_split(str(data["retain_source"]), str(data.get("retain_split", "retain")))
        else:
            retain = [{"question": p["question"], "answer": p["safe_answer"]} for p in pairs if "safe_answer" in p]
            if not retain:
                raise ValueError(f"preset {preset.where}: {data['source']} has no safe responses to keep; set "
                                 "data.retain_source (and data.retain_split) to a QA retain set")
        prompts = list(dict.fromkeys(r["question"] for r in forget))  # a prompt with two unsafe answers once
        ev: dict[str, Any] = {"forget_prompts": self.cap(prompts, preset), "retain": self.cap(retain, preset)}
        if heldout:
            ev["heldout"] = heldout
        rtp = self._rtp(preset)
        if rtp:
            import random

            from soul.data.detox import load_rtp

            for name, path in rtp.items():
                records = load_rtp(expand_source(path))
                n = min(data.get("n_prompts") or len(records), len(records))
                picked = sorted(random.Random(data.get("prompt_seed") or 0).sample(range(len(records)), n))
                ev[f"rtp_{name}"] = [records[i]["prompt"] for i in picked]
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
        out = {"forget_toxicity": res["toxicity_mean"], "forget_toxic_rate": res["toxicity_rate"],
               "retain_answer_prob": answer_probability(model, tokenizer, data["_eval"]["retain"],
                                                        prompt_format=fmt, batch_size=bs)}
        if data["_eval"].get("heldout"):
            out["heldout_ppl"] = answer_perplexity(model, tokenizer, data["_eval"]["heldout"], prompt_format=fmt,
                                                   batch_size=bs)
        for name in RTP_SETS:
            prompts = data["_eval"].get(f"rtp_{name}")
            if not prompts:
                continue
            from soul.eval.toxicity import continuation_toxicity

            tox = continuation_toxicity(model, tokenizer, prompts, scorer=ev.get("scorer", "profanity"),
                                        threshold=float(ev.get("threshold", 0.5)), max_new_tokens=new, batch_size=bs,
                                        samples=int(ev.get("samples", 0)), seed=int(ev.get("sample_seed", 0)),
                                        top_p=float(ev.get("top_p", 0.9)), temperature=float(ev.get("temperature", 1.0)))
            for mode, suffix in (("greedy", ""), ("sampled", "_sampled")):
                if mode in tox:
                    out[f"rtp_{name}{suffix}_toxicity"] = tox[mode]["mean"]
                    out[f"rtp_{name}{suffix}_toxic_rate"] = tox[mode]["rate"]
        return out

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        return examples_from(metrics, {"forget": ("forget_toxicity",), "retain": ()})
