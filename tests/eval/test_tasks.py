"""Copyright (verbatim memorisation), multiple choice, toxicity, lm-eval wiring."""

from __future__ import annotations

import sys

import pytest
import torch

from soul.data.format import encode_qa, pad_batch
from soul.eval import copyright_eval, multiple_choice_eval, toxicity_eval
from soul.eval import scoring as S
from soul.eval.copyright import bleu
from soul.losses import sequence_logprob
from soul.testing import tiny_model

PASSAGES = [
    "She wrote novels about rivers, mountains, lighthouses and clocks; her father was a baker, her mother a pilot.",
    "He received the Golden Quill award in 1987 for his book about winter gardens and the sea.",
]


def test_bleu_hand_values():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("", "the cat") == 0.0
    assert bleu("a b", "a b") == pytest.approx(1.0)  # shorter than 4 words: orders 1..2 only
    # "a b x d" vs "a b c d": unigrams 3/4, bigrams 1/3, trigrams 0/2 -> 0.1/2, 4-grams 0/1 -> 0.1/1 (method 1),
    # same length so no brevity penalty
    assert bleu("a b x d", "a b c d") == pytest.approx((0.75 * (1 / 3) * (0.1 / 2) * (0.1 / 1)) ** 0.25, rel=1e-6)


def test_copyright_perfect_recall_scores_one(monkeypatch):
    model, tok = tiny_model("llama")
    seen = {}

    def oracle_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size):
        # "a model that memorised the passages": returns each passage's true continuation
        seen["prompts"] = prompts
        out = []
        for text in PASSAGES:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(tokenizer.decode(ids[8:8 + max_new_tokens]).strip())
        return out

    monkeypatch.setitem(S.IMPLEMENTATIONS, "oracle", (S.score_batched, oracle_generate))
    res = copyright_eval(model, tok, PASSAGES, prefix_tokens=8, max_new_tokens=10, implementation="oracle")
    assert res["copyright_bleu"]["agg_value"] == pytest.approx(1.0)
    assert res["copyright_rougeL"]["agg_value"] == pytest.approx(1.0)
    assert seen["prompts"][0] == tok(PASSAGES[0], add_special_tokens=False)["input_ids"][:8]


def test_copyright_batched_equals_reference_and_errors():
    # float64: greedy tokens are compared exactly, and batched and one-at-a-time decoding sum in other orders;
    # in float32 a near tie between two logits could flip a token on some CPU's kernels, in float64 it cannot.
    model, tok = tiny_model("gpt2")
    model = model.double()
    a = copyright_eval(model, tok, PASSAGES, prefix_tokens=6, max_new_tokens=8)
    b = copyright_eval(model, tok, PASSAGES, prefix_tokens=6, max_new_tokens=8, implementation="reference")
    assert a["copyright_bleu"] == b["copyright_bleu"]
    with pytest.raises(ValueError, match="passage 1"):
        copyright_eval(model, tok, ["a long enough passage of text here", "short"], prefix_tokens=4)


def test_multiple_choice_cloze_matches_independent_loglik():
    # float64: the eval batches the choices differently from the oracle's one padded batch; in float32 the
    # summed log-likelihoods differed by ~1e-5 (kernel-dependent), in float64 by ~1e-14.
    model, tok = tiny_model("llama")
    model = model.double()
    records = [
        {"question": "Which city is the capital of France?", "choices": ["Paris", "Lima", "Oslo"], "answer": 0},
        {"question": "What did the baker make?", "choices": ["bread", "a lighthouse clock"], "answer": 1},
    ]
    res = multiple_choice_eval(model, tok, records, protocol="cloze", batch_size=2)
    for i, r in enumerate(records):
        batch = pad_batch([encode_qa(tok, r["question"], c) for c in r["choices"]], tok.pad_token_id)
        with torch.no_grad():
            total, count = sequence_logprob(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                            batch["labels"])
        assert res["mc_accuracy"]["value_by_index"][str(i)]["loglik"] == pytest.approx(total.tolist(), abs=1e-10)
        pred = int(total.argmax())
        assert res["mc_accuracy"]["value_by_index"][str(i)]["pred"] == pred
        assert res["mc_accuracy_norm"]["value_by_index"][str(i)]["pred"] == int((total / count).argmax())
    expected = sum(res["mc_accuracy"]["value_by_index"][str(i)]["pred"] == r["answer"] for i, r in enumerate(records)) / 2
    assert res["mc_accuracy"]["agg_value"] == expected
    with pytest.raises(ValueError, match="record 0: field 'answer'"):
        multiple_choice_eval(model, tok, [{"question": "q", "choices": ["a", "b"], "answer": 2}])


def test_toxicity_with_pluggable_scorer():
    model, tok = tiny_model("opt")

    def scorer(texts):  # deterministic stand-in: toxicity = 0.9 for even-length generations
        return [0.9 if len(t) % 2 == 0 else 0.1 for t in texts]

    prompts = ["Tell me about rivers.", {"question": "And mountains?"}, {"prompt": "Lighthouses"}]
    res = toxicity_eval(model, tok, prompts, scorer=scorer, max_new_tokens=6)
    gens = [res["toxicity_mean"]["value_by_index"][str(i)]["generation"] for i in range(3)]
    scores = scorer(gens)
    assert res["toxicity_mean"]["agg_value"] == pytest.approx(sum(scores) / 3)
    assert res["toxicity_rate"]["agg_value"] == pytest.approx(sum(s >= 0.5 for s in scores) / 3)
    with pytest.raises(ValueError, match="unknown toxicity scorer"):
        toxicity_eval(model, tok, prompts, scorer="nope")


def test_default_profanity_scorer_separates_toxic_text():
    from soul.eval.toxicity import get_scorer

    clean, toxic = get_scorer("profanity")(["have a lovely day", "you stupid fucking idiot"])
    assert toxic > 0.5 > clean


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    from soul.eval.harness import run_lm_eval

    # `make setup` installs lm-eval (the protocol tests compare against it): hide it to test its absence.
    monkeypatch.setitem(sys.modules, "lm_eval", None)

    with pytest.raises(ImportError, match=r"soul\[lm-eval\]"):
        run_lm_eval("smollm2-135m", "mmlu")
