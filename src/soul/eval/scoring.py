"""Teacher-forced token statistics and greedy generation, batched and one-at-a-time.

Every metric of the evaluation suite is computed from two primitives:

* `score`: for each (prompt, answer) sequence, per answer token t (the closing EOS included, as trained):

  - ``logp[t]  = log p(a_t | prompt, a_<t)``
  - ``hit[t]   = [argmax_v p(v | prompt, a_<t) == a_t]``                       (exact memorisation)
  - ``mu[t]    = E_{v~p(.|ctx)} log p(v|ctx) = Σ_v p(v) log p(v)``             (Min-K%++)
  - ``sigma[t] = sqrt(Σ_v p(v) (log p(v) − mu[t])²)``                         (Min-K%++)

* `generate`: greedy decoding of up to ``max_new_tokens`` tokens after the prompt, cut at the first EOS.

Each exists twice: the fast path (`score_batched`, `generate_batched`) and the reference path
(`score_reference`, `generate_reference`: one sequence at a time, no padding, no sharing, ``model.generate``),
which is the correctness oracle for the fast one in tests and the baseline of ``bench/eval_speed.py``.

The fast path, all under ``torch.inference_mode()``:

* scoring packs the sequences into prefix trees (`score_trie_packed`, `soul.eval.trie`): every distinct
  prefix — a chat system prompt, a question, the frame an answer shares with its perturbations — is one node
  computed once, in rows run with a 4D ancestor mask and position ids = depth. On a CPU (compute-bound) the
  work drops from Σ|sequence| to the number of distinct prefixes (on ``bench/eval_speed.py``'s 184 sequences:
  4494 → 1295 tokens with plain prompts, 9178 → 1646 with SmolLM2's chat template).
* where a model takes no custom 4D mask (flash attention, sliding windows shorter than the sequences), prompts
  are shared through the KV cache instead (`score_prefix_shared`): each distinct prompt runs once and its
  cache rows are copied for each of its answers.
* generation (`_greedy_shared`) fills the prompts' caches the same way (trees, else one padded pass) and runs
  a greedy loop that drops each row as soon as it emits EOS.

These need a decoder-only transformers model with a plain full-attention `DynamicCache` (Llama, GPT-2, OPT,
Mistral without sliding window, Qwen2, …; see `supports_trie_scoring`, `supports_prefix_sharing`). Anything
else (quantized, static or recurrent caches, plain ``nn.Module`` scorers) falls back to whole sequences in
right-padded length buckets (`score_plain`) and ``model.generate`` on left-padded batches
(`generate_hf_batched`); ``implementation="batched_plain"`` selects that fallback explicitly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from soul.data.format import pad_batch
from soul.losses import IGNORE_INDEX, upcast


@dataclass
class TokenStats:
    """Per-answer-token statistics of one sequence (plain Python lists, one entry per answer token)."""

    logp: list[float]
    hit: list[bool]
    mu: list[float]
    sigma: list[float]

    @property
    def n(self) -> int:
        return len(self.logp)

    @property
    def mean_nll(self) -> float:
        """Per-token mean negative log-likelihood of the answer: −(1/|a|) Σ_t logp[t]."""
        return -sum(self.logp) / len(self.logp)


Feature = dict[str, list[int]]


def _check_feature(i: int, f: Feature) -> None:
    if not any(label != IGNORE_INDEX for label in f["labels"]):
        raise ValueError(f"sequence {i} to score has no answer tokens (all labels are -100)")


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stats_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logp, hit, mu, sigma for answer positions of `logits` [N, V] (already gathered) and `labels` [N]."""
    logprobs = upcast(logits).log_softmax(-1)
    logp = logprobs.gather(1, labels[:, None]).squeeze(1)
    hit = logits.argmax(-1) == labels
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    # Two-pass variance Σ p (log p − μ)²: E[log² p] − μ² cancels catastrophically for flat distributions.
    sigma = (probs * (logprobs - mu[:, None]).square()).sum(-1).sqrt()
    return logp, hit, mu, sigma


def score_batched(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                  batch_size: int = 16, share_prefix: bool = True) -> list[TokenStats]:
    """Token statistics of every feature (``input_ids``/``labels``), in length-bucketed batches.

    With `share_prefix` (the default) shared prefixes run once: packed into prefix trees where the model takes
    a tree mask (`score_trie_packed`), else each prompt once with its KV cache reused by all its answers
    (`score_prefix_shared`); models with neither run each whole sequence (`score_plain`). All give the
    reference's numbers up to float rounding.
    """
    for i, f in enumerate(features):
        _check_feature(i, f)
    if share_prefix and supports_trie_scoring(model):
        try:
            return score_trie_packed(model, features, pad_token_id, batch_size=batch_size)
        except _NoPrefixSharing:
            pass  # a sliding window shorter than the sequences: share prompts through the cache instead
    if share_prefix and supports_prefix_sharing(model):
        try:
            return score_prefix_shared(model, features, pad_token_id, batch_size=batch_size)
        except _NoPrefixSharing:
            pass  # the cache this model returned cannot be sliced/extended safely: score whole sequences
    return score_plain(model, features, pad_token_id, batch_size=batch_size)


def score_plain(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                batch_size: int = 16) -> list[TokenStats]:
    """Whole sequences in length-bucketed right-padded batches (no prefix sharing).

    Right padding never changes the answer positions' logits (attention is causal and the pads come after),
    and only the answer positions' logits go through the vocabulary softmax.
    """
    for i, f in enumerate(features):
        _check_feature(i, f)
    device = _model_device(model)
    out: list[TokenStats | None] = [None] * len(features)
    with torch.inference_mode():
        for bucket in length_buckets([len(f["input_ids"]) for f in features], batch_size):
            batch = pad_batch([features[i] for i in bucket], pad_token_id, "right")
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=mask).logits
            _collect(out, bucket, logits, labels)
    return out  # type: ignore[return-value]


def _collect(out: list, rows: Sequence[int], logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Store the TokenStats of each row of a batch: position t's logits predict label t + 1."""
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    logp, hit, mu, sigma = (t.cpu().tolist() for t in _stats_from_logits(logits[:, :-1][keep], shift_labels[keep]))
    start = 0
    for row, count in zip(rows, keep.sum(1).tolist()):
        sl = slice(start, start + count)
        out[row] = TokenStats(logp[sl], hit[sl], mu[sl], sigma[sl])
        start += count


class _NoPrefixSharing(Exception):
    """The model's cache is not a plain `DynamicCache` of full-attention layers; score whole sequences."""


def supports_prefix_sharing(model: torch.nn.Module) -> bool:
    """Whether `model` can score answers against a shared, sliced prompt cache.

    Needs a decoder-only causal LM whose ``forward`` takes a cache (``cache``/``past_key_values``) and
    ``position_ids``
    (transformers' Llama, GPT-2, OPT, Mistral, Qwen, … do). The returned cache is checked again at run time
    (`score_prefix_shared` raises `_NoPrefixSharing` for sliding-window, quantized, static or recurrent-state
    caches, and `score_batched` then scores whole sequences). Plain ``nn.Module`` scorers (e.g. test doubles
    without a cache) use the whole-sequence path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return _cache_kwarg(params) is not None and "position_ids" in params


def _cache_kwarg(params) -> str | None:
    """The name ``forward`` takes the KV cache under: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _split_prefix(f: Feature) -> int:
    """Length of the shared prefix of `f`: everything before the token that predicts the first label.

    The prefix stops one token short of the first labelled token, so the suffix starts with the token whose
    logits predict the first answer token and the prefix pass needs no logits at all.
    """
    first = next(t for t, label in enumerate(f["labels"]) if label != IGNORE_INDEX)
    return first - 1


def score_prefix_shared(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                        batch_size: int = 16) -> list[TokenStats]:
    """Token statistics with each distinct prompt run once and its KV cache reused for all its answers.

    A feature ``x = p ++ s`` is split at ``|p| = first labelled index − 1``. Distinct prefixes are grouped in
    length buckets of `batch_size`, right-padded and run once (``use_cache``; ``logits_to_keep=1`` where the
    model has it, since no prefix logits are needed). The suffixes of that bucket (again `batch_size` per
    forward, by length) then run against the bucket's cache rows, selected per suffix, with

    * attention mask = prefix mask (1 on the prefix's real tokens, 0 on its right pads) ++ suffix mask, and
    * position ids = |p| + 0, 1, …, |s| − 1 (the positions the suffix tokens have in the unpadded ``x``).

    Attention is causal and masked keys get zero weight, so the suffix logits equal those of ``x`` run whole
    (up to float rounding: different matrix shapes, different summation order). Features whose prefix is empty
    (first label at index 1) are scored whole.
    """
    for i, f in enumerate(features):
        _check_feature(i, f)
    device = _model_device(model)
    out: list[TokenStats | None] = [None] * len(features)
    groups: dict[tuple[int, ...], list[int]] = {}
    whole: list[int] = []
    for i, f in enumerate(features):
        cut = _split_prefix(f)
        if cut < 1:
            whole.append(i)
        else:
            groups.setdefault(tuple(f["input_ids"][:cut]), []).append(i)
    prefixes = list(groups)
    params = inspect.signature(model.forward).parameters
    cache_kw = _cache_kwarg(params)
    if cache_kw is None:
        raise _NoPrefixSharing
    takes_logits_to_keep = "logits_to_keep" in params
    with torch.inference_mode():
        for bucket in length_buckets([len(p) for p in prefixes], batch_size):
            p_mask, layers = _prefix_pass(model, [list(prefixes[b]) for b in bucket], pad_token_id, cache_kw,
                                          takes_logits_to_keep)
            # (feature index, row of its prefix in this bucket) for every suffix that shares these prefixes
            members = [(i, row) for row, b in enumerate(bucket) for i in groups[prefixes[b]]]
            lengths = [len(features[i]["input_ids"]) - _split_prefix(features[i]) for i, _ in members]
            for chunk in length_buckets(lengths, batch_size):
                idx = [members[c][0] for c in chunk]
                rows = torch.tensor([members[c][1] for c in chunk], device=device)
                suffixes = [{k: features[i][k][_split_prefix(features[i]):] for k in ("input_ids", "labels")}
                            for i in idx]
                suf = pad_batch(suffixes, pad_token_id, "right")
                s_ids, s_mask, s_labels = (suf[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                start = torch.tensor([_split_prefix(features[i]) for i in idx], device=device)
                s_pos = start[:, None] + torch.arange(s_ids.shape[1], device=device)
                past = _select_cache(layers, rows)
                logits = model(input_ids=s_ids, attention_mask=torch.cat([p_mask[rows], s_mask], 1),
                               position_ids=s_pos, use_cache=True, **{cache_kw: past}).logits
                _collect(out, idx, logits, s_labels)
    if whole:
        for i, stats in zip(whole, score_plain(model, [features[i] for i in whole], pad_token_id,
                                               batch_size=batch_size)):
            out[i] = stats
    return out  # type: ignore[return-value]


def _prefix_pass(model: torch.nn.Module, prefixes: Sequence[list[int]], pad_token_id: int, cache_kw: str,
                 takes_logits_to_keep: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run right-padded `prefixes` once (positions 0, 1, …) and return their mask and per-layer (K, V).

    Right padding keeps every query row attending to at least one real key (no all-masked softmax rows, so
    no NaN in the pads' cache entries, which later queries mask out anyway)."""
    device = _model_device(model)
    pref = pad_batch([{"input_ids": p, "labels": p} for p in prefixes], pad_token_id, "right")
    p_ids, p_mask = pref["input_ids"].to(device), pref["attention_mask"].to(device)
    p_pos = torch.arange(p_ids.shape[1], device=device).expand_as(p_ids)
    extra = {"logits_to_keep": 1} if takes_logits_to_keep else {}
    output = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, **extra)
    cache = output[cache_kw] if cache_kw in output else output.get("past_key_values")
    return p_mask, _cache_tensors(cache)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a prefix pass's cache, refusing anything but full-attention dynamic layers
    (a sliding window would drop prefix tokens, a quantized/static/recurrent cache cannot be row-sliced)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise _NoPrefixSharing
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
    """A fresh `DynamicCache` holding the prefix rows `rows` (a copy: the suffix pass appends to it)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in layers])


ROW_TOKENS = 256  # trie row length: long enough to share a chat system prompt across several questions, short
# enough that attention over a row (quadratic in its length) stays a few per cent of the linear layers' work


def supports_trie_scoring(model: torch.nn.Module) -> bool:
    """Whether `model` takes a custom 4D attention mask with explicit position ids (`score_trie_packed`).

    transformers' decoder-only models with the ``eager`` or ``sdpa`` attention use a 4D mask as given; flash
    attention takes no arbitrary mask, and models with other than full attention in some layer (sliding-window
    or chunked layers, see ``config.layer_types``) would lose their window under a custom mask.
    """
    if not supports_prefix_sharing(model):
        return False
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    return all(t == "full_attention" for t in layer_types)


def _window(config) -> int | None:
    """The model's sliding attention window in tokens, None if its attention is not windowed."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None) or None


def _trie_chunks(model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_size: int,
                 row_tokens: int = ROW_TOKENS) -> list[list]:
    """`seqs` packed into trie rows (longest first), grouped into the rows of each forward pass: at most
    ``batch_size × longest sequence`` tokens per pass, as many as `batch_size` unpacked sequences hold."""
    from soul.eval.trie import pack_tries

    longest = max(len(s) for s in seqs)
    window = _window(model.config)
    if window is not None and window < longest + 1:
        raise _NoPrefixSharing  # the window would cut sequences the trie mask shows whole
    capacity = max(row_tokens, longest)
    rows = sorted(pack_tries(seqs, capacity), key=len, reverse=True)
    per_forward = max(1, batch_size * (longest + 1) // capacity)
    return [rows[start:start + per_forward] for start in range(0, len(rows), per_forward)]


def _trie_forward(model: torch.nn.Module, rows: Sequence, pad_token_id: int, **kwargs):
    """One forward pass over trie rows: right-padded nodes, position ids = depth, and the ancestor mask in
    additive form (0 = attend, the dtype's minimum = masked), which eager and sdpa attention both add to the
    attention scores as given."""
    device, dtype = _model_device(model), next(model.parameters()).dtype
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row.tokens)
        pos[b, :len(row)] = torch.tensor(row.depth)
        allowed[b, 0] = row.ancestor_mask(width)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **kwargs)


def _trie_prefill(model: torch.nn.Module, prefixes: Sequence[list[int]], pad_token_id: int, cache_kw: str,
                  takes_logits_to_keep: bool, batch_size: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`_prefix_pass`'s result (right-padded mask and per-layer (K, V) of each prefix at positions 0, 1, …)
    computed over prefix trees: prefixes sharing a start (a chat system prompt, a template) run it once, and
    each prefix's cache is gathered from the nodes on its path. Pads point at node 0 of the first row: any
    finite value, the mask hides them."""
    device = _model_device(model)
    width_out = max(len(p) for p in prefixes)
    p_mask = torch.zeros((len(prefixes), width_out), dtype=torch.long, device=device)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for chunk in _trie_chunks(model, prefixes, batch_size):
        output = _trie_forward(model, chunk, pad_token_id, use_cache=True,
                               **({"logits_to_keep": 1} if takes_logits_to_keep else {}))
        cache = _cache_tensors(output[cache_kw] if cache_kw in output else output.get("past_key_values"))
        width = cache[0][0].shape[2]
        members = [(i, b, path) for b, row in enumerate(chunk) for i, path in row.paths.items()]
        flat = torch.zeros((len(members), width_out), dtype=torch.long)
        for m, (i, b, path) in enumerate(members):
            flat[m, :len(path)] = b * width + torch.tensor(path)
            p_mask[i, :len(path)] = 1
        flat, where = flat.to(device), torch.tensor([i for i, _, _ in members], device=device)
        if not layers:
            layers = [(k.new_zeros(len(prefixes), k.shape[1], width_out, k.shape[3]),
                       v.new_zeros(len(prefixes), v.shape[1], width_out, v.shape[3])) for k, v in cache]
        for (k_out, v_out), (k, v) in zip(layers, cache):
            # [B, heads, width, dim] -> one node per row of [B·width, heads, dim], then each prefix's path
            for src, dst in ((k, k_out), (v, v_out)):
                nodes = src.transpose(1, 2).reshape(-1, src.shape[1], src.shape[3])
                dst[where] = nodes[flat].transpose(1, 2)
    return p_mask, layers


def score_trie_packed(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                      batch_size: int = 16, row_tokens: int = ROW_TOKENS) -> list[TokenStats]:
    """Token statistics with the sequences packed into prefix trees, so each shared prefix runs once.

    A feature ``x`` with labels ``y`` needs the logits after each prefix ``x[:t]`` (t ≥ 1) whose next label
    ``y[t]`` is an answer token, so its input is ``x[:-1]``. These inputs are packed into trie rows of at most
    ``max(row_tokens, longest feature)`` nodes (`soul.eval.trie.pack_tries`); a row runs with
    position ids = node depth and a 4D attention mask letting each node attend to its ancestors only, which
    is what a causal model computes for each sequence alone (up to float rounding). Each (node, next label)
    pair's statistics are computed once and shared by every sequence through that node. A forward takes as
    many rows as fit in ``batch_size × longest feature`` tokens, the size of `batch_size` unpacked sequences.
    """
    for i, f in enumerate(features):
        _check_feature(i, f)
    device = _model_device(model)
    chunks = _trie_chunks(model, [f["input_ids"][:-1] for f in features], batch_size, row_tokens)
    out: list[TokenStats | None] = [None] * len(features)
    with torch.inference_mode():
        for chunk in chunks:
            logits = _trie_forward(model, chunk, pad_token_id, use_cache=False).logits
            # every (row, node, next label) the chunk's features need, each computed once
            pairs: dict[tuple[int, int, int], int] = {}
            needs: list[tuple[int, list[int]]] = []
            for b, row in enumerate(chunk):
                for i, path in row.paths.items():
                    labels = features[i]["labels"]
                    keys = [pairs.setdefault((b, path[t - 1], labels[t]), len(pairs))
                            for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
                    needs.append((i, keys))
            b_idx, n_idx, targets = (torch.tensor(col, device=device) for col in zip(*pairs))
            logp, hit, mu, sigma = (t.cpu().tolist() for t in _stats_from_logits(logits[b_idx, n_idx], targets))
            for i, keys in needs:
                out[i] = TokenStats([logp[k] for k in keys], [hit[k] for k in keys], [mu[k] for k in keys],
                                    [sigma[k] for k in keys])
    return out  # type: ignore[return-value]


def score_reference(model: torch.nn.Module, features: Sequence[Feature], pad_token_id: int, *,
                    batch_size: int = 1) -> list[TokenStats]:
    """One sequence at a time, no padding, token by token: the oracle for `score_batched`."""
    del pad_token_id, batch_size  # same signature as the batched path; nothing is padded here
    device = _model_device(model)
    out = []
    with torch.inference_mode():
        for i, f in enumerate(features):
            _check_feature(i, f)
            ids = torch.tensor([f["input_ids"]], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            stats = TokenStats([], [], [], [])
            for t in range(1, len(f["labels"])):
                label = f["labels"][t]
                if label == IGNORE_INDEX:
                    continue
                lp, hit, mu, sigma = _stats_from_logits(logits[t - 1:t], torch.tensor([label], device=device))
                stats.logp.append(float(lp))
                stats.hit.append(bool(hit))
                stats.mu.append(float(mu))
                stats.sigma.append(float(sigma))
            out.append(stats)
    return out


def _greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    # A fresh config: the model's own generation_config may ask for sampling or a repetition penalty.
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def cut_at_eos(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    """Tokens before the first EOS (the EOS itself and anything after it are dropped)."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def _decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(cut_at_eos(tokens, tokenizer.eos_token_id), skip_special_tokens=True).strip()


def generate_batched(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                     max_new_tokens: int = 200, batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id `prompts` in length buckets with the KV cache, cut at EOS.

    Where the model supports it (`supports_prefix_sharing`, every prompt ≥ 2 tokens) our own greedy loop
    (`_greedy_shared`) runs, which drops each sequence from the batch as soon as it emits EOS: on a CPU the
    cost is the number of tokens computed, and `model.generate` keeps computing finished rows until the
    longest one ends. Otherwise `model.generate` on left-padded buckets.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if supports_prefix_sharing(model) and all(len(p) >= 2 for p in prompts):
        try:
            return _greedy_shared(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        except _NoPrefixSharing:
            pass
    return generate_hf_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _greedy_shared(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy decoding: prompt[:-1] through `_prefix_pass` (right-padded), then one token per step.

    Step s feeds each live row's latest token at position |prompt| − 1 + s with the attention mask
    prefix mask ++ 1^(s+1); next token = argmax of the last logits. A row that emits EOS (or reaches
    `max_new_tokens`) is finished and its cache row is dropped."""
    params = inspect.signature(model.forward).parameters
    cache_kw = _cache_kwarg(params)
    takes_logits_to_keep = "logits_to_keep" in params
    extra = {"logits_to_keep": 1} if takes_logits_to_keep else {}
    from transformers.cache_utils import DynamicCache

    device = _model_device(model)
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for bucket in length_buckets([len(p) for p in prompts], batch_size):
            p_mask, layers = _prefill(model, [prompts[i][:-1] for i in bucket], tokenizer.pad_token_id,
                                      cache_kw, takes_logits_to_keep, batch_size)
            cache = DynamicCache(ddp_cache_data=layers)
            live = list(bucket)  # prompt index of each cache row
            tokens: dict[int, list[int]] = {i: [] for i in bucket}
            nxt = torch.tensor([[prompts[i][-1]] for i in bucket], device=device)
            pos = torch.tensor([[len(prompts[i]) - 1] for i in bucket], device=device)
            for step in range(max_new_tokens):
                mask = torch.cat([p_mask, p_mask.new_ones(len(live), step + 1)], 1)
                logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                               **{cache_kw: cache}, **extra).logits[:, -1]
                new = logits.argmax(-1)
                for i, t in zip(live, new.tolist()):
                    tokens[i].append(t)
                keep = [r for r, t in enumerate(new.tolist()) if t != eos]
                if not keep:
                    break
                if len(keep) < len(live):
                    rows = torch.tensor(keep, device=device)
                    cache.batch_select_indices(rows)
                    p_mask, new, pos = p_mask[rows], new[rows], pos[rows]
                    live = [live[r] for r in keep]
                nxt, pos = new[:, None], pos + 1
            for i in bucket:
                out[i] = _decode(tokenizer, tokens[i])
    return out


def _prefill(model: torch.nn.Module, prefixes: Sequence[list[int]], pad_token_id: int, cache_kw: str,
             takes_logits_to_keep: bool, batch_size: int):
    """The prompts' caches over prefix trees where the model takes a tree mask, else one padded pass."""
    if supports_trie_scoring(model):
        try:
            return _trie_prefill(model, prefixes, pad_token_id, cache_kw, takes_logits_to_keep, batch_size)
        except _NoPrefixSharing:
            pass
    return _prefix_pass(model, prefixes, pad_token_id, cache_kw, takes_logits_to_keep)


def generate_hf_batched(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                        max_new_tokens: int = 200, batch_size: int = 16) -> list[str]:
    """``model.generate`` on left-padded length buckets (greedy, KV cache), cut at EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    config = _greedy_config(tokenizer, max_new_tokens)
    out: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for bucket in length_buckets([len(p) for p in prompts], batch_size):
            feats = [{"input_ids": prompts[i], "labels": prompts[i]} for i in bucket]
            batch = pad_batch(feats, tokenizer.pad_token_id, "left")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, i in enumerate(bucket):
                out[i] = _decode(tokenizer, gen[row, ids.shape[1]:].tolist())
    return out


def generate_reference(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                       max_new_tokens: int = 200, batch_size: int = 1) -> list[str]:
    """One prompt at a time, unpadded: the oracle for `generate_batched`."""
    del batch_size
    device = _model_device(model)
    config = _greedy_config(tokenizer, max_new_tokens)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            out.append(_decode(tokenizer, gen[0, ids.shape[1]:].tolist()))
    return out


Scorer = Callable[..., list[TokenStats]]
Generator = Callable[..., list[str]]

IMPLEMENTATIONS: dict[str, tuple[Scorer, Generator]] = {
    "batched": (score_batched, generate_batched),
    # the same batches without prefix sharing, `model.generate`: the previous fast path, a baseline in the bench
    "batched_plain": (partial(score_batched, share_prefix=False), generate_hf_batched),
    "reference": (score_reference, generate_reference),
}


def get_implementation(name: str) -> tuple[Scorer, Generator]:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; expected one of {sorted(IMPLEMENTATIONS)}") from None


EVAL_PRECISIONS = ("auto", "no", "bf16")


def resolve_eval_precision(model: torch.nn.Module, mixed_precision: str, *, warn: bool = True) -> tuple[str, str]:
    """``(choice, reason)`` for scoring `model` in `mixed_precision` ("auto": bf16 only on hardware with native
    bf16, see `soul.precision.resolve_precision`); a bad value raises before any forward pass."""
    from soul.precision import resolve_precision

    if mixed_precision not in EVAL_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {EVAL_PRECISIONS}, got {mixed_precision!r}")
    return resolve_precision(mixed_precision, _model_device(model), warn=warn)


def eval_autocast(model: torch.nn.Module, mixed_precision: str):
    """The context scoring and generation run in: bfloat16 autocast on the model's device for "bf16" (and for
    "auto" where the hardware has native bf16; weights untouched), a no-op for "no"."""
    choice, _ = resolve_eval_precision(model, mixed_precision, warn=False)
    return torch.autocast(_model_device(model).type, dtype=torch.bfloat16, enabled=choice == "bf16")
