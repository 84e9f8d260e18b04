"""`evaluate` end to end: hand-computed values on a toy model, oracle agreement, forget quality, MIA."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from soul.data.format import QACollator, answer_ids, encode_qa
from soul.eval import evaluate, reference_stats
from soul.eval import metrics as M
from soul.eval.tofu import UTILITY_KEYS, split_role
from soul.testing import tiny_model, tiny_tokenizer


class UnigramLM(torch.nn.Module):
    """Ignores the context: p(v | anything) = softmax(w)_v, so every score is computable by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        # float64 (soul scores float64 logits in float64): the hand computation below is float64 too, so the
        # two agree to rounding (~1e-15) instead of float32's kernel-dependent ~1e-7 relative.
        self.w = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)).double())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, -1))


def test_hand_computed_values_on_unigram_model(records):
    tok = tiny_tokenizer()
    model = UnigramLM(len(tok))
    table = torch.log_softmax(model.w.detach().double(), -1).tolist()

    def nll(text):  # per-token mean NLL of the answer tokens, EOS included
        ids = answer_ids(tok, text)
        return -sum(table[i] for i in ids) / len(ids)

    forget, retain, ra = records[:3], records[3:5], records[5:]
    res = evaluate(model, tok, {"forget": forget, "retain": retain, "real_authors": ra}, generate=False)

    exp_prob = sum(math.exp(-nll(r["answer"])) for r in forget) / 3
    assert res["forget_Q_A_Prob"]["agg_value"] == pytest.approx(exp_prob, rel=1e-10)

    def tr(correct, perturbed):
        return math.exp(nll(correct) - sum(nll(p) for p in perturbed) / len(perturbed))

    f_tr = [tr(r["paraphrased_answer"], r["perturbed_answer"]) for r in forget]
    assert [res["forget_truth_ratio"]["value_by_index"][str(i)]["score"] for i in range(3)] == pytest.approx(f_tr, rel=1e-10)
    assert res["forget_truth_ratio"]["agg_value"] == pytest.approx(sum(min(x, 1 / x) for x in f_tr) / 3, rel=1e-10)
    r_tr = [tr(r["paraphrased_answer"], r["perturbed_answer"]) for r in retain]
    assert res["retain_Truth_Ratio"]["agg_value"] == pytest.approx(sum(max(0, 1 - x) for x in r_tr) / 2, abs=1e-10)
    # real-world set: correct = answer, probability normalised over answer + perturbations
    r = ra[0]
    assert res["ra_Truth_Ratio"]["value_by_index"]["0"]["score"] == pytest.approx(tr(r["answer"], r["perturbed_answer"]), rel=1e-10)
    pc = math.exp(-nll(r["answer"]))
    norm = pc / (pc + sum(math.exp(-nll(p)) for p in r["perturbed_answer"]))
    assert res["ra_Q_A_Prob_normalised"]["agg_value"] == pytest.approx(norm, rel=1e-10)
    # no generation asked for: no ROUGE, and model utility says what it misses instead of inventing a number
    assert "forget_Q_A_ROUGE" not in res
    assert res["model_utility"]["agg_value"] is None and "missing" in res["model_utility"]["note"]
    # forget quality is never computed against the evaluated model itself
    assert res["forget_quality"]["agg_value"] is None


def splits_for(records):
    return {"forget": records[:4], "retain": records[4:7], "real_authors": records[7:9], "world_facts": records[9:11]}


def test_batched_equals_reference_on_every_number(record_factory):
    # float64: batched and one-at-a-time scoring sum in different orders; in float32 the scores differed by up
    # to 5e-6 (kernel-dependent) and a greedy token or a hit could flip on a near tie; in float64 by ~1e-14.
    model, tok = tiny_model("llama")
    model = model.double()
    recs = record_factory(14, seed=3)
    kw = {"holdout": recs[11:], "max_new_tokens": 10}
    fast = evaluate(model, tok, splits_for(recs), batch_size=3, **kw)
    slow = evaluate(model, tok, splits_for(recs), implementation="reference", **kw)
    assert fast.keys() == slow.keys()
    compared = 0
    for key, entry in fast.items():
        if key == "meta":
            continue
        for field in ("value_by_index", "holdout_value_by_index"):
            for idx, values in entry.get(field, {}).items():
                for name, x in values.items():
                    y = slow[key][field][idx][name]
                    if isinstance(x, float):
                        assert x == pytest.approx(y, abs=1e-10), (key, idx, name)
                    else:
                        assert x == y, (key, idx, name)
                    compared += 1
        assert (entry["agg_value"] is None) == (slow[key]["agg_value"] is None)
        if entry["agg_value"] is not None:
            assert entry["agg_value"] == pytest.approx(slow[key]["agg_value"], abs=1e-10), key
    assert compared > 120


def test_model_utility_is_harmonic_mean_of_nine(record_factory):
    model, tok = tiny_model("gpt2")
    res = evaluate(model, tok, splits_for(record_factory(11, seed=4)), max_new_tokens=6)
    values = [res[k]["agg_value"] for k in UTILITY_KEYS]
    assert len(values) == 9
    expected = 0.0 if min(values) == 0 else 9 / sum(1 / v for v in values)
    assert res["model_utility"]["agg_value"] == pytest.approx(expected)
    assert res["model_utility"]["components"] == dict(zip(UTILITY_KEYS, values))
    rouge = res["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    assert rouge["rougeL_recall"] == pytest.approx(M.rouge_l_recall(rouge["generation"], rouge["ground_truth"]))


def test_forget_quality_of_retain_model_against_itself_is_one(tmp_path, record_factory):
    retain, tok = tiny_model("llama", seed=1)
    recs = record_factory(12, seed=5)
    ref_file = tmp_path / "ref.json"
    reference_stats(retain, tok, recs[:8], recs[8:], out=ref_file)
    res = evaluate(retain, tok, {"forget": recs[:8]}, holdout=recs[8:], retain_reference=ref_file, generate=False)
    assert res["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)
    assert res["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-9)
    # another model differs from the retain model: same reference, different p-value and a KS distance > 0
    other, _ = tiny_model("llama", seed=2)
    res2 = evaluate(other, tok, {"forget": recs[:8]}, holdout=recs[8:], retain_reference=ref_file, generate=False)
    assert res2["forget_quality"]["ks_statistic"] > 0 and res2["forget_quality"]["agg_value"] < 1.0
    # a reference on a different forget split is refused
    with pytest.raises(ValueError, match="same forget split"):
        evaluate(other, tok, {"forget": recs[:5]}, retain_reference=ref_file, generate=False)


@pytest.fixture
def memorised(record_factory):
    """A tiny llama trained (AdamW, 100 full-batch steps) on 16 records; the rest are never seen."""
    model, tok = tiny_model("llama", hidden=32)
    recs = record_factory(56, seed=11)
    members = recs[:16]
    batch = QACollator(tok)([encode_qa(tok, r["question"], r["answer"]) for r in members])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok, members, recs[16:]


def test_mia_memorised_vs_unseen_and_same_distribution(memorised):
    model, tok, members, unseen = memorised
    res = evaluate(model, tok, {"forget": members}, holdout=unseen[:16], generate=False)
    for attack in M.MIA_ATTACKS:
        assert res[attack]["agg_value"] > 0.9, attack  # forget set recognised as training data
    assert res["exact_memorization"]["agg_value"] > 0.9
    # two never-seen sets from the same distribution are indistinguishable
    res = evaluate(model, tok, {"forget": unseen[16:]}, holdout=unseen[:16], generate=False)
    for attack in M.MIA_ATTACKS:
        assert abs(res[attack]["agg_value"] - 0.5) < 0.2, (attack, res[attack]["agg_value"])


def test_results_written_atomically_and_reusable_as_reference(tmp_path, records):
    model, tok = tiny_model("opt")
    out = tmp_path / "sub" / "res.json"
    res = evaluate(model, tok, {"forget": records}, max_new_tokens=4, out=out)
    assert json.loads(out.read_text())["forget_truth_ratio"] == json.loads(json.dumps(res["forget_truth_ratio"]))
    assert [p.name for p in out.parent.iterdir()] == ["res.json"]  # no temporary file left behind
    again = evaluate(model, tok, {"forget": records}, retain_reference=out, generate=False)
    assert again["forget_quality"]["agg_value"] == pytest.approx(1.0)


def test_bad_input_names_split_record_and_field(records):
    model, tok = tiny_model("llama")
    bad = [dict(r) for r in records]
    del bad[2]["perturbed_answer"]
    with pytest.raises(ValueError, match=r"split 'forget10_perturbed' record 2: field 'perturbed_answer'"):
        evaluate(model, tok, {"forget10_perturbed": bad}, forget_split_name="forget10_perturbed")
    bad = [dict(r) for r in records]
    bad[1]["paraphrased_answer"] = ""
    with pytest.raises(ValueError, match=r"record 1: field 'paraphrased_answer'"):
        evaluate(model, tok, {"retain": bad})
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, {"forget": []})
    with pytest.raises(ValueError, match="forget_truth_ratio"):
        evaluate(model, tok, {"forget": records}, retain_reference={"mia_min_k": {"agg_value": 0.5}})


def test_split_roles():
    assert split_role("forget05_perturbed") == "forget"
    assert split_role("retain_perturbed") == "retain"
    assert split_role("real_authors_perturbed") == "ra"
    assert split_role("world_facts_perturbed") == "wf"
    assert split_role("holdout10") == "holdout"
    assert split_role("mine", forget_split_name="mine") == "forget"
    with pytest.raises(ValueError, match="cannot tell its role"):
        split_role("stuff")


def test_bf16_mixed_precision_scores_and_generates_under_autocast(record_factory):
    """Every forward pass (scoring and decoding) runs under bf16 autocast with mixed_precision="bf16" and
    under none with "no"; the numbers stay near fp32's (weights untouched) and the precision is recorded."""
    model, tok = tiny_model("llama")
    recs = record_factory(11, seed=5)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = evaluate(model, tok, splits_for(recs), max_new_tokens=6)
    assert seen and not any(seen)
    seen.clear()
    bf16 = evaluate(model, tok, splits_for(recs), max_new_tokens=6, mixed_precision="bf16")
    assert seen and all(seen)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fp32["meta"]["mixed_precision"] == "no" and bf16["meta"]["mixed_precision"] == "bf16"
    losses = {name: [v["avg_loss"] for v in res["forget_Q_A_Prob"]["value_by_index"].values()]
              for name, res in (("fp32", fp32), ("bf16", bf16))}
    probs = list(zip(losses["fp32"], losses["bf16"]))
    assert any(a != b for a, b in probs)  # bf16 really ran: rounding shows in the losses
    assert all(abs(a - b) < 0.05 * a for a, b in probs)
    assert bf16["model_utility"]["agg_value"] == pytest.approx(fp32["model_utility"]["agg_value"], rel=0.1)
    seen.clear()
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        evaluate(model, tok, splits_for(recs), mixed_precision="fp8")
    assert not seen  # refused before any scoring
