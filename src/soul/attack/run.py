"""`run_attacks`: every configured attack on one unlearned model, with the target/retain references.

Configuration (the ``attacks:`` mapping of a preset, or built by ``soul attack``)::

    attacks:
      relearn: {steps: 10, lr: 1.0e-4, batch_size: 4, seed: 0, optimizer: adamw, heldout_fraction: 0.5,
                questions_per_author: 20, train_options: {}}
      quantize: {bits: [8, 4], group_size: 128, symmetric: false, include_embeddings: false}
      paraphrase: {}
      generate: true          # greedy answers for ROUGE-L (the costly part); false: probabilities only
      max_new_tokens: 24      # default: eval_kwargs' max_new_tokens
      max_questions: null     # cap on the questions each evaluation scores (first N)

An attack name mapped to null (or listed: ``attacks: [relearn, paraphrase]``) runs with its defaults
(`DEFAULTS`). The references' side of every attack does not depend on the unlearned model, so a grid
computes it once with `attack_references` and hands it to each `run_attacks` call (``reference_results=``).

Result layout (JSON-safe; ``soul attack`` writes it as is)::

    {"meta": {"tool": "soul attack", "model", "forget_split", "n_forget", "data_sha256", "config",
              "eval", "references": {"target", "retain"}, "wall_time_s"},
     "relearn": {"config", "split": {"relearn": [i...], "heldout": [i...], "by", "groups", "heldout_groups"},
                 "models": {"unlearned"|"target"|"retain": {"before": M, "after": M}},
                 "recovery": R, "baseline_recovery": R, "excess_recovery": R, "notes", "examples",
                 "wall_time_s"},
     "quantize": {"config", "by_bits": {"4": {"models": {"unlearned"|"target": {"before": M, "after": M}},
                                             "recovery": R, "target_shift": R, "quantized": {...}}},
                  "notes", "wall_time_s"},
     "paraphrase": {"n", "indices", "models": {"unlearned"|"target"|"retain": {"original": M,
                    "paraphrased": M}}, "recovery": R, "notes", "examples", "wall_time_s"}}

with M = ``{"prob", "rouge", "truth_ratio", "n"}`` (`soul.attack.metrics`) and R = ``{"prob", "rouge",
"truth_ratio"}`` recovery figures (None where undefined). ``baseline_recovery`` is the retain model's own
``(after − before) / (target − before)``; ``excess_recovery`` = recovery − baseline_recovery.
``target_shift`` = |m(quantized target) − m(target)| / |m(target) − m(unlearned)|: quantization noise in
units of the unlearning gap (small: a recovery is not noise).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from soul.attack.metrics import METRICS, RECOVERY_EPS, RECOVERY_REL_EPS, gap_too_small, recoveries

ATTACKS = ("relearn", "quantize", "paraphrase")
DEFAULTS: dict[str, dict[str, Any]] = {
    "relearn": {"steps": 10, "lr": 1e-4, "batch_size": 4, "seed": 0, "optimizer": "adamw", "heldout_fraction": 0.5,
                "questions_per_author": 20, "train_options": {}},
    "quantize": {"bits": [4], "group_size": 128, "symmetric": False, "include_embeddings": False},
    "paraphrase": {},
}
COMMON_KEYS = ("generate", "max_new_tokens", "max_questions")
TOOL = "soul attack"


def _positive_int(where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _positive_number(where: str, value: Any) -> float:
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def normalize_config(attacks_cfg: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """`attacks_cfg` with defaults filled in and every value checked; a ValueError names the bad key."""
    if attacks_cfg is None:
        raise ValueError("attacks: no attack configured; expected some of " + ", ".join(ATTACKS))
    if isinstance(attacks_cfg, str) or not isinstance(attacks_cfg, Mapping | Sequence):
        raise ValueError(f"attacks: expected a mapping of attack name to options (or a list of names), "
                         f"got {type(attacks_cfg).__name__}")
    raw = dict(attacks_cfg) if isinstance(attacks_cfg, Mapping) else {str(n): None for n in attacks_cfg}
    unknown = sorted(set(raw) - set(ATTACKS) - set(COMMON_KEYS))
    if unknown:
        raise ValueError(f"attacks: unknown key(s) {unknown}; expected attacks {list(ATTACKS)} and options "
                         f"{list(COMMON_KEYS)}")
    out: dict[str, Any] = {}
    for name in ATTACKS:
        if name not in raw or raw[name] is False:
            continue
        given = raw[name] if isinstance(raw[name], Mapping) else {}
        if raw[name] not in (None, True) and not isinstance(raw[name], Mapping):
            raise ValueError(f"attacks.{name}: expected a mapping of options or null, got {raw[name]!r}")
        bad = sorted(set(given) - set(DEFAULTS[name]))
        if bad:
            raise ValueError(f"attacks.{name}: unknown option(s) {bad}; known: {sorted(DEFAULTS[name])}")
        cfg = {**copy.deepcopy(DEFAULTS[name]), **given}
        where = f"attacks.{name}"
        if name == "relearn":
            for key in ("steps", "batch_size", "questions_per_author"):
                cfg[key] = _positive_int(f"{where}.{key}", cfg[key])
            cfg["lr"] = _positive_number(f"{where}.lr", cfg["lr"])
            if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
                raise ValueError(f"{where}.seed must be an integer, got {cfg['seed']!r}")
            frac = cfg["heldout_fraction"]
            if not isinstance(frac, int | float) or isinstance(frac, bool) or not 0 < frac < 1:
                raise ValueError(f"{where}.heldout_fraction must be a number in (0, 1), got {frac!r}")
            if not isinstance(cfg["train_options"], Mapping):
                raise ValueError(f"{where}.train_options must be a mapping of training options")
            from soul.train.config import CONFIG_FIELDS

            options = {str(k).replace("-", "_") for k in cfg["train_options"]}
            taken = sorted(options & {"max_steps", "lr", "batch_size", "seed", "optimizer", "prompt_format", "split"})
            if taken:
                raise ValueError(f"{where}.train_options: {taken} are set by the attack's own options; set them there")
            if options - CONFIG_FIELDS:
                raise ValueError(f"{where}.train_options: unknown training option(s) {sorted(options - CONFIG_FIELDS)}")
            from soul.optim.factory import OPTIMIZERS, optimizer_options

            try:  # the factory knows its names (aliases, "LIBRARY:Class" where supported)
                optimizer_options(str(cfg["optimizer"]))
            except KeyError:
                raise ValueError(f"{where}.optimizer must be one of {sorted(OPTIMIZERS)}, "
                                 f"got {cfg['optimizer']!r}") from None
            except ValueError as err:
                raise ValueError(f"{where}.optimizer: {err}") from None
        if name == "quantize":
            from soul.attack.quantization import MAX_BITS, MIN_BITS

            bits = cfg["bits"] if isinstance(cfg["bits"], list | tuple) else [cfg["bits"]]
            if not bits:
                raise ValueError(f"{where}.bits: give at least one bit width")
            for b in bits:
                if not isinstance(b, int) or isinstance(b, bool) or not MIN_BITS <= b <= MAX_BITS:
                    raise ValueError(f"{where}.bits must be integers in {MIN_BITS}..{MAX_BITS}, got {b!r}")
            cfg["bits"] = list(dict.fromkeys(bits))
            cfg["group_size"] = _positive_int(f"{where}.group_size", cfg["group_size"])
            for key in ("symmetric", "include_embeddings"):
                if not isinstance(cfg[key], bool):
                    raise ValueError(f"{where}.{key} must be true or false, got {cfg[key]!r}")
        out[name] = cfg
    if not out:
        raise ValueError("attacks: no attack enabled; expected some of " + ", ".join(ATTACKS))
    generate = raw.get("generate", True)
    if not isinstance(generate, bool):
        raise ValueError(f"attacks.generate must be true or false, got {generate!r}")
    out["generate"] = generate
    out["max_new_tokens"] = (None if raw.get("max_new_tokens") is None
                             else _positive_int("attacks.max_new_tokens", raw["max_new_tokens"]))
    out["max_questions"] = (None if raw.get("max_questions") is None
                            else _positive_int("attacks.max_questions", raw["max_questions"]))
    return out


def eval_options(cfg: dict[str, Any], eval_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """`soul.attack.metrics.forget_metrics` keyword arguments from the evaluation settings and `cfg`."""
    ev = dict(eval_kwargs or {})
    unknown = sorted(set(ev) - {"batch_size", "generation_batch_size", "max_new_tokens", "min_k", "prompt_format",
                                "implementation", "mixed_precision"})
    if unknown:
        raise ValueError(f"eval_kwargs: unknown option(s) {unknown}")
    return {"generate": cfg["generate"], "max_new_tokens": cfg["max_new_tokens"] or ev.get("max_new_tokens", 200),
            "batch_size": ev.get("batch_size", 16), "generation_batch_size": ev.get("generation_batch_size"),
            "prompt_format": ev.get("prompt_format", "auto"), "implementation": ev.get("implementation", "batched"),
            "mixed_precision": ev.get("mixed_precision", "no")}


def forget_records(data: Mapping[str, Sequence[dict]] | str | os.PathLike, forget_split: str) -> list[dict]:
    """The forget split's records from a dict of split name → records or a `soul.data.load_split` source."""
    if isinstance(data, Mapping):
        if forget_split not in data:
            raise ValueError(f"data has no split {forget_split!r}; it has {sorted(data)}")
        records = list(data[forget_split])
    else:
        from soul.data import load_split

        records = load_split(str(data), forget_split)
    from soul.attack.metrics import check_records

    check_records(records, f"split {forget_split!r}")
    return records


def _cap(records: list[dict], cap: int | None) -> list[dict]:
    return records[:cap] if cap else records


class _Plan:
    """What every model of one attack run is evaluated on (a function of the config and the data only)."""

    def __init__(self, cfg: dict[str, Any], forget: list[dict], eval_opts: dict[str, Any], forget_split: str) -> None:
        from soul.attack.paraphrasing import paraphrased_records
        from soul.attack.relearning import split_relearn

        self.cfg, self.forget, self.eval_opts = cfg, forget, eval_opts
        self.split = None
        if "relearn" in cfg:
            rc = cfg["relearn"]
            self.split = split_relearn(forget, heldout_fraction=rc["heldout_fraction"], seed=rc["seed"],
                                       questions_per_author=rc["questions_per_author"])
            self.relearn_records = [forget[i] for i in self.split.relearn]
            self.heldout_indices = self.split.heldout[:cfg["max_questions"] or None]
            self.heldout_records = [forget[i] for i in self.heldout_indices]
        if "paraphrase" in cfg:
            records, indices = paraphrased_records(forget, f"split {forget_split!r}")
            self.para_records = _cap(records, cfg["max_questions"])
            self.para_indices = indices[:len(self.para_records)]
        self.forget_eval = _cap(forget, cfg["max_questions"])  # the quantization attack's questions
        self.key = hashlib.sha256(json.dumps({"cfg": cfg, "eval": eval_opts, "forget": forget},
                                             sort_keys=True, default=str).encode()).hexdigest()[:20]


def check_inputs(attacks_cfg, data, forget_split: str = "forget10") -> dict[str, Any]:
    """Check the configuration and the forget split for the configured attacks (two authors for relearning,
    paraphrased questions for the probe) before any model is loaded; returns the normalised configuration."""
    cfg = normalize_config(attacks_cfg)
    _Plan(cfg, forget_records(data, forget_split), eval_options(cfg, None), forget_split)
    return cfg


def _subset(base: dict[str, Any], indices: Sequence[int]) -> dict[str, Any] | None:
    """`base` (metrics of the capped forget set) restricted to `indices`, or None when one lies outside it."""
    from soul.attack.metrics import aggregate

    rows = base["per_question"]
    if any(i >= len(rows) for i in indices):
        return None
    picked = [rows[i] for i in indices]
    return {**aggregate(picked), "per_question": picked}


def _attack_model(model, tokenizer, plan: _Plan, role: str) -> dict[str, Any]:
    """Every configured attack's numbers for one model (`role` "unlearned", "target" or "retain").

    The model's metrics on the forget set (original questions) are computed once and serve as the "before"
    of every attack whose questions they cover.
    """
    from soul.attack.metrics import forget_metrics, summary
    from soul.attack.paraphrasing import paraphrase_original_and_reworded
    from soul.attack.quantization import quantized_copy
    from soul.attack.relearning import relearn_before_after

    out: dict[str, Any] = {}
    cfg, opts = plan.cfg, plan.eval_opts
    base = forget_metrics(model, tokenizer, plan.forget_eval, **opts)
    if "relearn" in cfg:
        started = time.time()
        out["relearn"] = relearn_before_after(model, tokenizer, plan.relearn_records, plan.heldout_records,
                                              cfg=cfg["relearn"], eval_opts=opts,
                                              before=_subset(base, plan.heldout_indices))
        out["relearn"]["wall_time_s"] = time.time() - started
    if "quantize" in cfg and role in ("unlearned", "target"):
        started = time.time()
        qc = cfg["quantize"]
        before = summary(base)
        by_bits = {}
        for bits in qc["bits"]:
            quantized, info = quantized_copy(model, bits, qc["group_size"], symmetric=qc["symmetric"],
                                             include_embeddings=qc["include_embeddings"])
            by_bits[str(bits)] = {"before": before, "after": summary(forget_metrics(quantized, tokenizer,
                                                                                    plan.forget_eval, **opts)),
                                  "quantized": info}
            del quantized
        out["quantize"] = {"by_bits": by_bits, "wall_time_s": time.time() - started}
    if "paraphrase" in cfg:
        started = time.time()
        out["paraphrase"] = paraphrase_original_and_reworded(model, tokenizer, plan.para_records, eval_opts=opts,
                                                             original=_subset(base, plan.para_indices))
        out["paraphrase"]["wall_time_s"] = time.time() - started
    return out


def _load(spec: Any, tokenizer, what: str):
    """(model, tokenizer) from a path/name, a loaded model (with `tokenizer`) or a (model, tokenizer) pair."""
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec
    if isinstance(spec, str | os.PathLike):
        from soul.models import load_model

        return load_model(str(spec))
    if hasattr(spec, "forward"):
        if tokenizer is None:
            raise ValueError(f"{what}: a loaded model needs a tokenizer")
        return spec, tokenizer
    raise ValueError(f"{what}: expected a model path, a loaded model or a (model, tokenizer) pair, got "
                     f"{type(spec).__name__}")


def _describe(spec: Any) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, str | os.PathLike):
        return str(spec)
    model = spec[0] if isinstance(spec, tuple) else spec
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def attack_references(references: Mapping[str, Any] | None, tokenizer=None, *, attacks_cfg, data,
                      forget_split: str = "forget10", eval_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The target's and the retain model's side of every configured attack, computed once for a whole grid.

    `references` maps ``"target"`` and/or ``"retain"`` to a model path, a loaded model (sharing
    `tokenizer`) or a ``(model, tokenizer)`` pair. Pass the result to each `run_attacks` call.
    """
    cfg = normalize_config(attacks_cfg)
    forget = forget_records(data, forget_split)
    plan = _Plan(cfg, forget, eval_options(cfg, eval_kwargs), forget_split)
    refs = dict(references or {})
    unknown = sorted(set(refs) - {"target", "retain"})
    if unknown:
        raise ValueError(f"references: unknown role(s) {unknown}; expected 'target' and/or 'retain'")
    out: dict[str, Any] = {"key": plan.key, "describe": {r: _describe(refs.get(r)) for r in ("target", "retain")}}
    for role in ("target", "retain"):
        if refs.get(role) is None:
            out[role] = None
            continue
        model, tok = _load(refs[role], tokenizer, f"references.{role}")
        out[role] = _attack_model(model, tok, plan, role)
        del model
    return out


def run_attacks(model, tokenizer=None, *, attacks_cfg, data, forget_split: str = "forget10",
                eval_kwargs: Mapping[str, Any] | None = None, references: Mapping[str, Any] | None = None,
                reference_results: dict[str, Any] | None = None,
                out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the configured attacks on one unlearned `model` (a path/name, or a loaded model with `tokenizer`).

    `data` is a dict of split name → records holding `forget_split` (e.g. the pipeline's data) or a
    `soul.data.load_split` source; `eval_kwargs` the evaluation settings (``batch_size``,
    ``generation_batch_size``, ``max_new_tokens``, ``prompt_format``; ``min_k`` is accepted and unused).
    The target/retain side comes from `reference_results` (`attack_references`' output for the same config
    and data) or, when that is None, is computed here from `references`. Returns the layout in the module
    doc (and, with `out`, writes it there atomically as strict JSON); the model passed in is never modified.
    """
    started = time.time()
    cfg = normalize_config(attacks_cfg)
    forget = forget_records(data, forget_split)
    plan = _Plan(cfg, forget, eval_options(cfg, eval_kwargs), forget_split)
    if reference_results is None:
        reference_results = (attack_references(references, tokenizer, attacks_cfg=cfg, data={forget_split: forget},
                                               forget_split=forget_split, eval_kwargs=eval_kwargs)
                             if references else {"key": plan.key, "target": None, "retain": None, "describe": {}})
    elif reference_results.get("key") != plan.key:
        raise ValueError("reference_results were computed for another attack configuration, forget set or "
                         "evaluation settings; compute them with attack_references(...) for these")
    from soul.train.api import resolve_model

    model, tokenizer, source = resolve_model(model, tokenizer)
    mine = _attack_model(model, tokenizer, plan, "unlearned")
    target, retain = reference_results.get("target") or {}, reference_results.get("retain") or {}
    from soul._version import __version__

    result: dict[str, Any] = {"meta": {
        "tool": TOOL, "version": __version__, "model": source, "forget_split": forget_split, "n_forget": len(forget),
        "data_sha256": hashlib.sha256(json.dumps(forget, sort_keys=True).encode()).hexdigest(),
        "config": cfg, "eval": plan.eval_opts, "recovery_eps": RECOVERY_EPS,
        "recovery_rel_eps": RECOVERY_REL_EPS,
        "references": reference_results.get("describe") or {"target": None, "retain": None}}}
    if "relearn" in mine:
        result["relearn"] = _relearn_result(plan, mine["relearn"], target.get("relearn"), retain.get("relearn"))
    if "quantize" in mine:
        result["quantize"] = _quantize_result(plan, mine["quantize"], target.get("quantize"))
    if "paraphrase" in mine:
        result["paraphrase"] = _paraphrase_result(plan, mine["paraphrase"], target.get("paraphrase"),
                                                  retain.get("paraphrase"))
    result["meta"]["wall_time_s"] = time.time() - started
    if out is not None:
        from soul.io import write_json_atomic

        write_json_atomic(out, result)
    return result


def _relearn_result(plan: _Plan, mine: dict, target: dict | None, retain: dict | None) -> dict[str, Any]:
    notes: list[str] = []
    t_before = target["before"] if target else None
    rec = recoveries(mine["after"], mine["before"], t_before, notes, "relearn")
    base = (recoveries(retain["after"], retain["before"], t_before, notes, "relearn (retain baseline)")
            if retain else {m: None for m in METRICS})
    if retain is None:
        notes.append("relearn: no retain reference, so no baseline (learning from scratch) to compare with")
    excess = {m: None if rec[m] is None or base[m] is None else rec[m] - base[m] for m in METRICS}
    models = {"unlearned": {k: mine[k] for k in ("before", "after")}}
    for role, ref in (("target", target), ("retain", retain)):
        if ref is not None:
            models[role] = {k: ref[k] for k in ("before", "after")}
    return {"config": plan.cfg["relearn"], "split": {**plan.split.to_dict(),
                                                      "heldout_evaluated": len(plan.heldout_records)},
            "models": models, "recovery": rec, "baseline_recovery": base, "excess_recovery": excess,
            "notes": notes, "examples": mine["examples"], "wall_time_s": mine["wall_time_s"]}


def _quantize_result(plan: _Plan, mine: dict, target: dict | None) -> dict[str, Any]:
    notes: list[str] = []
    by_bits = {}
    for bits, run in mine["by_bits"].items():
        ref = target["by_bits"][bits] if target else None
        rec = recoveries(run["after"], run["before"], ref["before"] if ref else None, notes, f"quantize {bits}-bit")
        shift = {}
        for m in METRICS:
            if ref is None or None in (ref["after"].get(m), ref["before"].get(m), run["before"].get(m)):
                shift[m] = None
                continue
            gap = abs(ref["before"][m] - run["before"][m])
            shift[m] = (None if gap_too_small(run["before"][m], ref["before"][m])
                        else abs(ref["after"][m] - ref["before"][m]) / gap)
        models = {"unlearned": {"before": run["before"], "after": run["after"]}}
        if ref is not None:
            models["target"] = {"before": ref["before"], "after": ref["after"]}
        by_bits[bits] = {"models": models, "recovery": rec, "target_shift": shift, "quantized": run["quantized"]}
    return {"config": plan.cfg["quantize"], "n": len(plan.forget_eval), "by_bits": by_bits, "notes": notes,
            "wall_time_s": mine["wall_time_s"]}


def _paraphrase_result(plan: _Plan, mine: dict, target: dict | None, retain: dict | None) -> dict[str, Any]:
    notes: list[str] = []
    rec = recoveries(mine["paraphrased"], mine["original"], target["paraphrased"] if target else None, notes,
                     "paraphrase")
    models = {"unlearned": {k: mine[k] for k in ("original", "paraphrased")}}
    for role, ref in (("target", target), ("retain", retain)):
        if ref is not None:
            models[role] = {k: ref[k] for k in ("original", "paraphrased")}
    return {"n": len(plan.para_records), "indices": plan.para_indices, "models": models, "recovery": rec,
            "notes": notes, "examples": mine["examples"], "wall_time_s": mine["wall_time_s"]}
