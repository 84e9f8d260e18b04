"""Copyright removal: forget = passages of ``data.source`` as raw-text QA records {question: the first
``prefix_words`` words, answer: the next ``continuation_words``} (prompt format ``raw``); retain = passages
of ``data.retain_source`` or, without one, the corpus passages after the first ``data.n_forget``. Metrics:
BLEU / ROUGE-L of greedy continuations (`soul.eval.copyright_eval`) on forget and retain passages
(``forget_bleu``/``forget_rougeL``/``retain_bleu``/``retain_rougeL``).

Preset ``data``: ``source``, ``n_forget``, ``passage_words`` (64), ``prefix_words`` (32),
``continuation_words`` (32), ``text_field`` ("text"), ``retain_source``, ``n_retain``. ``eval``:
``batch_size`` (16), ``max_new_tokens`` (32), ``prefix_tokens`` (32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from soul.pipeline.tasks.base import Task

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset

CORPUS_KEYS = ("source", "n_forget", "passage_words", "prefix_words", "continuation_words", "text_field",
               "retain_source", "n_retain")


def text_qa(passages: list[str], prefix_words: int, continuation_words: int, source: str) -> list[dict]:
    """Raw-text QA records from passages: question = the first `prefix_words` words, answer = the next
    `continuation_words` (trained in the ``raw`` prompt format: the prompt is the text as is)."""
    from soul.data import continuation_items

    items = continuation_items(passages, prefix_words, continuation_words, source=source)
    return [{"question": it["prompt"], "answer": it["continuation"], "passage": it["passage"]} for it in items]


def text_splits(preset: Preset) -> tuple[list[str], list[str]]:
    """(forget passages, retain passages) of a corpus task."""
    from soul.data import load_passages

    data = preset.data
    words, field = int(data.get("passage_words", 64)), str(data.get("text_field", "text"))
    passages = load_passages(data["source"], words, text_field=field)
    n_forget = data.get("n_forget")
    if data.get("retain_source"):
        forget = passages[:n_forget] if n_forget else passages
        retain = load_passages(data["retain_source"], words, text_field=field)
    else:
        if not n_forget or n_forget >= len(passages):
            raise ValueError(f"preset {preset.where}: without data.retain_source the retain passages are those "
                             f"after the first data.n_forget of {data['source']} ({len(passages)} passages); "
                             f"set n_forget below {len(passages)}, got {n_forget!r}")
        forget, retain = passages[:n_forget], passages[n_forget:]
    if data.get("n_retain"):
        retain = retain[:data["n_retain"]]
    return forget, retain


def corpus_qa(preset: Preset) -> tuple[list[str], list[str], list[dict], list[dict]]:
    """(forget passages, retain passages, forget QA records, retain QA records)."""
    data = preset.data
    pre, cont = int(data.get("prefix_words", 32)), int(data.get("continuation_words", 32))
    forget_p, retain_p = text_splits(preset)
    forget = text_qa(forget_p, pre, cont, str(data["source"]))
    retain = text_qa(retain_p, pre, cont, str(data.get("retain_source") or data["source"]))
    return forget_p, retain_p, forget, retain


def examples_from(metrics: dict[str, Any], sources: dict[str, tuple[str, ...]], n: int = 3) -> dict[str, list]:
    """Up to `n` generations per split from the first present metric of `sources[split]` (items
    ``{"index", "question", "answer", "generation"}``)."""
    out: dict[str, list[dict[str, str]]] = {}
    for split, keys in sources.items():
        entry = next((metrics[k] for k in keys if isinstance(metrics.get(k), dict)), None)
        items = (entry or {}).get("value_by_index") or {}
        out[split] = [{"index": str(i), "question": str(v.get("prefix", v.get("prompt", ""))),
                       "answer": str(v.get("reference", "")), "generation": str(v.get("generation", ""))}
                      for i, v in sorted(items.items(), key=lambda kv: int(kv[0]))[:n] if "generation" in v]
    return out


class CopyrightTask(Task):
    name = "copyright"
    data_keys = CORPUS_KEYS
    eval_keys = ("batch_size", "max_new_tokens", "prefix_tokens")
    default_prompt_format = "raw"
    report_group = "copyright"

    def load_data(self, preset: Preset) -> dict[str, Any]:
        forget_p, retain_p, forget, retain = corpus_qa(preset)
        ev = {"forget": self.cap(forget_p, preset), "retain": self.cap(retain_p, preset)}
        return {"forget": forget, "retain": retain, "full": forget + retain, "_eval": ev}

    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        from soul.eval import copyright_eval

        ev = preset.eval
        model.eval()
        out: dict[str, Any] = {}
        for role in ("forget", "retain"):
            res = copyright_eval(model, tokenizer, data["_eval"][role], prefix_tokens=int(ev.get("prefix_tokens", 32)),
                                 max_new_tokens=int(ev.get("max_new_tokens", 32)),
                                 batch_size=int(ev.get("batch_size", 16)))
            out[f"{role}_bleu"], out[f"{role}_rougeL"] = res["copyright_bleu"], res["copyright_rougeL"]
        return out

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        return examples_from(metrics, {"forget": ("forget_bleu",), "retain": ("retain_bleu",)})
