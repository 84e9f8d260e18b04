"""`soul.pipeline` tasks beyond TOFU (copyright, detox, wmdp): data, the ``raw`` prompt format, presets, and
each tiny preset end to end on a tiny random Llama with local files (one thread, a few steps each)."""

from __future__ import annotations

import json
import math

import pytest

from soul import pipeline
from soul.pipeline import load_preset, read_preset, unlearn_configs


def load_task_data(preset):
    return preset.task_impl.load_data(preset)


TASK_COLUMNS = {
    "copyright": ("forget_bleu", "forget_text_rouge", "retain_bleu", "retain_text_rouge"),
    "detox": ("forget_toxicity", "forget_toxic_rate", "retain_answer_prob"),
    "wmdp": ("forget_mc_accuracy", "utility_mc_accuracy"),
}
RUNS = ["target", *(f"{o}-{p}" for o in ("graddiff", "po", "npo") for p in ("adamw", "sophia")), "influence"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def detox_file(tmp_path):
    """Five PKU-SafeRLHF-layout records: 4 with one unsafe and one safe response, 1 with both unsafe."""
    recs = [{"prompt": f"How do I do thing {i}?", "response_0": f"Do bad thing {i} like this.",
             "response_1": f"I would not do thing {i}.", "is_response_0_safe": False, "is_response_1_safe": True}
            for i in range(4)]
    recs.append({"prompt": "Say something rude.", "response_0": "You idiot.", "response_1": "Go away, fool.",
                 "is_response_0_safe": False, "is_response_1_safe": False})
    return write_jsonl(tmp_path / "pku.jsonl", recs)


def mc_files(tmp_path):
    forget = [{"question": f"Which agent is number {i}?", "choices": ["alpha", "beta", "gamma", "delta"],
               "answer": i % 4} for i in range(5)]
    utility = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 2)], "answer": 0}
               for i in range(4)]
    return write_jsonl(tmp_path / "forget-mc.jsonl", forget), write_jsonl(tmp_path / "utility-mc.jsonl", utility)


def tiny_preset(task, tmp_path, raw=False):
    preset = read_preset(f"tiny-{task}")
    if task == "detox":
        preset["data"]["source"] = detox_file(tmp_path)
    if task == "wmdp":
        preset["data"]["mc_source"], preset["data"]["utility_mc_source"] = mc_files(tmp_path)
    return preset if raw else load_preset(preset)


# ------------------------------------------------------------------------------------------- raw format
def test_raw_prompt_format_is_the_text_as_is(llama):
    from soul.data.format import PROMPT_FORMATS, answer_ids, encode_qa, prompt_ids

    _, tok = llama
    assert "raw" in PROMPT_FORMATS
    prefix, cont = "The rain fell on the old", "harbour wall all night"
    p = prompt_ids(tok, prefix, "raw")
    a = answer_ids(tok, cont, "raw")
    assert p == tok(prefix, add_special_tokens=True)["input_ids"]
    assert a == tok(" " + cont, add_special_tokens=False)["input_ids"]  # a continuation: no EOS
    assert tok.eos_token_id not in a
    enc = encode_qa(tok, prefix, cont, prompt_format="raw")
    assert enc["input_ids"] == p + a and enc["labels"] == [-100] * len(p) + a
    # The other formats are unchanged: plain still wraps the question and closes the answer with EOS.
    assert answer_ids(tok, cont, "plain")[-1] == tok.eos_token_id
    assert prompt_ids(tok, prefix, "plain") != p


# ------------------------------------------------------------------------------------------------- data
def test_copyright_data_are_raw_text_qa_from_disjoint_passages():
    from soul.data import load_passages

    preset = load_preset("tiny-copyright")
    d = preset.data
    data = load_task_data(preset)
    passages = load_passages("bundled", d["passage_words"])
    assert data["_eval"]["forget"] == passages[:preset.max_questions]
    assert data["_eval"]["retain"] == passages[d["n_forget"]:d["n_forget"] + preset.max_questions]
    assert len(data["forget"]) == d["n_forget"] and len(data["retain"]) == d["n_retain"]
    for rec, passage in zip(data["forget"], passages):
        words = passage.split()
        assert rec["question"].split() == words[:d["prefix_words"]]
        assert rec["answer"].split() == words[d["prefix_words"]:d["prefix_words"] + d["continuation_words"]]
    assert not {r["question"] for r in data["forget"]} & {r["question"] for r in data["retain"]}
    assert data["full"] == data["forget"] + data["retain"]
    assert preset.prompt_format == "raw"
    assert all(s["config"]["prompt_format"] == "raw" for s in unlearn_configs(preset))
    raw = read_preset("tiny-copyright")
    bad = load_preset({**raw, "data": {**d, "n_forget": None}})
    with pytest.raises(ValueError, match="n_forget"):
        load_task_data(bad)


def test_detox_data_forget_unsafe_keep_safe(tmp_path):
    data = load_task_data(tiny_preset("detox", tmp_path))
    # 4 records with one unsafe response + 1 record with two: 6 forget pairs; 4 safe responses kept.
    assert len(data["forget"]) == 6 and len(data["retain"]) == 4
    assert all(r["answer"].startswith("I would not") for r in data["retain"])
    assert not any(r["answer"].startswith("I would not") for r in data["forget"])
    prompts = data["_eval"]["forget_prompts"]
    assert len(prompts) == len(set(prompts)) == 4  # max_questions = 4, each prompt once


def test_wmdp_needs_its_multiple_choice_sets(tmp_path):
    data = load_task_data(tiny_preset("wmdp", tmp_path))
    assert [r["answer"] for r in data["_eval"]["forget_mc"]] == [0, 1, 2, 3]  # capped at max_questions
    raw = tiny_preset("wmdp", tmp_path, raw=True)
    del raw["data"]["utility_mc_source"]
    with pytest.raises(ValueError, match=r"reproduce-tiny-wmdp\.yaml: data\.utility_mc_source"):
        load_preset(raw)  # checked with the preset, before any data is read


def test_wmdp_scores_with_lm_eval_protocol_by_default(tmp_path):
    """The wmdp task's accuracies are lm-eval's lettered protocol unless the preset asks for cloze; WMDP's
    topic (``mc_name``) reaches the description, MMLU records name their own ``subject``; the reference-model
    cache key carries the protocol in force, so a cached cloze evaluation is never reused for lm_eval."""
    from soul.eval import multiple_choice_eval
    from soul.testing import tiny_model

    model, tok = tiny_model("llama")
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "What is 1 + 1?", "choices": ["1", "2", "3", "4"],
                                                  "answer": 1, "subject": "elementary_mathematics"}])
    raw = tiny_preset("wmdp", tmp_path, raw=True)
    raw["data"].update(mc_name="wmdp-bio", utility_mc_source=mmlu)
    default = load_preset(raw)
    cloze = load_preset({**raw, "eval": {**raw["eval"], "mc_protocol": "cloze"}})
    data = load_task_data(default)
    got = default.task_impl.evaluate(model, tok, default, data, None)

    def direct(records, **kw):
        return multiple_choice_eval(model, tok, records, batch_size=8, **kw)["mc_accuracy"]

    assert got["forget_mc_accuracy"] == direct(data["_eval"]["forget_mc"], protocol="lm_eval", subject="biology")
    assert got["forget_mc_accuracy"] != direct(data["_eval"]["forget_mc"], protocol="lm_eval")  # subject used
    assert got["utility_mc_accuracy"] == direct(data["_eval"]["utility_mc"], protocol="lm_eval",
                                                subject="elementary mathematics")
    got_cloze = cloze.task_impl.evaluate(model, tok, cloze, data, None)
    assert got_cloze["forget_mc_accuracy"] == direct(data["_eval"]["forget_mc"], protocol="cloze",
                                                     prompt_format="plain")
    assert got_cloze["forget_mc_accuracy"] != got["forget_mc_accuracy"]
    keys = [p.task_impl.eval_cache_key(p, data, None) for p in (default, cloze)]
    assert keys[0]["mc_protocol"] == "lm_eval" and keys[1]["mc_protocol"] == "cloze"
    assert load_preset("wmdp").eval["mc_protocol"] == "lm_eval"  # the GPU preset says so explicitly


# ----------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("task", ["copyright", "detox", "wmdp"])
def test_gpu_presets_load_and_validate(task):
    from soul.train import make_config

    preset = load_preset(task)
    assert preset.task == task and preset.dtype == "bfloat16"
    assert not preset.model.startswith("tiny:")
    assert preset.data.get("source")
    specs = unlearn_configs(preset)
    assert {s["objective"] for s in specs} >= {"graddiff", "po", "npo"}
    assert {s["optimizer"] for s in specs} >= {"adamw", "sophia"}
    assert len({(s["config"].get("max_steps"), s["config"].get("epochs")) for s in specs}) == 1
    for s in specs:
        make_config(dict(s["config"]), objective=s["objective"], optimizer=s["optimizer_type"])
    if task == "copyright":  # passages must leave a continuation after the eval prefix
        assert preset.data["passage_words"] > preset.eval["prefix_tokens"]


def test_bad_task_and_sweep_of_a_task_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"task 'nope' is not supported.*'copyright', 'detox', 'wmdp'"):
        load_preset({"task": "nope"})
    with pytest.raises(ValueError, match="needs task 'tofu'"):
        pipeline.sweep("tiny-copyright", tmp_path / "s", stream=None)


# ------------------------------------------------------------------------------------------ end to end
def _check_report(out, task):
    for f in ("results.json", "table.md", "report.html", "metric_bars.png", "loss_curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["task"] == task and data["problems"] == []
    rows = data["table"]
    assert [r["name"] for r in rows] == RUNS
    for row in rows:
        for key in TASK_COLUMNS[task]:
            v = row[key]
            assert v is not None and math.isfinite(v) and 0.0 <= v <= 1.0, (row["name"], key, v)
        assert row["forget_quality"] is None
        # A target used as given has no training time; every other run has one.
        assert (row["name"] == "target" and task != "copyright") or row["wall_time_s"] >= 0
    md = (out / "table.md").read_text().splitlines()[0]
    assert "Forget quality" not in md and "Wall time" in md
    files = {name: f"{name}-s0" if name in RUNS[1:-1] else name for name in RUNS}  # one seed: 0
    for name in RUNS[1:-1]:
        log = out / "runs" / files[name] / "train_log.jsonl"
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
        assert steps == [1, 2], (name, steps)  # the same step budget for every objective x optimizer
    return {name: json.loads((out / "eval" / f"{files[name]}.json").read_text()) for name in RUNS}


def _reproduce(preset, tmp_path, monkeypatch, task):
    """Run `preset` end to end with a fresh cache and return the per-model evaluations of its checked report."""
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    pipeline.reproduce(preset, tmp_path / "r", stream=None)
    return _check_report(tmp_path / "r", task)


def test_tiny_copyright_end_to_end(tmp_path, monkeypatch):
    from soul.eval.copyright import bleu

    evals = _reproduce("tiny-copyright", tmp_path, monkeypatch, "copyright")
    assert len(list((tmp_path / "cache" / "finetuned").iterdir())) == 1  # the optional fine-tune stage ran
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    ex = results["runs"][0]["examples"]
    item = evals["target"]["forget_bleu"]["value_by_index"]["0"]
    assert ex["forget"][0] == {"index": "0", "question": item["prefix"], "answer": item["reference"],
                               "generation": item["generation"]}
    assert len(ex["forget"]) == len(ex["retain"]) == 3
    for ev in evals.values():
        per = ev["forget_bleu"]["value_by_index"]
        assert len(per) == 3
        for item in per.values():  # oracle: BLEU recomputed from the stored generation and reference
            assert item["score"] == pytest.approx(bleu(item["generation"], item["reference"]))
        assert ev["forget_bleu"]["agg_value"] == pytest.approx(sum(v["score"] for v in per.values()) / 3)


def test_tiny_detox_end_to_end(tmp_path, monkeypatch):
    evals = _reproduce(tiny_preset("detox", tmp_path), tmp_path, monkeypatch, "detox")
    for ev in evals.values():
        per = ev["retain_answer_prob"]["value_by_index"]
        assert len(per) == 4
        for item in per.values():
            assert item["score"] == pytest.approx(math.exp(-item["nll"]))
        assert ev["forget_toxic_rate"]["agg_value"] == pytest.approx(
            sum(v["score"] >= 0.5 for v in ev["forget_toxicity"]["value_by_index"].values()) / 4)


def test_tiny_wmdp_end_to_end(tmp_path, monkeypatch):
    evals = _reproduce(tiny_preset("wmdp", tmp_path), tmp_path, monkeypatch, "wmdp")
    for ev in evals.values():
        per = ev["forget_mc_accuracy"]["value_by_index"]
        for item in per.values():  # oracle: accuracy = (argmax of the choice log-likelihoods == answer)
            pred = max(range(len(item["loglik"])), key=lambda j: item["loglik"][j])
            assert item["score"] == float(pred == item["answer"])
        assert ev["forget_mc_accuracy"]["agg_value"] == pytest.approx(sum(v["score"] for v in per.values()) / 4)
