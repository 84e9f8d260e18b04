"""Verbatim memorisation of text (copyright takedown): BLEU and ROUGE-L of greedy continuations.

Each passage is tokenised as plain text (no chat template: it is raw text the model may have memorised);
the model is prompted with its first `prefix_tokens` tokens and greedily continues for up to
`max_new_tokens`; the continuation is compared with the passage's true next `max_new_tokens` tokens.
"""

from __future__ import annotations

import math
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


def continuation_eval(model, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 32, batch_size: int = 16,
                      implementation: str = "batched") -> dict[str, Any]:
    """BLEU and ROUGE-L (F1) of greedy continuations of prefix → continuation items (``{"question": prefix,
    "answer": true continuation}``, the records the model was trained and unlearned on, ``raw`` format), as
    ``copyright_bleu`` / ``copyright_rougeL`` like `copyright_eval`. The prompt is exactly the training prompt
    (`soul.data.format.prompt_ids`). The generation (up to `max_new_tokens` tokens) is cut to the true
    continuation's number of words before scoring, so a verbatim continuation scores 1 whatever the model
    would have written after it."""
    from soul.data.format import prompt_ids

    if not items:
        raise ValueError("continuation evaluation needs at least one item")
    _, generate_fn = get_implementation(implementation)
    prompts = [prompt_ids(tokenizer, it["question"], "raw") for it in items]
    gens = generate_fn(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    per_bleu, per_rouge = {}, {}
    for i, (it, g) in enumerate(zip(items, gens)):
        ref = it["answer"].strip()
        cut = " ".join(g.split()[:len(ref.split())])
        r = M.rouge_l(cut, ref)
        per_bleu[str(i)] = {"score": bleu(cut, ref), "prefix": it["question"], "reference": ref, "generation": g}
        per_rouge[str(i)] = {"score": r["f1"], "recall": r["recall"]}
    n = len(gens)
    return {
        "copyright_bleu": {"agg_value": sum(v["score"] for v in per_bleu.values()) / n, "value_by_index": per_bleu},
        "copyright_rougeL": {"agg_value": sum(v["score"] for v in per_rouge.values()) / n,
                             "value_by_index": per_rouge},
        "meta": {"max_new_tokens": max_new_tokens, "n": n},
    }


def passage_stats(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                  implementation: str = "batched") -> list:
    """Teacher-forced `soul.eval.scoring.TokenStats` of every token of each text after its first (a text is
    tokenised as in the ``raw`` format, with the tokenizer's leading special tokens, e.g. BOS)."""
    from soul.data.format import prompt_ids
    from soul.losses import IGNORE_INDEX

    score_fn, _ = get_implementation(implementation)
    feats = []
    for i, text in enumerate(texts):
        ids = prompt_ids(tokenizer, text, "raw")
        if len(ids) < 2:
            raise ValueError(f"passage {i}: {len(ids)} token(s); perplexity needs at least 2")
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    return score_fn(model, feats, tokenizer.pad_token_id, batch_size=batch_size)


def perplexity(stats: Sequence) -> dict[str, Any]:
    """Token-weighted perplexity exp(Σ NLL / Σ tokens) over passages, with each passage's own."""
    if not stats:
        raise ValueError("perplexity needs at least one passage")
    total = sum(-sum(s.logp) for s in stats)
    tokens = sum(s.n for s in stats)
    per = {str(i): {"score": math.exp(s.mean_nll), "nll": s.mean_nll, "tokens": s.n} for i, s in enumerate(stats)}
    return {"agg_value": math.exp(total / tokens), "value_by_index": per, "tokens": tokens}


def mia_auc(member_stats: Sequence, nonmember_stats: Sequence, *, k: float = 0.4) -> dict[str, Any]:
    """Min-K% membership AUC (`soul.eval.metrics.mia_min_k_score`): members (trained passages, e.g. the forget
    book's) vs non-members (a never-trained book's); 0.5 = indistinguishable, 1 = members recognised."""
    members = [M.mia_min_k_score(s, k=k) for s in member_stats]
    nonmembers = [M.mia_min_k_score(s, k=k) for s in nonmember_stats]
    per = {str(i): {"score": v, "member": i < len(members)} for i, v in enumerate(members + nonmembers)}
    return {"agg_value": M.auc(members, nonmembers), "value_by_index": per, "attack": "min_k", "k": k,
            "n_members": len(members), "n_nonmembers": len(nonmembers)}
