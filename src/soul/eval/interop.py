"""Results files of the field's other TOFU tools: read them as retain references, write soul's in their layout.

Forget quality needs the retain model's per-question forget truth ratios. A retain reference file may be:

* **soul** — a `soul eval` results JSON (or the reduced one of `soul.eval.reference_stats`);
* **open-unlearning** — its evaluation output ``TOFU_EVAL.json``: per-index ``forget_truth_ratio.value_by_index
  [i].score`` (and ``mia_min_k.agg_value`` for PrivLeak). soul writes the same names and quantity, so it is read
  as is;
* **TOFU** — the original repository's ``eval_log_forget.json`` (or ``eval_log_aggregated.json``, which holds it
  under ``"eval_log_forget.json"``): per-index ``avg_paraphrased_loss`` (mean NLL per token of the paraphrased
  answer) and ``average_perturb_loss`` (a list: the same for each perturbed answer), or the ``truth_ratio`` it
  derived from them.

The three agree on one per-question quantity, soul's ``score``:

    TR_i = p_false / p_true = exp(−mean_j L_pert[i][j]) / exp(−L_para[i]) = exp(L_para[i] − mean_j L_pert[i][j])

(open-unlearning: ``wrong_prob / correct_prob``; TOFU's eval log: ``truth_ratio = exp(gt_loss_per_token −
perturb_loss_per_token.mean(-1))``). TOFU's ``aggregate_eval_stat.py`` feeds the KS test the reciprocal,
exp(mean L_pert − L_para); the KS statistic and p-value do not change under a strictly monotone map of both
samples, so forget quality is the same either way. TOFU's logs carry no MIA, so no PrivLeak from them.

`write_open_unlearning` writes a soul results dict as open-unlearning's ``TOFU_EVAL.json`` (per metric
``agg_value`` and ``value_by_index`` with its per-index key names) and ``TOFU_SUMMARY.json`` (metric ->
``agg_value``), so the two tools' outputs compare file to file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OU_EVAL_NAME = "TOFU_EVAL.json"
OU_SUMMARY_NAME = "TOFU_SUMMARY.json"
TOFU_FORGET_LOG = "eval_log_forget.json"
TOFU_PARA_KEY = "avg_paraphrased_loss"
TOFU_PERT_KEY = "average_perturb_loss"
TOFU_TR_KEY = "truth_ratio"
TR_KEY = "forget_truth_ratio"


def reference_format(data: Mapping[str, Any]) -> str:
    """``"soul"``, ``"open-unlearning"`` or ``"tofu"`` for a parsed reference file; ``"unknown"`` otherwise."""
    entry = data.get(TR_KEY)
    if isinstance(entry, Mapping) and isinstance(entry.get("value_by_index"), Mapping):
        return "soul" if "meta" in data else "open-unlearning"
    log = data.get(TOFU_FORGET_LOG, data)
    if isinstance(log, Mapping) and ((TOFU_PARA_KEY in log and TOFU_PERT_KEY in log) or TOFU_TR_KEY in log):
        return "tofu"
    return "unknown"


def _by_index(values: Any, where: str, key: str) -> dict[str, Any]:
    """TOFU logs store per-index values as a dict keyed by index, or (older versions) as a list."""
    if isinstance(values, Mapping):
        return {str(k): v for k, v in values.items()}
    if isinstance(values, Sequence) and not isinstance(values, str):
        return {str(i): v for i, v in enumerate(values)}
    raise ValueError(f"{where}: {key!r} must map question index to values, got {type(values).__name__}")


def _number(value: Any, where: str, key: str, idx: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key}[{idx!r}] must be a finite number, got {value!r:.60}")
    return float(value)


def tofu_truth_ratios(log: Mapping[str, Any], where: str = "TOFU eval log") -> dict[str, float]:
    """Per-question TR = exp(L_para − mean_j L_pert[j]) from a TOFU ``eval_log_forget.json`` (module docstring);
    its stored ``truth_ratio`` when the losses are absent."""
    from soul.eval.metrics import saturating_exp  # imports torch (via soul.eval.scoring): only when needed

    if TOFU_PARA_KEY in log and TOFU_PERT_KEY in log:
        para = _by_index(log[TOFU_PARA_KEY], where, TOFU_PARA_KEY)
        pert = _by_index(log[TOFU_PERT_KEY], where, TOFU_PERT_KEY)
        if set(para) != set(pert):
            raise ValueError(f"{where}: {TOFU_PARA_KEY!r} and {TOFU_PERT_KEY!r} cover different question indices")
        out = {}
        for idx, losses in pert.items():
            if isinstance(losses, int | float):
                losses = [losses]
            if not isinstance(losses, Sequence) or isinstance(losses, str) or not losses:
                raise ValueError(f"{where}: {TOFU_PERT_KEY}[{idx!r}] must be a non-empty list of losses")
            mean_pert = sum(_number(x, where, TOFU_PERT_KEY, idx) for x in losses) / len(losses)
            # saturating: a loss gap beyond 709 nats would overflow exp() (soul.eval.metrics.saturating_exp)
            out[idx] = saturating_exp(_number(para[idx], where, TOFU_PARA_KEY, idx) - mean_pert)
        return out
    if TOFU_TR_KEY in log:
        return {idx: _number(v, where, TOFU_TR_KEY, idx)
                for idx, v in _by_index(log[TOFU_TR_KEY], where, TOFU_TR_KEY).items()}
    raise ValueError(f"{where}: no {TOFU_PARA_KEY!r} + {TOFU_PERT_KEY!r} and no {TOFU_TR_KEY!r}")


def normalise_reference(data: Any, where: str = "retain reference") -> dict[str, Any]:
    """A parsed retain-reference file of any supported format as a soul results dict (``forget_truth_ratio``
    per index ``score``; ``mia_min_k`` kept when present). Errors name `where` and the key that is missing."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    kind = reference_format(data)
    if kind in ("soul", "open-unlearning"):
        out = dict(data)
        entries = data[TR_KEY]["value_by_index"]
        out[TR_KEY] = {**data[TR_KEY], "value_by_index": {
            str(idx): {**v, "score": _number(v.get("score") if isinstance(v, Mapping) else v, where,
                                             f"{TR_KEY}.value_by_index", str(idx))}
            for idx, v in entries.items()}}
        out.setdefault("meta", {})
        out["meta"] = {**out["meta"], "reference_format": kind}
        return out
    if kind == "tofu":
        log = data.get(TOFU_FORGET_LOG, data)
        ratios = tofu_truth_ratios(log, where)
        return {TR_KEY: {"agg_value": None, "value_by_index": {k: {"score": v} for k, v in ratios.items()}},
                "meta": {"reference_format": "tofu"}}
    keys = ", ".join(sorted(map(str, data))[:12]) or "none"
    raise ValueError(
        f"{where}: not a retain reference: needs '{TR_KEY}.value_by_index' (a soul results file or "
        f"open-unlearning's {OU_EVAL_NAME}) or '{TOFU_PARA_KEY}' + '{TOFU_PERT_KEY}' / '{TOFU_TR_KEY}' (TOFU's "
        f"{TOFU_FORGET_LOG}); the file has: {keys}")


# ------------------------------------------------------------------------------------------------- writing
_MIA_PREFIX = "mia_"
_AGG_ONLY = ("forget_quality", "model_utility", "privleak")


def _rouge_entry(v: Mapping[str, Any], scorer) -> dict[str, Any]:
    gen, truth = str(v.get("generation", "")), str(v.get("ground_truth", ""))
    scores = scorer.score(truth, gen)
    return {"rouge1_recall": scores["rouge1"].recall, "rougeL_f1": scores["rougeL"].fmeasure,
            "rougeL_recall": v["rougeL_recall"], "input": v.get("question", ""), "ground_truth": truth,
            "generation": gen}


def _mia_side(values: Mapping[str, Any]) -> dict[str, Any]:
    # open-unlearning's attack scores are loss-like (higher = non-member); soul's are higher = member.
    scores = {str(k): {"score": -float(v["score"])} for k, v in values.items()}
    mean = sum(s["score"] for s in scores.values()) / len(scores) if scores else None
    return {"agg_value": mean, "value_by_index": scores}


def to_open_unlearning(results: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``TOFU_EVAL.json``, ``TOFU_SUMMARY.json``) contents for a soul results dict.

    Per metric: ``*_Q_A_Prob`` -> ``{"prob", "avg_loss"}`` (``_normalised``: ``{"prob"}``); ``*_Q_A_ROUGE`` ->
    ``{"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}``; truth ratios,
    ``exact_memorization``, ``extraction_strength`` -> ``{"score"}``; ``mia_*`` -> ``{"agg_value", "auc",
    "forget", "holdout"}`` with loss-like scores; ``forget_quality``, ``model_utility``, ``privleak`` ->
    ``{"agg_value"}``. soul's ``meta`` and other non-metric entries are left out.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    evals: dict[str, Any] = {}
    for name, entry in results.items():
        if not isinstance(entry, Mapping) or "agg_value" not in entry:
            continue
        agg = entry["agg_value"]
        values = entry.get("value_by_index") or {}
        if name in _AGG_ONLY:
            evals[name] = {"agg_value": agg}
        elif name.startswith(_MIA_PREFIX):
            evals[name] = {"agg_value": agg, "auc": agg, "forget": _mia_side(values),
                           "holdout": _mia_side(entry.get("holdout_value_by_index") or {})}
        elif name.endswith("_Q_A_ROUGE"):
            evals[name] = {"agg_value": agg, "value_by_index": {k: _rouge_entry(v, scorer) for k, v in values.items()}}
        elif name.endswith("_Q_A_Prob_normalised"):
            evals[name] = {"agg_value": agg, "value_by_index": {k: {"prob": v["prob"]} for k, v in values.items()}}
        elif name.endswith("_Q_A_Prob"):
            evals[name] = {"agg_value": agg, "value_by_index": {
                k: {"prob": v["prob"], "avg_loss": v["avg_loss"]} for k, v in values.items()}}
        elif values:
            evals[name] = {"agg_value": agg, "value_by_index": {k: {"score": v["score"]} for k, v in values.items()}}
        else:
            evals[name] = {"agg_value": agg}
    summary = {name: entry["agg_value"] for name, entry in evals.items()}
    return evals, summary


def write_open_unlearning(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` (each atomically) into `out_dir`; return their paths."""
    from soul.io import write_json_atomic

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--open-unlearning-dir {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    evals, summary = to_open_unlearning(results)
    write_json_atomic(out / OU_EVAL_NAME, evals)
    write_json_atomic(out / OU_SUMMARY_NAME, summary)
    return out / OU_EVAL_NAME, out / OU_SUMMARY_NAME
