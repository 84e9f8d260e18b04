"""Data and evaluation of the non-TOFU `soul.pipeline` tasks: ``copyright``, ``detox`` and ``wmdp``.

The unlearning data of every task is a dict of split name → QA records (``{"question", "answer"}``) with the
splits ``forget`` and ``retain``, so `soul.train.unlearn` and one-shot influence run unchanged; evaluation
inputs sit under ``"_eval"`` (capped at the preset's ``max_questions``, first N).

Preset ``data`` options (all tasks): ``source``, ``n_forget`` (first N forget records / passages).

* copyright, wmdp — ``passage_words`` (64), ``prefix_words`` (32), ``continuation_words`` (32),
  ``text_field`` ("text"), ``retain_source`` (a retain corpus; without it the passages after the first
  ``n_forget`` of ``source`` are the retain set), ``n_retain``;
* detox — ``split`` ("train"), ``retain_source`` + ``retain_split`` (QA records via `soul.data.load_split`;
  without them the safe responses of the forget prompts);
* wmdp — ``mc_source``, ``mc_name``, ``mc_split`` ("test"): the forget-topic multiple-choice set;
  ``utility_mc_source``, ``utility_mc_name``, ``utility_mc_split``: the general-knowledge set.

Metric keys (each ``{"agg_value", "value_by_index"}``) are those of the report's task columns
(`soul.report.results.COLUMNS`): ``forget_bleu``/``forget_rougeL``/``retain_bleu``/``retain_rougeL``;
``forget_toxicity``/``forget_toxic_rate``/``retain_answer_prob``; ``forget_mc_accuracy``/``utility_mc_accuracy``.
"""

from __future__ import annotations

import math
from typing import Any


def _where(preset: dict[str, Any]) -> str:
    return str(preset.get("_where", "preset"))


def _data_opts(preset: dict[str, Any]) -> dict[str, Any]:
    data = dict(preset.get("data") or {})
    if "source" not in data:
        raise ValueError(f"preset {_where(preset)}: task {preset.get('task')!r} needs data.source")
    return data


def text_qa(passages: list[str], prefix_words: int, continuation_words: int, source: str) -> list[dict]:
    """Raw-text QA records from passages: question = the first `prefix_words` words, answer = the next
    `continuation_words` (trained in the ``raw`` prompt format: the prompt is the text as is)."""
    from soul.data import continuation_items

    items = continuation_items(passages, prefix_words, continuation_words, source=source)
    return [{"question": it["prompt"], "answer": it["continuation"], "passage": it["passage"]} for it in items]


def _text_splits(preset: dict[str, Any], data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(forget passages, retain passages) of a corpus task."""
    from soul.data import load_passages

    words, field = int(data.get("passage_words", 64)), str(data.get("text_field", "text"))
    passages = load_passages(data["source"], words, text_field=field)
    n_forget = data.get("n_forget")
    if data.get("retain_source"):
        forget = passages[:n_forget] if n_forget else passages
        retain = load_passages(data["retain_source"], words, text_field=field)
    else:
        if not n_forget or n_forget >= len(passages):
            raise ValueError(f"preset {_where(preset)}: without data.retain_source the retain passages are those "
                             f"after the first data.n_forget of {data['source']} ({len(passages)} passages); "
                             f"set n_forget below {len(passages)}, got {n_forget!r}")
        forget, retain = passages[:n_forget], passages[n_forget:]
    if data.get("n_retain"):
        retain = retain[:data["n_retain"]]
    return forget, retain


def _cap(records: list, preset: dict[str, Any]) -> list:
    cap = preset.get("max_questions")
    return records[:cap] if cap else records


def load_task_data(preset: dict[str, Any]) -> dict[str, Any]:
    """``{"forget": [...], "retain": [...], "full": forget + retain, "_eval": {...}}`` for the preset's task."""
    from soul.data import load_detox, load_multiple_choice, load_split

    task, data = preset.get("task"), _data_opts(preset)
    pre, cont = int(data.get("prefix_words", 32)), int(data.get("continuation_words", 32))
    if task in ("copyright", "wmdp"):
        forget_p, retain_p = _text_splits(preset, data)
        forget = text_qa(forget_p, pre, cont, str(data["source"]))
        retain = text_qa(retain_p, pre, cont, str(data.get("retain_source") or data["source"]))
        if task == "copyright":
            ev: dict[str, Any] = {"forget": _cap(forget_p, preset), "retain": _cap(retain_p, preset)}
        else:
            for key in ("mc_source", "utility_mc_source"):
                if not data.get(key):
                    raise ValueError(f"preset {_where(preset)}: task 'wmdp' needs data.{key} (a multiple-choice set)")
            ev = {"forget_mc": _cap(load_multiple_choice(data["mc_source"], data.get("mc_name"),
                                                         data.get("mc_split", "test")), preset),
                  "utility_mc": _cap(load_multiple_choice(data["utility_mc_source"], data.get("utility_mc_name"),
                                                          data.get("utility_mc_split", "test")), preset)}
    elif task == "detox":
        pairs = load_detox(data["source"], data.get("split", "train"))
        forget = [{"question": p["question"], "answer": p["answer"]} for p in pairs]
        if data.get("retain_source"):
            retain = load_split(str(data["retain_source"]), str(data.get("retain_split", "retain")))
        else:
            retain = [{"question": p["question"], "answer": p["safe_answer"]} for p in pairs if "safe_answer" in p]
            if not retain:
                raise ValueError(f"preset {_where(preset)}: {data['source']} has no safe responses to keep; set "
                                 "data.retain_source (and data.retain_split) to a QA retain set")
        prompts = list(dict.fromkeys(r["question"] for r in forget))  # a prompt with two unsafe answers once
        ev = {"forget_prompts": _cap(prompts, preset), "retain": _cap(retain, preset)}
    else:
        raise ValueError(f"preset {_where(preset)}: no task data loader for task {task!r}")
    if data.get("n_forget") and task == "detox":
        forget = forget[:data["n_forget"]]
    return {"forget": forget, "retain": retain, "full": forget + retain, "_eval": ev}


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


def evaluate_task(model, tokenizer, preset: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The task's metrics for one model (see the module docstring for the keys). Preset ``eval`` options:
    ``batch_size`` (16), ``max_new_tokens`` (32), ``prefix_tokens`` (32, copyright), ``scorer``
    ("profanity", offline) and ``threshold`` (0.5) for detox, ``prompt_format`` (detox: the training format;
    wmdp: "plain", i.e. "Question: …\\nAnswer:")."""
    from soul import eval as E
    from soul.pipeline import prompt_format, task_of

    task, ev, inputs = task_of(preset), dict(preset.get("eval") or {}), data["_eval"]
    bs, new = int(ev.get("batch_size", 16)), int(ev.get("max_new_tokens", 32))
    model.eval()
    out: dict[str, Any] = {}
    if task == "copyright":
        for role in ("forget", "retain"):
            res = E.copyright_eval(model, tokenizer, inputs[role], prefix_tokens=int(ev.get("prefix_tokens", 32)),
                                   max_new_tokens=new, batch_size=bs)
            out[f"{role}_bleu"], out[f"{role}_rougeL"] = res["copyright_bleu"], res["copyright_rougeL"]
    elif task == "detox":
        fmt = str(ev.get("prompt_format", prompt_format(preset)))
        res = E.toxicity_eval(model, tokenizer, inputs["forget_prompts"], scorer=ev.get("scorer", "profanity"),
                              threshold=float(ev.get("threshold", 0.5)), prompt_format=fmt, max_new_tokens=new,
                              batch_size=bs)
        out["forget_toxicity"], out["forget_toxic_rate"] = res["toxicity_mean"], res["toxicity_rate"]
        out["retain_answer_prob"] = answer_probability(model, tokenizer, inputs["retain"], prompt_format=fmt,
                                                       batch_size=bs)
    elif task == "wmdp":
        fmt = str(ev.get("prompt_format", "plain"))
        for role in ("forget", "utility"):
            res = E.multiple_choice_eval(model, tokenizer, inputs[f"{role}_mc"], prompt_format=fmt, batch_size=bs)
            out[f"{role}_mc_accuracy"] = res["mc_accuracy"]
    else:
        raise ValueError(f"no evaluation for task {task!r}")
    return out


def task_examples(metrics: dict[str, Any], n: int = 3) -> dict[str, list[dict[str, str]]]:
    """Up to `n` example generations per split for the report (``{"forget": [...], "retain": [...]}``,
    items ``{"index", "question", "answer", "generation"}``): copyright continuations (question = the passage
    prefix, answer = the true continuation) and detox answers to forget prompts. WMDP records no generations."""
    sources = {"forget": ("forget_bleu", "forget_toxicity"), "retain": ("retain_bleu",)}
    out: dict[str, list[dict[str, str]]] = {}
    for split, keys in sources.items():
        entry = next((metrics[k] for k in keys if isinstance(metrics.get(k), dict)), None)
        items = (entry or {}).get("value_by_index") or {}
        out[split] = [{"index": str(i), "question": str(v.get("prefix", v.get("prompt", ""))),
                       "answer": str(v.get("reference", "")), "generation": str(v.get("generation", ""))}
                      for i, v in sorted(items.items(), key=lambda kv: int(kv[0]))[:n] if "generation" in v]
    return out
