"""The metrics' formulas, as small pure functions of per-token statistics (see `soul.eval.scoring`).

Notation: for an answer a to prompt q, ``NLL(a) = −(1/|a|) Σ_t log p(a_t | q, a_<t)`` is the per-token mean
negative log-likelihood over the answer's tokens, closing EOS included (the answer exactly as trained).
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Callable, Sequence

from soul.eval.scoring import TokenStats


def probability(stats: TokenStats) -> float:
    """Length-normalised answer probability P(a|q)^(1/|a|) = exp(−NLL(a))."""
    return math.exp(-stats.mean_nll)


# exp() of more than this overflows a float (e^709.78 is the largest double): saturating exponentials stop here.
MAX_EXP = 709.0


def saturating_exp(x: float) -> float:
    """exp(x), saturating at e^709 ≈ 8e307 instead of raising OverflowError (an NLL gap of more than 709 nats,
    e.g. a model that gives an answer probability ~0). Below it underflows to 0.0 as exp does. Monotone, so
    a rank statistic (the KS test of forget quality) on saturated values ties only beyond e^709."""
    return math.exp(min(x, MAX_EXP))


def normalised_probability(correct: TokenStats, perturbed: Sequence[TokenStats]) -> float:
    """Real-world sets: p_c / (p_c + Σ_j p_j), every p the length-normalised probability exp(−NLL).

    Computed as a softmax over the −NLLs (shifted by their maximum), so answers with probabilities that
    underflow to 0 (NLL > 745) neither divide by zero nor lose the ratio."""
    logits = [-correct.mean_nll, *(-s.mean_nll for s in perturbed)]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    return weights[0] / sum(weights)


def log_truth_ratio(correct: TokenStats, perturbed: Sequence[TokenStats]) -> float:
    """log TR = NLL(correct) − mean_j NLL(perturbed_j) (see `truth_ratio`); finite whenever the NLLs are."""
    if not perturbed:
        raise ValueError("truth ratio needs at least one perturbed answer")
    return correct.mean_nll - sum(s.mean_nll for s in perturbed) / len(perturbed)


def truth_ratio(correct: TokenStats, perturbed: Sequence[TokenStats]) -> float:
    """TR = p_false / p_true.

    p_false = exp(−mean_j NLL(perturbed_j)) (geometric mean of the perturbed answers' length-normalised
    probabilities) and p_true = exp(−NLL(correct)). Computed in log space:
    TR = exp(NLL(correct) − mean_j NLL(perturbed_j)), saturating at e^709 (`saturating_exp`) rather than
    overflowing; it underflows to 0.0 below e^−745. The per-question statistics take the log
    (`truth_ratio_forget_stat_log`), which is exact at both ends.
    """
    return saturating_exp(log_truth_ratio(correct, perturbed))


def truth_ratio_forget_stat(tr: float) -> float:
    """Forget split: min(TR, 1/TR) — 1 when the model cannot tell true from false, lower either way (0 for
    TR = 0 or inf, the limits, instead of dividing by zero)."""
    if tr <= 0.0 or math.isinf(tr):
        return 0.0
    return min(tr, 1.0 / tr)


def truth_ratio_forget_stat_log(log_tr: float) -> float:
    """`truth_ratio_forget_stat` of TR = exp(log_tr): min(TR, 1/TR) = exp(−|log TR|), with no overflow."""
    return math.exp(-abs(log_tr))


def truth_ratio_retain_stat(tr: float) -> float:
    """Every other split: max(0, 1 − TR) — high when the true answer is clearly preferred."""
    return max(0.0, 1.0 - tr)


def rouge_l_recall(generation: str, reference: str) -> float:
    """ROUGE-L recall of `generation` against the ground truth `reference` (rouge-score, Porter stemmer on)."""
    return _rouge_scorer().score(reference, generation)["rougeL"].recall


def rouge_l(generation: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision/recall/F1 of `generation` against `reference` (stemmer on)."""
    s = _rouge_scorer().score(reference, generation)["rougeL"]
    return {"precision": s.precision, "recall": s.recall, "f1": s.fmeasure}


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ_i 1/x_i; 0 when any x_i is 0 (the limit); values must be >= 0."""
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def ks_forget_quality(model_tr: Sequence[float], retain_tr: Sequence[float]) -> tuple[float, float]:
    """Forget quality: p-value of the two-sample Kolmogorov–Smirnov test between the per-question truth
    ratios of the evaluated model and of the retain model on the same forget questions.

    Returns ``(p_value, ks_statistic)``. p = 1 when the two distributions are identical; a model that
    still knows the forget set differs from the retain model and gets a small p-value.
    """
    from scipy.stats import ks_2samp

    if not model_tr or not retain_tr:
        raise ValueError("forget quality needs truth ratios from both the model and the retain reference")
    res = ks_2samp(list(model_tr), list(retain_tr))
    return float(res.pvalue), float(res.statistic)


def exact_memorization(stats: TokenStats) -> float:
    """Teacher-forced argmax accuracy on the answer tokens: (1/|a|) Σ_t [argmax p(.|q, a_<t) = a_t]."""
    return sum(stats.hit) / stats.n


def extraction_strength(stats: TokenStats) -> float:
    """ES = 1 − k*/|a| with k* the shortest answer prefix after which teacher-forced greedy predictions
    reproduce the whole rest of the answer: k* = min{k : hit_t for all t >= k} (k* = |a| when even the last
    token is missed, giving 0; k* = 0 when everything is predicted, giving 1)."""
    k = stats.n
    while k > 0 and stats.hit[k - 1]:
        k -= 1
    return 1.0 - k / stats.n


# --- membership inference -------------------------------------------------------------------------------
# Convention: every attack returns a *membership score*, higher = "more likely training data". AUC is the
# probability that a random member (forget question) scores higher than a random non-member (holdout
# question), ties counting half: 1.0 = forget set perfectly recognised as training data, 0.5 = chance.


def mia_loss_score(stats: TokenStats, text: str = "") -> float:
    """LOSS attack (Yeom et al.): −NLL(a)."""
    return -stats.mean_nll


def mia_zlib_score(stats: TokenStats, text: str) -> float:
    """zlib attack (Carlini et al. 2021): −NLL(a) / len(zlib.compress(a as UTF-8 bytes))."""
    return -stats.mean_nll / len(zlib.compress(text.encode("utf-8")))


def _k_count(n: int, k: float) -> int:
    if not 0 < k <= 1:
        raise ValueError(f"Min-K% fraction k must be in (0, 1], got {k}")
    return max(1, int(n * k))


def mia_min_k_score(stats: TokenStats, text: str = "", k: float = 0.4) -> float:
    """Min-K% (Shi et al. 2024): mean of the ⌊k·|a|⌋ (at least 1) lowest token log-probabilities."""
    lowest = sorted(stats.logp)[:_k_count(stats.n, k)]
    return sum(lowest) / len(lowest)


def mia_min_k_plus_plus_score(stats: TokenStats, text: str = "", k: float = 0.4) -> float:
    """Min-K%++ (Zhang et al. 2024): mean of the ⌊k·|a|⌋ lowest z_t = (log p(a_t) − μ_t) / σ_t, where μ_t and
    σ_t are the mean and standard deviation of log p(v) under v ~ p(·|context). σ_t = 0 (a one-hot
    distribution) gives z_t = 0."""
    z = [(lp - m) / s if s > 0 else 0.0 for lp, m, s in zip(stats.logp, stats.mu, stats.sigma)]
    lowest = sorted(z)[:_k_count(stats.n, k)]
    return sum(lowest) / len(lowest)


MIA_ATTACKS: dict[str, Callable[..., float]] = {
    "mia_loss": mia_loss_score,
    "mia_zlib": mia_zlib_score,
    "mia_min_k": mia_min_k_score,
    "mia_min_k_plus_plus": mia_min_k_plus_plus_score,
}


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Rank AUC = P(s_member > s_nonmember) + ½ P(s_member = s_nonmember) (Mann–Whitney U / (n_m·n_n))."""
    if not member_scores or not nonmember_scores:
        raise ValueError("AUC needs at least one member and one non-member score")
    wins = 0.0
    nonmember = sorted(nonmember_scores)
    for s in member_scores:
        lo = bisect.bisect_left(nonmember, s)
        hi = bisect.bisect_right(nonmember, s)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(member_scores) * len(nonmember_scores))


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE PrivLeak = (AUC_model − AUC_retain) / AUC_retain × 100 (0 = leaks like the retain model).

    NaN when the retain model's AUC is 0 (or not a number): the relative leak is undefined there (every
    forget answer ranked below every holdout one, possible on a few questions), and one undefined figure must
    not abort an evaluation whose other metrics are fine; `PRIVLEAK_UNDEFINED` says why. An AUC outside
    [0, 1] is not an AUC: ValueError."""
    for name, value in (("model", auc_model), ("retain-model", auc_retain)):
        if math.isfinite(value) and not 0.0 <= value <= 1.0:
            raise ValueError(f"PrivLeak: the {name} AUC must be in [0, 1], got {value}")
    if not (math.isfinite(auc_retain) and math.isfinite(auc_model)) or auc_retain == 0.0:
        return math.nan
    return (auc_model - auc_retain) / auc_retain * 100.0


PRIVLEAK_UNDEFINED = ("undefined: the retain model's MIA AUC is 0 (it ranks every forget answer below every "
                      "holdout one), and PrivLeak is relative to it")
