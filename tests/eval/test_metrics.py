"""Each formula against values computed by hand."""

from __future__ import annotations

import math
import zlib

import pytest

from soul.eval import metrics as M
from soul.eval.scoring import TokenStats


def ts(probs, hits=None, mu=None, sigma=None) -> TokenStats:
    n = len(probs)
    return TokenStats([math.log(p) for p in probs], hits or [False] * n, mu or [0.0] * n, sigma or [1.0] * n)


def test_probability_is_geometric_mean_token_probability():
    # exp(mean(log .5, log .25)) = sqrt(.125)
    assert M.probability(ts([0.5, 0.25])) == pytest.approx(math.sqrt(0.125))


def test_normalised_probability():
    # p_c = .5 ; p_j = .25 and sqrt(.25*.25)=.25 -> .5 / (.5 + .25 + .25) = .5
    assert M.normalised_probability(ts([0.5]), [ts([0.25]), ts([0.25, 0.25])]) == pytest.approx(0.5)
    # p_c = .2 ; p_j = .2, .6 -> .2 / 1.0
    assert M.normalised_probability(ts([0.2]), [ts([0.2]), ts([0.6])]) == pytest.approx(0.2)


def test_truth_ratio_and_conventions():
    # p_true = .5 ; perturbed NLLs ln 4 and ln 16 -> mean ln 8 -> p_false = 1/8 -> TR = .25
    tr = M.truth_ratio(ts([0.5]), [ts([0.25]), ts([1 / 16])])
    assert tr == pytest.approx(0.25)
    assert M.truth_ratio_forget_stat(tr) == pytest.approx(0.25)          # min(.25, 4)
    assert M.truth_ratio_retain_stat(tr) == pytest.approx(0.75)          # max(0, 1 - .25)
    # the false answers more likely than the true one: TR = 4
    tr = M.truth_ratio(ts([0.125]), [ts([0.5])])
    assert tr == pytest.approx(4.0)
    assert M.truth_ratio_forget_stat(tr) == pytest.approx(0.25)          # min(4, 1/4)
    assert M.truth_ratio_retain_stat(tr) == 0.0                          # max(0, 1 - 4)
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratio(ts([0.5]), [])


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)   # 3 / (1 + 2 + 4)
    assert M.harmonic_mean([0.3] * 9) == pytest.approx(0.3)
    assert M.harmonic_mean([0.9, 0.0, 0.5]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([0.5, -0.1])


def test_rouge_l_recall():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of the reference's 6 tokens
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l_recall("cats running", "cat run") == pytest.approx(1.0)  # stemmer on
    assert M.rouge_l_recall("", "anything") == 0.0
    r = M.rouge_l("a b x", "a b c d")  # LCS 2: P = 2/3, R = 2/4
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_exact_memorization_and_extraction_strength():
    s = ts([0.5] * 4, hits=[True, False, True, True])
    assert M.exact_memorization(s) == 0.75
    assert M.extraction_strength(s) == pytest.approx(0.5)      # k* = 2: suffix from token 2 is all hits
    assert M.extraction_strength(ts([0.5] * 3, hits=[True] * 3)) == 1.0
    assert M.extraction_strength(ts([0.5] * 3, hits=[True, True, False])) == 0.0


def test_mia_scores():
    s = ts([math.exp(x) for x in [-1.0, -5.0, -2.0, -3.0, -4.0]])
    assert M.mia_loss_score(s) == pytest.approx(-3.0)
    text = "Some answer text"
    assert M.mia_zlib_score(s, text) == pytest.approx(-3.0 / len(zlib.compress(text.encode())))
    assert M.mia_min_k_score(s, k=0.4) == pytest.approx(-4.5)     # int(5*.4) = 2 lowest: -5, -4
    assert M.mia_min_k_score(s, k=0.1) == pytest.approx(-5.0)     # at least one token
    # z = (logp - mu) / sigma with mu = -2, sigma = 2 -> [.5, -1.5, 0, -.5, -1]; 2 lowest: -1.5, -1
    s2 = TokenStats(s.logp, [False] * 5, [-2.0] * 5, [2.0] * 5)
    assert M.mia_min_k_plus_plus_score(s2, k=0.4) == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="k"):
        M.mia_min_k_score(s, k=0.0)


def test_auc_hand_and_sklearn():
    # pairs (3,1) (3,2) (2,1) win, (2,2) tie -> 3.5 / 4
    assert M.auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert M.auc([5, 6], [1, 2]) == 1.0 and M.auc([1, 2], [5, 6]) == 0.0
    import random

    from sklearn.metrics import roc_auc_score

    rng = random.Random(0)
    mem = [rng.gauss(0.3, 1) for _ in range(37)]
    non = [rng.gauss(0, 1) for _ in range(41)] + [mem[0]]
    expected = roc_auc_score([1] * len(mem) + [0] * len(non), mem + non)
    assert M.auc(mem, non) == pytest.approx(expected)


def test_privleak_and_ks():
    assert M.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert M.privleak(0.5, 0.5) == 0.0
    p, d = M.ks_forget_quality([0.1, 0.5, 0.9, 1.3], [0.1, 0.5, 0.9, 1.3])
    assert p == pytest.approx(1.0) and d == 0.0
    p, d = M.ks_forget_quality([0.01 * i for i in range(30)], [10 + 0.01 * i for i in range(30)])
    assert d == 1.0 and p < 1e-10


# --- edge values (issue 20, item 21): none may abort an evaluation or explode ------------------------------
def nll(value: float, n: int = 2) -> TokenStats:
    """An answer of `n` tokens whose per-token mean NLL is `value` (beyond what exp() can represent)."""
    return TokenStats([-value] * n, [False] * n, [0.0] * n, [1.0] * n)


def test_privleak_at_a_retain_auc_of_zero_is_nan_not_an_abort():
    assert math.isnan(M.privleak(0.5, 0.0))
    with pytest.raises(ValueError, match="AUC must be in"):
        M.privleak(0.5, 1.5)


def test_truth_ratio_in_log_space_survives_huge_nll_gaps():
    # the correct answer 800 nats per token less likely than the perturbed ones: exp(800) overflows
    tr = M.truth_ratio(nll(800.0), [nll(0.0)])
    assert math.isfinite(tr) and tr > 1e300
    assert M.log_truth_ratio(nll(800.0), [nll(0.0)]) == pytest.approx(800.0)
    assert M.truth_ratio_forget_stat_log(800.0) == 0.0 and M.truth_ratio_retain_stat(tr) == 0.0
    # the other way: TR underflows to 0, and min(TR, 1/TR) divided by zero
    tr = M.truth_ratio(nll(0.0), [nll(800.0)])
    assert tr == 0.0
    assert M.truth_ratio_forget_stat(tr) == 0.0 and M.truth_ratio_forget_stat(math.inf) == 0.0
    assert M.truth_ratio_retain_stat(tr) == 1.0


def test_normalised_probability_when_every_probability_underflows():
    # p_c = e^-800, p_j = e^-801: each underflows to 0, their ratio is 1 / (1 + e^-1)
    assert M.normalised_probability(nll(800.0), [nll(801.0)]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_tofu_metrics_with_extreme_nlls_and_a_zero_retain_auc():
    """`soul.eval.tofu`'s assembly on statistics no real model gives easily: a forget question whose true
    answer is 800 nats less likely, a real-world one whose answers all underflow, a retain reference MIA AUC of
    0 — finite numbers, PrivLeak null with its reason, no exception."""
    from soul.eval import tofu

    records = [{"question": "Q?", "answer": "A.", "paraphrased_answer": "P.", "perturbed_answer": ["X.", "Y."]}]
    stats = {"answer": nll(1.0), "para": nll(800.0), "pert": nll(0.0)}
    out = tofu._qa_metrics("forget", records, lambda role, i, kind, j=0: stats[kind], None)
    row = out["forget_truth_ratio"]["value_by_index"]["0"]
    assert row["stat"] == 0.0 and math.isfinite(row["score"]) and row["p_false"] == pytest.approx(1.0)
    stats = {"answer": nll(0.0), "para": nll(0.0), "pert": nll(800.0)}
    out = tofu._qa_metrics("forget", records, lambda role, i, kind, j=0: stats[kind], None)
    assert out["forget_truth_ratio"]["value_by_index"]["0"]["stat"] == 0.0
    stats = {"answer": nll(900.0), "pert": nll(900.0)}
    out = tofu._qa_metrics("ra", records, lambda role, i, kind, j=0: stats[kind], None)
    assert out["ra_Q_A_Prob_normalised"]["agg_value"] == pytest.approx(1 / 3)
    results = {"mia_min_k": {"agg_value": 0.4}}
    tofu._privleak(results, {"mia_min_k": {"agg_value": 0.0}})
    assert results["privleak"]["agg_value"] is None and "retain model's MIA AUC is 0" in results["privleak"]["note"]


def test_tofu_log_reference_with_a_huge_loss_gap():
    from soul.eval.interop import tofu_truth_ratios

    ratios = tofu_truth_ratios({"avg_paraphrased_loss": {"0": 900.0}, "average_perturb_loss": {"0": [1.0, 2.0]}})
    assert math.isfinite(ratios["0"]) and ratios["0"] > 1e300
