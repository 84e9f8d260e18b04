"""Copyright removal: forget = passages of ``data.source`` as raw-text QA records {question: the first
``prefix_words`` words, answer: the next ``continuation_words``} (prompt format ``raw``); retain = passages
of ``data.retain_source`` or, without one, the corpus passages after the first ``data.n_forget``. Metrics:
BLEU / ROUGE-L of greedy continuations (`soul.eval.copyright_eval`) on forget and retain passages
(``forget_bleu``/``forget_rougeL``/``retain_bleu``/``retain_rougeL``).

Preset ``data``: ``source``, ``n_forget``, ``passage_words`` (64), ``prefix_words`` (32),
``continuation_words`` (32), ``text_field`` ("text"), ``retain_source``, ``n_retain``. ``eval``:
``batch_size`` (16), ``max_new_tokens`` (32), ``prefix_tokens`` (32).

**Books** (``data.forget_book`` set; preset ``copyright-cpu``): three Project Gutenberg books of
``data.books_dir`` (``${SOUL_BOOKS_DIR:-../shared/data/books}``) through `soul.data.books`: ``n_forget``
passages of ``forget_book`` (forget), ``n_retain`` of ``retain_book`` (retain) and ``n_unseen`` of
``unseen_book`` (never trained on), each a prefix of at most ``prefix_tokens`` tokens and a continuation of
at most ``continuation_tokens`` (32 each by default; whole words, cut with the base model's tokenizer). QA
records: question = prefix, answer = continuation (``raw`` format); the target is fine-tuned on forget +
retain, and with a ``retain:`` block a retain model on the retain passages only. Metrics: ``forget_bleu`` /
``forget_rougeL`` / ``retain_bleu`` / ``retain_rougeL`` of greedy continuations of the training prefixes
(`soul.eval.copyright.continuation_eval`, ``eval.max_new_tokens`` default ``continuation_tokens``),
``retain_ppl`` / ``unseen_ppl`` (token-weighted perplexity of whole passages) and ``forget_mia_auc``
(Min-K%, ``eval.min_k`` 0.4: forget passages vs unseen-book passages). The books' files are read and cut
before anything is written (`check_inputs`), and the preset's ``attacks:`` run on the forget QA records
(``relearn`` splits them into blocks of ``questions_per_author`` consecutive passages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from soul.pipeline.tasks.base import Fail, Task

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset

CORPUS_KEYS = ("source", "n_forget", "passage_words", "prefix_words", "continuation_words", "text_field",
               "retain_source", "n_retain")
BOOK_KEYS = ("books_dir", "forget_book", "retain_book", "unseen_book", "n_unseen", "prefix_tokens",
             "continuation_tokens")
BOOK_ROLES = ("forget", "retain", "unseen")
DEFAULT_BOOKS_DIR = "${SOUL_BOOKS_DIR:-../shared/data/books}"
BOOK_DEFAULTS = {"n_forget": 32, "n_retain": 32, "n_unseen": 32, "prefix_tokens": 32, "continuation_tokens": 32}


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


def uses_books(preset: Preset) -> bool:
    """Whether a copyright preset reads Project Gutenberg books (``data.forget_book``) instead of a corpus."""
    return bool(preset.data.get("forget_book"))


class CopyrightTask(Task):
    name = "copyright"
    data_keys = CORPUS_KEYS + BOOK_KEYS
    eval_keys = ("batch_size", "max_new_tokens", "prefix_tokens", "min_k")
    default_prompt_format = "raw"
    report_group = "copyright"
    supports_attacks = True  # on the forget QA records (prefix → continuation)

    def __init__(self) -> None:
        self._books: dict[str, Any] | None = None

    def check(self, preset: Preset, fail: Fail) -> None:
        if not uses_books(preset):
            super().check(preset, fail)
        else:
            data = preset.data
            for key in ("source", "retain_source", "passage_words", "prefix_words", "continuation_words",
                        "text_field"):
                if data.get(key) is not None:
                    raise fail(f"data.{key}", "a corpus key; with data.forget_book the data are books (use "
                                              "retain_book, unseen_book, prefix_tokens, continuation_tokens)")
            for key in ("retain_book", "unseen_book"):
                if not data.get(key):
                    raise fail(f"data.{key}", "needed with data.forget_book (forget, retain and never-trained "
                                              "books are three different books)")
            names = [str(data[f"{r}_book"]) for r in BOOK_ROLES]
            if len(set(names)) < 3:
                raise fail("data", f"forget_book, retain_book and unseen_book must be three different books, "
                                   f"got {names}")
            if preset.eval.get("prefix_tokens") is not None:
                raise fail("eval.prefix_tokens", "with books the prompt is each passage's prefix: set "
                                                 "data.prefix_tokens instead")
        if preset.retain.model or preset.retain.finetune is not None:
            # A retain model (fine-tuned on the retain split only) is the verbatim-continuation baseline.
            self.reference_roles = ("target", "retain")

    def check_inputs(self, preset: Preset) -> None:
        """With books: read and cut every book now (`soul.data.books`), so a missing or short book fails
        before the report directory is made; the passages are kept for `load_data`."""
        if uses_books(preset):
            self._book_passages(preset)

    def _book_passages(self, preset: Preset) -> dict[str, Any]:
        if self._books is None:
            from soul.data import expand_source
            from soul.data.books import load_book_passages
            from soul.pipeline.common import tokenizer_for

            data = {**BOOK_DEFAULTS, **{k: v for k, v in preset.data.items() if v is not None}}
            tokenizer = tokenizer_for(preset.target.model or preset.model)
            root = expand_source(str(data.get("books_dir") or DEFAULT_BOOKS_DIR))
            self._books = {role: load_book_passages(str(data[f"{role}_book"]), tokenizer, n=int(data[f"n_{role}"]),
                                                    prefix_tokens=int(data["prefix_tokens"]),
                                                    continuation_tokens=int(data["continuation_tokens"]),
                                                    directory=root)
                           for role in BOOK_ROLES}
        return self._books

    def meta(self, preset: Preset) -> dict[str, Any]:
        if not uses_books(preset):
            return {}
        from soul.data.books import GUTENBERG_LICENCE

        books = {role: self._book_passages(preset)[role][0]["book"] for role in BOOK_ROLES}
        return {"books": books, "data_licences": {f"{name} (Project Gutenberg)": GUTENBERG_LICENCE
                                                  for name in books.values()}}

    def load_data(self, preset: Preset) -> dict[str, Any]:
        if uses_books(preset):
            books = self._book_passages(preset)
            qa = {role: [{"question": p["prefix"], "answer": p["continuation"], "passage": p["passage"],
                          "book": p["book"], "index": p["index"]} for p in books[role]] for role in BOOK_ROLES}
            ev = {role: self.cap(qa[role], preset) for role in BOOK_ROLES}
            return {"forget": qa["forget"], "retain": qa["retain"], "full": qa["forget"] + qa["retain"], "_eval": ev}
        forget_p, retain_p, forget, retain = corpus_qa(preset)
        ev = {"forget": self.cap(forget_p, preset), "retain": self.cap(retain_p, preset)}
        return {"forget": forget, "retain": retain, "full": forget + retain, "_eval": ev}

    def attack_records(self, preset: Preset, data: dict[str, Any]) -> list[dict]:
        return [{"question": r["question"], "answer": r["answer"]} for r in data["forget"]]

    def eval_kwargs(self, preset: Preset) -> dict[str, Any]:
        """The attacks' evaluation settings: prefix → continuation in the ``raw`` format."""
        ev = preset.eval
        default_new = preset.data.get("continuation_tokens") or BOOK_DEFAULTS["continuation_tokens"]
        return {"batch_size": int(ev.get("batch_size", 16)), "max_new_tokens": int(ev.get("max_new_tokens", default_new)),
                "prompt_format": "raw"}

    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        if uses_books(preset):
            return self._evaluate_books(model, tokenizer, preset, data)
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

    def _evaluate_books(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any]) -> dict[str, Any]:
        from soul.eval.copyright import continuation_eval, mia_auc, passage_stats, perplexity

        kw = self.eval_kwargs(preset)
        bs = kw["batch_size"]
        model.eval()
        out: dict[str, Any] = {}
        for role in ("forget", "retain"):
            res = continuation_eval(model, tokenizer, data["_eval"][role], max_new_tokens=kw["max_new_tokens"],
                                    batch_size=bs)
            out[f"{role}_bleu"], out[f"{role}_rougeL"] = res["copyright_bleu"], res["copyright_rougeL"]
        stats = {role: passage_stats(model, tokenizer, [r["passage"] for r in data["_eval"][role]], batch_size=bs)
                 for role in BOOK_ROLES}
        out["retain_ppl"], out["unseen_ppl"] = perplexity(stats["retain"]), perplexity(stats["unseen"])
        out["forget_mia_auc"] = mia_auc(stats["forget"], stats["unseen"], k=float(preset.eval.get("min_k", 0.4)))
        return out

    def examples(self, metrics: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        return examples_from(metrics, {"forget": ("forget_bleu",), "retain": ("retain_bleu",)})
