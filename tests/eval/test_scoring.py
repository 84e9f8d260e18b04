"""The batched scorer/generator against the one-at-a-time oracle and against independent computations."""

from __future__ import annotations

import pytest
import torch

from soul.data.format import encode_qa, pad_batch, prompt_ids
from soul.eval.scoring import (
    _prefix_pass,
    _trie_prefill,
    cut_at_eos,
    generate_batched,
    generate_reference,
    length_buckets,
    score_batched,
    score_plain,
    score_prefix_shared,
    score_reference,
    score_trie_packed,
    supports_prefix_sharing,
    supports_trie_scoring,
)
from soul.eval.trie import pack_tries
from soul.losses import sequence_logprob
from soul.testing import tiny_model as _tiny_float32_model

# The batched paths and the one-at-a-time oracle run the same model on other paddings, batch shapes and
# masks, so in float32 their sums come out in another order: per-token log-probabilities (~6 nats) differed by
# up to 3e-6 and the summed ones (~60 nats) by 2e-5 here, depending on the CPU's kernels -- too close to any
# fixed float32 tolerance, and an argmax (hit, greedy token) may flip wherever two logits tie to that level.
# Every model here is float64 (soul scores float64 logits in float64), where reordering a sum costs ~1e-16
# of its magnitude: TOL is ~1e4x that for sums of ~60 nats, while a real bug (a wrong position, a padded
# token that counts) moves a score by a whole token's log-probability.
TOL = 1e-10
# Except under eager attention: transformers computes its softmax in float32 whatever the model's dtype, so each
# attention probability keeps float32 rounding (eps32/2 relative). Through 2 layers that moves a ~6-nat token
# log-probability by about eps32 * 6 * 2 ~ 1.4e-6 at most; EAGER_TOL = 64 eps32 = 7.6e-6 (measured: 1.9e-8).
EAGER_TOL = 64 * torch.finfo(torch.float32).eps


def tiny_model(family: str, **kwargs):
    model, tok = _tiny_float32_model(family, **kwargs)
    return model.double(), tok


def features(tok, records):
    feats = []
    for r in records:
        for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]:
            feats.append(encode_qa(tok, r["question"], a))
    return feats


def test_length_buckets_cover_all_indices_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    buckets = length_buckets(lengths, 3)
    assert sorted(i for b in buckets for i in b) == list(range(7))
    assert [len(b) for b in buckets] == [3, 3, 1]
    assert [lengths[i] for i in buckets[0]] == [9, 8, 7]  # longest together
    with pytest.raises(ValueError):
        length_buckets(lengths, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_batched_scores_equal_reference(family, records):
    model, tok = tiny_model(family)
    feats = features(tok, records)
    fast = score_batched(model, feats, tok.pad_token_id, batch_size=4)
    slow = score_reference(model, feats, tok.pad_token_id)
    for f, a, b in zip(feats, fast, slow):
        assert a.n == b.n == sum(label != -100 for label in f["labels"])
        assert a.hit == b.hit
        for field in ("logp", "mu", "sigma"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), abs=TOL)


def test_scores_match_losses_module_and_hand_entropy(records):
    model, tok = tiny_model("llama")
    feats = features(tok, records)
    stats = score_batched(model, feats, tok.pad_token_id, batch_size=5)
    batch = pad_batch(feats, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = sequence_logprob(logits, batch["labels"])
    assert [s.n for s in stats] == count.tolist()
    assert [sum(s.logp) for s in stats] == pytest.approx(total.tolist(), abs=TOL)
    # mu/sigma of the first answer token of sequence 0, from the full distribution
    f = feats[0]
    t = next(i for i, label in enumerate(f["labels"]) if label != -100)
    logp = torch.log_softmax(logits[0, t - 1].double(), -1)
    p = logp.exp()
    mu = float((p * logp).sum())
    assert stats[0].mu[0] == pytest.approx(mu, abs=TOL)
    assert stats[0].sigma[0] == pytest.approx(float((p * (logp - mu) ** 2).sum().sqrt()), abs=TOL)
    assert stats[0].hit[0] == (int(logits[0, t - 1].argmax()) == f["labels"][t])


def test_sequence_without_answer_tokens_is_an_error():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="sequence 1"):
        score_batched(model, [encode_qa(tok, "q", "a"), {"input_ids": [1, 2], "labels": [-100, -100]}], 0)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], 2) == [5, 6]
    assert cut_at_eos([5, 6], 2) == [5, 6]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_batched_generation_equals_reference(family, records):
    model, tok = tiny_model(family)
    # prompts of different lengths, so left padding really happens
    prompts = [prompt_ids(tok, r["question"] + " extra" * i) for i, r in enumerate(records)]
    assert len({len(p) for p in prompts}) > 1
    fast = generate_batched(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert fast == generate_reference(model, tok, prompts, max_new_tokens=12)


def test_generation_is_greedy_without_cache_oracle(records):
    model, tok = tiny_model("llama")
    p = prompt_ids(tok, records[0]["question"])
    ids = list(p)
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    expected = tok.decode(ids[len(p):], skip_special_tokens=True).strip()
    assert generate_batched(model, tok, [p, prompt_ids(tok, "hi")], max_new_tokens=10)[0] == expected


def test_prefix_sharing_equals_plain_path_and_runs_each_prompt_once(records):
    model, tok = tiny_model("llama")
    # prompts of different lengths (the shared prefixes are right-padded in their bucket), 5 answers each,
    # plus one sequence whose first answer token is at index 1 (empty prefix: scored whole)
    recs = [dict(r, question=r["question"] + " more" * i) for i, r in enumerate(records)]
    feats = [*features(tok, recs), {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    shared = score_prefix_shared(model, feats, tok.pad_token_id, batch_size=4)
    hook.remove()
    plain = score_plain(model, feats, tok.pad_token_id, batch_size=4)
    for a, b in zip(shared, plain):
        assert a.n == b.n and a.hit == b.hit
        for field in ("logp", "mu", "sigma"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), abs=TOL)
    # work done: every distinct prompt once (minus its last token) + each answer with that last token
    prompt_len = [len(prompt_ids(tok, r["question"])) for r in recs]
    real_tokens = sum(n - 1 for n in prompt_len) + 3  # prefixes once each, the empty-prefix sequence whole
    real_tokens += sum(len(f["input_ids"]) - prompt_len[k // 5] + 1 for k, f in enumerate(feats[:-1]))
    computed = sum(rows * cols for rows, cols in calls)  # padded tokens actually run through the model
    assert real_tokens <= computed < sum(len(f["input_ids"]) for f in feats)  # fewer than whole sequences
    assert computed - real_tokens < 0.3 * real_tokens  # length buckets keep the padding small


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_prefix_sharing_equals_plain_path_other_families(family, records):
    model, tok = tiny_model(family)
    assert supports_prefix_sharing(model)
    recs = [dict(r, question=r["question"] + " x" * (2 * i)) for i, r in enumerate(records)]
    feats = features(tok, recs)
    for a, b in zip(score_batched(model, feats, tok.pad_token_id, batch_size=3),
                    score_batched(model, feats, tok.pad_token_id, batch_size=3, share_prefix=False)):
        assert a.hit == b.hit
        assert a.logp == pytest.approx(b.logp, abs=TOL) and a.sigma == pytest.approx(b.sigma, abs=TOL)


def test_models_without_a_cache_use_the_plain_path(records):
    class NoCache(torch.nn.Module):  # forward(input_ids, attention_mask) only: nothing to share
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model, tok = tiny_model("llama")
    wrapped = NoCache(model)
    assert not supports_prefix_sharing(wrapped)
    feats = features(tok, records)
    got = score_batched(wrapped, feats, tok.pad_token_id, batch_size=4)
    assert [s.logp for s in got] == [s.logp for s in score_plain(model, feats, tok.pad_token_id, batch_size=4)]


class _EosAs:
    """The tiny tokenizer with another token playing EOS (so that rows finish at different steps)."""

    def __init__(self, tok, eos: int) -> None:
        self.tok, self.eos_token_id, self.pad_token_id = tok, eos, tok.pad_token_id

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_loop_drops_finished_rows_without_changing_the_others(family, records):
    model, tok = tiny_model(family)
    # Larger weights than the default init, so greedy continuations are not one token repeated.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    prompts = [prompt_ids(tok, r["question"] + " extra" * i) for i, r in enumerate(records)]
    # EOS := the 2nd greedy token of prompt 0, so that row stops after 2 steps while others go on
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(2):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    tok2 = _EosAs(tok, ids[-1])
    fast = generate_batched(model, tok2, prompts, max_new_tokens=8, batch_size=6)
    assert fast == generate_reference(model, tok2, prompts, max_new_tokens=8)
    assert len({len(tok.encode(x, add_special_tokens=False)) for x in fast}) > 1  # rows ended at different steps


def _close(a, b, tol: float = TOL) -> None:
    assert a.n == b.n and a.hit == b.hit
    for field in ("logp", "mu", "sigma"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), abs=tol)


def _record_forwards(model):
    """Forward pre-hook recording (input shape, attention-mask rank) of every call."""
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((tuple(kw["input_ids"].shape), kw["attention_mask"].dim())), with_kwargs=True)
    return calls, hook


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("opt", "eager")])
def test_trie_scoring_equals_reference_over_several_rows_and_forwards(family, attn, records):
    model, tok = tiny_model(family)
    model.set_attn_implementation(attn)
    assert supports_trie_scoring(model)
    recs = [dict(r, question=r["question"] + " more" * i) for i, r in enumerate(records)]
    feats = features(tok, recs)
    calls, hook = _record_forwards(model)
    got = score_trie_packed(model, feats, tok.pad_token_id, batch_size=3, row_tokens=40)
    hook.remove()
    for a, b in zip(got, score_reference(model, feats, tok.pad_token_id)):
        _close(a, b, EAGER_TOL if attn == "eager" else TOL)
    assert len(calls) > 1 and all(rank == 4 for _, rank in calls)  # several forwards, all with tree masks
    inputs = [f["input_ids"][:-1] for f in feats]
    assert sum(shape[0] for shape, _ in calls) == len(pack_tries(inputs, max(40, max(map(len, inputs)))))


def test_trie_scoring_computes_each_distinct_prefix_once(records):
    model, tok = tiny_model("llama")
    feats = features(tok, records)
    inputs = [f["input_ids"][:-1] for f in feats]  # the last token of a sequence predicts nothing
    distinct = {tuple(x[:k]) for x in inputs for k in range(1, len(x) + 1)}
    calls, hook = _record_forwards(model)
    got = score_trie_packed(model, feats, tok.pad_token_id, batch_size=len(feats), row_tokens=10_000)
    hook.remove()
    assert calls == [((1, len(distinct)), 4)]  # one row: the whole trie, no padding, no repeated prefix
    assert len(distinct) < 0.6 * sum(map(len, inputs))  # what sharing saves on these templated answers
    for a, b in zip(got, score_plain(model, feats, tok.pad_token_id, batch_size=4)):
        _close(a, b)


def test_models_without_tree_masks_fall_back_to_two_dimensional_masks(records):
    model, tok = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # takes no arbitrary mask (not run here)
    assert not supports_trie_scoring(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4  # shorter than the sequences: a tree mask would drop the window
    feats = features(tok, records)
    calls, hook = _record_forwards(model)
    got = score_batched(model, feats, tok.pad_token_id, batch_size=4)
    hook.remove()
    assert calls and all(rank == 2 for _, rank in calls)  # not the tree path
    for a, b in zip(got, score_reference(model, feats, tok.pad_token_id)):
        _close(a, b)


def test_trie_prefill_equals_one_padded_pass(records):
    model, tok = tiny_model("llama")
    # prompts with a long common start (like a chat system prompt), different lengths, one a prefix of another
    start = prompt_ids(tok, "You are a helpful assistant who answers briefly.")
    prompts = [start + prompt_ids(tok, r["question"] + " more" * i) for i, r in enumerate(records)] + [start[:-2]]
    with torch.inference_mode():
        mask_a, layers_a = _trie_prefill(model, prompts, tok.pad_token_id, "past_key_values", True, batch_size=2)
        mask_b, layers_b = _prefix_pass(model, prompts, tok.pad_token_id, "past_key_values", True)
    assert torch.equal(mask_a, mask_b)
    real = mask_b.bool()
    for (ka, va), (kb, vb) in zip(layers_a, layers_b):
        assert ka.shape == kb.shape
        for a, b in ((ka, kb), (va, vb)):
            assert torch.allclose(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=TOL)
