"""Verbatim memorisation of text (copyright takedown): BLEU and ROUGE-L of greedy continuations.

Each passage is tokenised as plain text (no chat template: it is raw text the model may have memorised);
the model is prompted with its first `prefix_tokens` tokens and greedily continues for up to
`max_new_tokens`; the continuation is compared with the passage's true next `max_new_tokens` tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from soul.eval import metrics as M
from soul.eval.scoring import get_implementation
from soul.io import write_json_atomic


def bleu(generation: str, reference: str) -> float:
    """Sentence BLEU on whitespace tokens: brevity penalty × geometric mean of the modified n-gram precisions
    for n = 1..N, N = min(4, |generation|, |reference|) (so a text shorter than 4 words can still score 1),
    with NLTK's smoothing method 1 (a zero count becomes 0.1, so one missing order does not zero the score).
    0 for an empty generation or reference."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = generation.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    order = min(4, len(hyp), len(ref))
    return float(sentence_bleu([ref], hyp, weights=(1.0 / order,) * order,
                               smoothing_function=SmoothingFunction().method1))


def copyright_eval(model, tokenizer, passages: Sequence[str], *, prefix_tokens: int = 32,
                   max_new_tokens: int = 128, batch_size: int = 16, implementation: str = "batched",
                   out: str | os.PathLike | None = None) -> dict[str, Any]:
    """``copyright_bleu`` (mean BLEU) and ``copyright_rougeL`` (mean ROUGE-L F1, stemmer on) of continuations
    of `passages` from their first `prefix_tokens` tokens, per passage with prefix, reference, generation."""
    if prefix_tokens < 1:
        raise ValueError(f"prefix_tokens must be >= 1, got {prefix_tokens}")
    _, generate_fn = get_implementation(implementation)
    prompts, references = [], []
    for i, text in enumerate(passages):
        if not isinstance(text, str):
            raise ValueError(f"passage {i}: expected a string, got {type(text).__name__}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= prefix_tokens:
            raise ValueError(f"passage {i}: {len(ids)} tokens, needs more than prefix_tokens={prefix_tokens} "
                             "so that there is a continuation to compare with")
        # Keep the special tokens the tokenizer puts in front of text (e.g. Llama's BOS), as in training.
        full = tokenizer(text, add_special_tokens=True)["input_ids"]
        lead = full[:len(full) - len(ids)] if full[len(full) - len(ids):] == ids else []
        prompts.append(lead + ids[:prefix_tokens])
        references.append(tokenizer.decode(ids[prefix_tokens:prefix_tokens + max_new_tokens],
                                           skip_special_tokens=True).strip())
    gens = generate_fn(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    per_bleu, per_rouge = {}, {}
    for i, (g, ref) in enumerate(zip(gens, references)):
        r = M.rouge_l(g, ref)
        per_bleu[str(i)] = {"score": bleu(g, ref), "prefix": tokenizer.decode(prompts[i], skip_special_tokens=True),
                            "reference": ref, "generation": g}
        per_rouge[str(i)] = {"score": r["f1"], "recall": r["recall"]}
    n = len(gens)
    results = {
        "copyright_bleu": {"agg_value": sum(v["score"] for v in per_bleu.values()) / n, "value_by_index": per_bleu},
        "copyright_rougeL": {"agg_value": sum(v["score"] for v in per_rouge.values()) / n,
                             "value_by_index": per_rouge},
        "meta": {"prefix_tokens": prefix_tokens, "max_new_tokens": max_new_tokens, "n": n},
    }
    if out is not None:
        write_json_atomic(out, results)
    return results
