"""TOFU evaluation: probability, ROUGE-L, truth ratio, forget quality, model utility, MIA, memorisation.

`evaluate` scores every answer of every split (ground truth, paraphrase, perturbations, holdout) in one
length-bucketed pool, generates greedy answers for every question in another, and assembles the metrics
under open-unlearning's TOFU names, each ``{"agg_value": float | None, "value_by_index": {str(idx): {...}}}``.

Split roles are taken from the keys of ``splits``: the key equal to ``forget_split_name`` or starting with
``forget`` is the forget set; ``retain*`` the retain set; ``real_authors*``/``ra`` and ``world_facts*``/``wf``
the real-world utility sets; ``holdout*`` the never-trained set (non-members for MIA; also ``holdout=``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from soul.data.format import answer_ids, prompt_ids, resolve_format
from soul.eval import metrics as M
from soul.eval.results import (
    load_reference,
    reference_mia_auc,
    reference_truth_ratios,
)
from soul.eval.scoring import TokenStats, eval_autocast, get_implementation, resolve_eval_precision
from soul.io import write_json_atomic
from soul.losses import IGNORE_INDEX

Record = dict[str, Any]

ROLE_ALIASES = {"forget": "forget", "retain": "retain", "real_authors": "ra", "ra": "ra", "world_facts": "wf",
                "wf": "wf", "holdout": "holdout"}
# Metric names per role (open-unlearning's spelling, including its inconsistent capitalisation).
PROB_KEY = {"forget": "forget_Q_A_Prob", "retain": "retain_Q_A_Prob", "ra": "ra_Q_A_Prob_normalised",
            "wf": "wf_Q_A_Prob_normalised"}
ROUGE_KEY = {r: f"{r}_Q_A_ROUGE" for r in ("forget", "retain", "ra", "wf")}
TR_KEY = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio", "ra": "ra_Truth_Ratio",
          "wf": "wf_Truth_Ratio"}
UTILITY_KEYS = [k for role in ("retain", "ra", "wf") for k in (PROB_KEY[role], ROUGE_KEY[role], TR_KEY[role])]


def split_role(name: str, forget_split_name: str = "forget") -> str:
    """The role (forget/retain/ra/wf/holdout) of a split from its name."""
    if name == forget_split_name:
        return "forget"
    for prefix, role in ROLE_ALIASES.items():
        if name == prefix or name.startswith(prefix):
            return role
    raise ValueError(f"split {name!r}: cannot tell its role; name it forget*, retain*, real_authors*, "
                     f"world_facts*, holdout* (or pass forget_split_name={name!r})")


def _check_records(role: str, name: str, records: Sequence[Record]) -> None:
    """Fail early, naming the split, the record index and the field, before any model work."""
    if not isinstance(records, Sequence) or isinstance(records, str | bytes):
        raise ValueError(f"split {name!r}: expected a list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"split {name!r}: no records")
    needs_para = role in ("forget", "retain")
    needs_pert = role in ("forget", "retain", "ra", "wf")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"split {name!r} record {i}: expected a dict, got {type(r).__name__}")
        for field in ("question", "answer") + (("paraphrased_answer",) if needs_para else ()):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise ValueError(f"split {name!r} record {i}: field {field!r} must be a non-empty string "
                                 f"(got {r.get(field)!r}){_perturbed_hint(role)}")
        if needs_pert:
            pert = r.get("perturbed_answer")
            if not isinstance(pert, list) or not pert or not all(isinstance(p, str) and p for p in pert):
                raise ValueError(f"split {name!r} record {i}: field 'perturbed_answer' must be a non-empty list of "
                                 f"strings (the truth ratio needs it), got {pert!r}{_perturbed_hint(role)}")


def _perturbed_hint(role: str) -> str:
    return "; use the *_perturbed TOFU split, which carries paraphrases and perturbations" if role != "holdout" else ""


class _Pool:
    """Sequences to score, each remembered by a key (role, idx, kind, j); with `max_length`, answers cut at
    the end to fit (as `soul.data.format.encode_qa` does for training), the cut ones kept in `truncated`."""

    def __init__(self, tokenizer, prompt_format: str, max_length: int | None = None) -> None:
        self.tokenizer, self.prompt_format, self.max_length = tokenizer, prompt_format, max_length
        self.features: list[dict[str, list[int]]] = []
        self.where: dict[tuple, int] = {}
        self.truncated: dict[tuple, int] = {}  # key -> untruncated length
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = prompt_ids(self.tokenizer, question, self.prompt_format)
        return self._prompts[question]

    def add(self, key: tuple, question: str, answer: str) -> None:
        # prompt + answer exactly as `soul.data.format.encode_qa` builds it for training (no truncation).
        p = self.prompt(question)
        a = answer_ids(self.tokenizer, answer, self.prompt_format)
        if self.max_length is not None and len(p) + len(a) > self.max_length:
            self.truncated[key] = len(p) + len(a)
            a = a[:max(1, self.max_length - len(p))]  # at least one answer token, as encode_qa
        self.where[key] = len(self.features)
        self.features.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})


_FIELDS = {"answer": "answer", "para": "paraphrased_answer", "pert": "perturbed_answer"}


def _places(names: Sequence[str], sources: Mapping[str, str] | None) -> dict[str, Any]:
    """Split name -> a `soul.train.lengths.DataPlace` naming where its records came from (the split's file
    when `sources` gives it, else ``split 'NAME'``)."""
    from soul.train.lengths import DataPlace

    out = {}
    for name in names:
        given = (sources or {}).get(name)
        out[name] = given if isinstance(given, DataPlace) else DataPlace(given or f"split {name!r}")
    return out


def _length_guard(pool: _Pool, roles: dict[str, tuple[str, Sequence[Record]]], places: dict[str, Any],
                  context: int | None, max_length: int | None, *, warn: bool = True) -> None:
    """Nothing longer than the model's context reaches a forward pass — the rule of training
    (`soul.train.lengths`): without `max_length` a question + answer longer than `context` is an error
    naming its file, record and field; with it (at most `context`) answers were cut to fit (`_Pool`) and one
    warning per split names the records."""
    if max_length is not None and context is not None and max_length > context:
        raise ValueError(f"option 'max_length' is {max_length}, more than the model's context of {context} tokens")
    limit = max_length or context
    if limit is None:
        return
    role_of_name = {role: name for role, (name, _) in roles.items()}
    too_long = [(key, len(pool.features[idx]["input_ids"])) for key, idx in pool.where.items()
                if len(pool.features[idx]["input_ids"]) > limit]
    if too_long:
        (role, i, kind, j), n = too_long[0]
        place = places[role_of_name[role]].record(i)
        field = _FIELDS[kind] + (f"[{j}]" if kind == "pert" else "")
        if max_length is not None:  # only a prompt that fills max_length on its own still does not fit
            raise ValueError(f"{place}: its prompt alone is longer than max_length={limit} tokens")
        more = f" ({len(too_long)} answers are)" if len(too_long) > 1 else ""
        raise ValueError(f"{place}: question + {field} is {n} tokens long, more than the model's context of "
                         f"{limit}{more}; shorten it or set max_length (soul eval --max-length) to truncate answers")
    if not warn:
        return
    by_role: dict[str, list[int]] = {}
    for role, i, _, _ in pool.truncated:
        by_role.setdefault(role, [])
        if i not in by_role[role]:
            by_role[role].append(i)
    for role, rows in by_role.items():
        shown = ", ".join(str(i) for i in rows[:10]) + (" …" if len(rows) > 10 else "")
        print(f"soul: warning: {places[role_of_name[role]]}: truncated answers of {len(rows)} record(s) to "
              f"max_length={limit} tokens (records {shown})", file=sys.stderr)


def _roles(splits: Mapping[str, Sequence[Record]], holdout: Sequence[Record] | None,
           forget_split_name: str) -> dict[str, tuple[str, Sequence[Record]]]:
    roles: dict[str, tuple[str, Sequence[Record]]] = {}
    named = dict(splits)
    if holdout is not None:
        named.setdefault("holdout", holdout)
    for name, records in named.items():
        role = split_role(name, forget_split_name)
        if role in roles:
            raise ValueError(f"splits {roles[role][0]!r} and {name!r} both have the role {role!r}")
        _check_records(role, name, records)
        roles[role] = (name, records)
    return roles


def _fill_pool(pool: _Pool, roles: dict[str, tuple[str, Sequence[Record]]]) -> _Pool:
    for role, (_, records) in roles.items():
        for i, r in enumerate(records):
            pool.add((role, i, "answer", 0), r["question"], r["answer"])
            if role in ("forget", "retain"):
                pool.add((role, i, "para", 0), r["question"], r["paraphrased_answer"])
            if role != "holdout":
                for j, p in enumerate(r["perturbed_answer"]):
                    pool.add((role, i, "pert", j), r["question"], p)
    return pool


def check_lengths(tokenizer, splits: Mapping[str, Sequence[Record]], *, context: int | None,
                  holdout: Sequence[Record] | None = None, prompt_format: str = "auto", max_length: int | None = None,
                  sources: Mapping[str, str] | None = None, forget_split_name: str = "forget") -> None:
    """The checks `evaluate` makes before scoring (records well-formed, none longer than `context` tokens
    unless `max_length` truncates), with only a tokenizer: `soul eval` runs them before loading any model."""
    roles = _roles(splits, holdout, forget_split_name)
    pool = _fill_pool(_Pool(tokenizer, resolve_format(tokenizer, prompt_format), max_length), roles)
    # no warning here: `evaluate` warns when it truncates
    _length_guard(pool, roles, _places([name for name, _ in roles.values()], sources), context, max_length, warn=False)


def _generation_budget(prompts: Sequence[list[int]], max_new_tokens: int, context: int | None) -> int:
    """`max_new_tokens`, lowered (with a warning) so that the longest prompt plus its generation fits the
    model's context: past it a model with learned positions fails with an IndexError."""
    if context is None or not prompts:
        return max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens <= context:
        return max_new_tokens
    budget = max(1, context - longest)
    print(f"soul: warning: generating at most {budget} new tokens instead of {max_new_tokens}: the longest prompt "
          f"({longest} tokens) plus {max_new_tokens} exceeds the model's context of {context}", file=sys.stderr)
    return budget


def _metric(values: dict[str, dict[str, Any]], agg: float | None, **extra: Any) -> dict[str, Any]:
    return {"agg_value": agg, "value_by_index": values, **extra}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def evaluate(
    model,
    tokenizer,
    splits: dict[str, Sequence[Record]],
    *,
    forget_split_name: str = "forget",
    retain_reference: str | os.PathLike | dict[str, Any] | None = None,
    holdout: Sequence[Record] | None = None,
    prompt_format: str = "auto",
    batch_size: int = 16,
    generation_batch_size: int | None = None,
    max_new_tokens: int = 200,
    min_k: float = 0.4,
    generate: bool = True,
    implementation: str = "batched",
    mixed_precision: str = "no",
    max_length: int | None = None,
    sources: Mapping[str, str] | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on TOFU-style `splits` and return (and, with `out`, atomically write) the results.

    Per split role (formulas; NLL(a) is the per-token mean answer NLL, closing EOS included):

    * ``forget_Q_A_Prob``/``retain_Q_A_Prob``: mean over questions of P(a|q)^(1/|a|) = exp(−NLL(a)).
    * ``ra_/wf_Q_A_Prob_normalised``: mean of p_c / (p_c + Σ_j p_j), each p = exp(−NLL) (p_c: the answer,
      p_j: the perturbed answers).
    * ``*_Q_A_ROUGE``: mean ROUGE-L recall (stemmer on) of the greedy generation (≤ `max_new_tokens` new
      tokens, cut at EOS) against the answer.
    * truth ratio TR = p_false / p_true, p_false = exp(−mean_j NLL(perturbed_j)), p_true = exp(−NLL(correct)),
      correct = ``paraphrased_answer`` on forget/retain and ``answer`` on ra/wf. Reported:
      ``forget_truth_ratio`` = mean(min(TR, 1/TR)); ``retain_/ra_/wf_Truth_Ratio`` = mean(max(0, 1 − TR)).
      Per question, ``score`` holds the raw TR.
    * ``forget_quality``: p-value of the two-sample KS test between this model's per-question forget TRs and
      the **retain model's** (from `retain_reference`: a results dict or a path to a results JSON of the
      retain model, e.g. from `reference_stats`, or to open-unlearning's ``TOFU_EVAL.json`` or TOFU's
      ``eval_log_forget.json``, see `soul.eval.interop`); None without a reference — never against this model.
    * ``model_utility``: harmonic mean of the 9 numbers {retain, ra, wf} × {Prob, ROUGE, Truth_Ratio}.
    * ``mia_loss``/``mia_zlib``/``mia_min_k``/``mia_min_k_plus_plus`` (with a holdout set): AUC of forget
      (members) vs holdout (non-members) answers; 1.0 = forget set recognised as training data, 0.5 = chance.
      ``privleak`` = (AUC_model − AUC_retain) / AUC_retain × 100 on ``mia_min_k`` when the reference has it.
    * ``exact_memorization``, ``extraction_strength``: forget answers, see `soul.eval.metrics`.

    `batch_size` is the number of sequences a scoring forward pass holds (or, packed into prefix trees, the
    tokens of that many); `generation_batch_size` (default ``2 × batch_size``) the rows of a greedy decoding
    step. A decoding step computes one token per row, so it holds far less than a scoring pass, and it is
    bound by reading the weights rather than by arithmetic: on the 2-core CPU, a SmolLM2-135M step took
    72 ms for 1 row, 118 ms for 16 and 139 ms for 32.

    `mixed_precision` "bf16" runs scoring and generation under bfloat16 autocast (weights stay as they are).
    On the 2-core CPU it halves the scoring time of SmolLM2-135M (40 TOFU forget questions × 7 answers:
    41 s → 19 s); per-answer mean NLLs moved by 0.005 on average (at most 0.026) and 150 of 160 greedy
    generations were unchanged. Compare only models evaluated in the same precision — the retain reference
    included; the precision is recorded in ``meta``.

    No sequence longer than the model's context is scored (`soul.train.lengths`, as in training): a longer
    question + answer is a ValueError naming its record (its file, when `sources` maps the split's name to
    it), before any forward pass; with `max_length` (at most the context) answers are cut at the end to fit,
    with a warning. Generation stops where the longest prompt reaches the context.

    `implementation` is "batched" (fast: prompts shared across answers, batched greedy loop), "batched_plain"
    (batches without prompt sharing) or "reference" (one sequence at a time; the test oracle).
    """
    from soul.train.lengths import model_context

    score_fn, generate_fn = get_implementation(implementation)
    requested_precision = mixed_precision
    mixed_precision, precision_reason = resolve_eval_precision(model, mixed_precision)
    gen_batch = generation_batch_size or 2 * batch_size
    fmt = resolve_format(tokenizer, prompt_format)
    roles = _roles(splits, holdout, forget_split_name)
    reference = load_reference(retain_reference) if retain_reference is not None else None

    pool = _fill_pool(_Pool(tokenizer, fmt, max_length), roles)
    context = model_context(model, tokenizer)
    _length_guard(pool, roles, _places([name for name, _ in roles.values()], sources), context, max_length)
    with eval_autocast(model, mixed_precision):
        stats = score_fn(model, pool.features, tokenizer.pad_token_id, batch_size=batch_size)

    def get(role: str, i: int, kind: str, j: int = 0) -> TokenStats:
        return stats[pool.where[(role, i, kind, j)]]

    gens: dict[tuple[str, int], str] = {}
    if generate:
        gen_keys = [(role, i) for role in roles if role != "holdout" for i in range(len(roles[role][1]))]
        prompts = [pool.prompt(roles[role][1][i]["question"]) for role, i in gen_keys]
        max_new_tokens = _generation_budget(prompts, max_new_tokens, context)
        with eval_autocast(model, mixed_precision):
            texts = generate_fn(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=gen_batch)
        gens = dict(zip(gen_keys, texts))

    results: dict[str, Any] = {}
    for role, (_, records) in roles.items():
        if role == "holdout":
            continue
        results.update(_qa_metrics(role, records, get, gens if generate else None))
    _forget_quality(results, reference)
    _model_utility(results)
    if "forget" in roles:
        results.update(_memorisation(roles["forget"][1], get))
        if "holdout" in roles:
            results.update(_mia(roles["forget"][1], roles["holdout"][1], get, min_k))
            _privleak(results, reference)
    results["meta"] = {
        "prompt_format": fmt, "max_new_tokens": max_new_tokens, "min_k": min_k, "implementation": implementation,
        "batch_size": batch_size, "generation_batch_size": gen_batch, "mixed_precision": mixed_precision,
        "mixed_precision_requested": requested_precision, "mixed_precision_reason": precision_reason,
        "max_length": max_length,
        "splits": {role: {"name": name, "n": len(recs)} for role, (name, recs) in roles.items()},
        "retain_reference": str(retain_reference) if isinstance(retain_reference, str | os.PathLike)
        else ("dict" if reference is not None else None),
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
    }
    if out is not None:
        write_json_atomic(out, results)
    return results


def _qa_metrics(role: str, records: Sequence[Record], get, gens: dict | None) -> dict[str, Any]:
    prob, tr, rouge = {}, {}, {}
    for i, r in enumerate(records):
        key = str(i)
        ans = get(role, i, "answer")
        pert = [get(role, i, "pert", j) for j in range(len(r["perturbed_answer"]))]
        if role in ("forget", "retain"):
            prob[key] = {"prob": M.probability(ans), "avg_loss": ans.mean_nll}
            correct = get(role, i, "para")
        else:
            prob[key] = {"prob": M.normalised_probability(ans, pert), "p_correct": M.probability(ans)}
            correct = ans
        # In log space: an NLL gap beyond ±709 would overflow exp() or make min(TR, 1/TR) divide by zero.
        log_ratio = M.log_truth_ratio(correct, pert)
        ratio = M.saturating_exp(log_ratio)
        value = (M.truth_ratio_forget_stat_log(log_ratio) if role == "forget"
                 else M.truth_ratio_retain_stat(ratio))
        tr[key] = {"score": ratio, "stat": value, "p_true": M.probability(correct),
                   "p_false": M.saturating_exp(log_ratio - correct.mean_nll)}
        if gens is not None:
            g = gens[(role, i)]
            rouge[key] = {"rougeL_recall": M.rouge_l_recall(g, r["answer"]), "question": r["question"],
                          "ground_truth": r["answer"], "generation": g}
    out = {
        PROB_KEY[role]: _metric(prob, _mean([v["prob"] for v in prob.values()])),
        TR_KEY[role]: _metric(tr, _mean([v["stat"] for v in tr.values()])),
    }
    if gens is not None:
        out[ROUGE_KEY[role]] = _metric(rouge, _mean([v["rougeL_recall"] for v in rouge.values()]))
    return out


def _forget_quality(results: dict[str, Any], reference: dict[str, Any] | None) -> None:
    if TR_KEY["forget"] not in results:
        return
    if reference is None:
        results["forget_quality"] = _metric({}, None, note="no retain reference given (retain_reference=); "
                                            "forget quality is only defined against the retain model")
        return
    ours = {k: v["score"] for k, v in results[TR_KEY["forget"]]["value_by_index"].items()}
    theirs = reference_truth_ratios(reference)
    if set(ours) != set(theirs):
        raise ValueError(f"retain reference covers {len(theirs)} forget questions but the evaluated forget split "
                         f"has {len(ours)} (indices differ): evaluate both models on the same forget split")
    p, d = M.ks_forget_quality([ours[k] for k in sorted(ours, key=int)], [theirs[k] for k in sorted(theirs, key=int)])
    results["forget_quality"] = _metric({}, p, ks_statistic=d, n=len(ours))


def _model_utility(results: dict[str, Any]) -> None:
    present = [k for k in UTILITY_KEYS if k in results]
    if not present:
        return
    missing = [k for k in UTILITY_KEYS if k not in results]
    if missing:
        results["model_utility"] = _metric({}, None, note=f"needs all 9 utility numbers; missing {missing}")
        return
    values = [results[k]["agg_value"] for k in UTILITY_KEYS]
    results["model_utility"] = _metric({}, M.harmonic_mean(values), components=dict(zip(UTILITY_KEYS, values)))


def _memorisation(forget: Sequence[Record], get) -> dict[str, Any]:
    em = {str(i): {"score": M.exact_memorization(get("forget", i, "answer"))} for i in range(len(forget))}
    es = {str(i): {"score": M.extraction_strength(get("forget", i, "answer"))} for i in range(len(forget))}
    return {"exact_memorization": _metric(em, _mean([v["score"] for v in em.values()])),
            "extraction_strength": _metric(es, _mean([v["score"] for v in es.values()]))}


def _mia(forget: Sequence[Record], holdout: Sequence[Record], get, min_k: float) -> dict[str, Any]:
    out = {}
    for name, attack in M.MIA_ATTACKS.items():
        kw = {"k": min_k} if "min_k" in name else {}
        mem = {str(i): {"score": attack(get("forget", i, "answer"), r["answer"], **kw)} for i, r in enumerate(forget)}
        non = {str(i): {"score": attack(get("holdout", i, "answer"), r["answer"], **kw)} for i, r in enumerate(holdout)}
        value = M.auc([v["score"] for v in mem.values()], [v["score"] for v in non.values()])
        out[name] = _metric(mem, value, holdout_value_by_index=non)
    return out


def _privleak(results: dict[str, Any], reference: dict[str, Any] | None) -> None:
    ref_auc = reference_mia_auc(reference) if reference is not None else None
    if ref_auc is None:
        results["privleak"] = _metric({}, None, note="needs a retain reference with mia_min_k (evaluated with "
                                      "a holdout set)")
        return
    value = M.privleak(results["mia_min_k"]["agg_value"], ref_auc)
    extra = {"note": M.PRIVLEAK_UNDEFINED} if value != value else {}  # NaN: stored as null, with the reason
    results["privleak"] = _metric({}, None if extra else value, auc_model=results["mia_min_k"]["agg_value"],
                                  auc_retain=ref_auc, **extra)


def reference_stats(model, tokenizer, forget: Sequence[Record], holdout: Sequence[Record] | None = None, *,
                    out: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """A retain model's per-question statistics used as the reference of later evaluations: forget truth
    ratios (forget quality) and, with `holdout`, MIA AUCs (PrivLeak). No generation, so it is cheap;
    write it once with `out` and pass the file as ``retain_reference`` to every `evaluate`."""
    return evaluate(model, tokenizer, {"forget": forget}, holdout=holdout, generate=False, out=out, **kwargs)
