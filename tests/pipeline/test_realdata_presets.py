"""Presets ``copyright-cpu`` and ``detox-cpu`` (issue 22): their blocks, every bad data input refused by
`soul reproduce` before anything is written (exit 2, one line naming the file), and both run end to end on
a tiny random Llama with tiny slices of the real files in ``../shared/data`` (skipped when absent)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from soul import pipeline
from soul.pipeline import load_preset, read_preset, unlearn_configs

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUL_DATA_DIR") or REPO.parent / "shared" / "data")
BOOKS, DETOX = DATA / "books", DATA / "detox"
needs_books = pytest.mark.skipif(not (BOOKS / "frankenstein.txt").is_file(), reason=f"no real books at {BOOKS}")
needs_detox = pytest.mark.skipif(not (DETOX / "pku_saferlhf_unsafe_200.csv").is_file(),
                                 reason=f"no real detox files at {DETOX}")


def grid(preset):
    return sorted({(s["objective"], s["optimizer"]) for s in unlearn_configs(preset)})


def test_copyright_cpu_preset_blocks():
    p = load_preset("copyright-cpu")
    assert p.task == "copyright" and p.model == "smollm2-135m" and p.seeds == [0, 1, 2]
    assert p.task_impl.reference_roles == ("target", "retain")  # the retain model: the never-saw-it baseline
    assert len({p.data[k] for k in ("forget_book", "retain_book", "unseen_book")}) == 3
    assert grid(p) == [(o, e) for o in ("graddiff", "npo") for e in ("adamw", "signum", "sophia")]
    assert p.target.finetune["mixed_precision"] == p.unlearn.common["mixed_precision"] == "no"
    assert set(p.attacks) >= {"relearn", "quantize"} and p.attacks["quantize"]["bits"] == [4]
    assert p.prompt_format == "raw"


def test_detox_cpu_preset_blocks():
    p = load_preset("detox-cpu")
    assert p.task == "detox" and p.seeds == [0, 1, 2]
    assert grid(p) == [(o, e) for o in ("graddiff", "npo") for e in ("adamw", "signum", "sophia")]
    assert p.unlearn.common["mixed_precision"] == "no" and p.eval["samples"] >= 1
    assert p.data["source"].endswith("unsafe_200.csv") and p.data["safe_source"].endswith("safe_200.csv")
    assert p.data["rtp_challenging"] and p.data["rtp_nontoxic"]


def tiny_copyright(books_dir, **data):
    raw = read_preset("copyright-cpu")
    raw.update(model="tiny:llama", seeds=[0], progress_bars=False, max_questions=3)
    raw["data"].update(books_dir=str(books_dir), n_forget=4, n_retain=4, n_unseen=4, prefix_tokens=8,
                       continuation_tokens=8, **data)
    for role in ("target", "retain"):
        raw[role]["finetune"].update(epochs=1, lr=1.0e-3)
    raw["unlearn"]["common"]["max_steps"] = 1
    raw["unlearn"]["objectives"] = {"graddiff": {"gamma": 1.0, "alpha": 1.0}}
    raw["unlearn"]["optimizers"] = {k: v for k, v in raw["unlearn"]["optimizers"].items() if k in ("adamw", "signum")}
    raw["eval"] = {"batch_size": 8, "max_new_tokens": 8}
    raw["attacks"]["relearn"].update(steps=1, questions_per_author=2)
    return raw


def tiny_detox(**data):
    raw = read_preset("detox-cpu")
    raw.update(model="tiny:llama", seeds=[0], progress_bars=False, max_questions=3)
    raw["data"].update(n_forget=4, n_retain=4, n_heldout=2, n_prompts=3, **data)
    raw["unlearn"]["common"].update(max_steps=1)
    raw["unlearn"]["objectives"] = {"npo": {"beta": 0.1}}
    raw["unlearn"]["optimizers"] = {"sophia": raw["unlearn"]["optimizers"]["sophia"]}
    raw["eval"].update(batch_size=8, max_new_tokens=4, samples=2)
    return raw


# ---------------------------------------------------------------------------------- bad inputs, via the CLI
def _refused(tmp_path, capsys, raw, *expected):
    import yaml

    from soul.cli import main

    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for text in expected:
        assert text in err[0], err[0]
    assert not out.exists()  # nothing written
    return err[0]


def _book_dir(tmp_path, **books):
    d = tmp_path / "books"
    d.mkdir()
    for name, text in books.items():
        (d / f"{name}.txt").write_text(text)
    return d


LONG = " ".join(f"word{i % 50} and more text" for i in range(3000))
MARKED_EMPTY = "header\n*** START OF THE PROJECT GUTENBERG EBOOK E ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK E ***\n"


@pytest.mark.parametrize(("forget", "files", "expected"), [
    ("missing", {}, ("unknown book 'missing'", "books: a, b")),
    ("nowhere/missing.txt", {}, ("nowhere/missing.txt", "book file does not exist")),
    ("empty", {"empty": MARKED_EMPTY}, ("empty.txt", "no text between the Project Gutenberg START and END markers")),
    ("short", {"short": "a b"}, ("short.txt", "shorter than one passage of prefix + continuation")),
    ("tiny", {"tiny": " ".join(["word"] * 10)}, ("tiny.txt", "book has 2 passages of 8 + 8 tokens; 4 asked for")),
])
def test_bad_books_exit_2_naming_the_file_before_anything_is_written(tmp_path, capsys, no_models, forget, files,
                                                                      expected):
    d = _book_dir(tmp_path, a=LONG, b=LONG, **files)
    _refused(tmp_path, capsys, tiny_copyright(d, forget_book=forget, retain_book="a", unseen_book="b"), *expected)


@needs_detox
@pytest.mark.parametrize(("key", "content", "expected"), [
    ("source", None, ("missing.csv", "is not an existing file")),
    ("source", "prompt,answer\nq?,a\n", ("bad.csv: record 0: field 'response': missing",)),
    ("safe_source", "prompt,response,is_safe\nq?,a,perhaps\n", ("bad.csv: record 0: field 'is_safe'",)),
    ("rtp_nontoxic", '{"prompt": "text only", "challenging": false}\n', ("bad.jsonl: record 0: field 'prompt'",)),
])
def test_bad_detox_files_exit_2_naming_file_and_record_before_anything_is_written(tmp_path, capsys, no_models,
                                                                                  key, content, expected):
    if content is None:
        path = tmp_path / "missing.csv"
    else:
        path = tmp_path / ("bad.jsonl" if key.startswith("rtp") else "bad.csv")
        path.write_text(content)
    _refused(tmp_path, capsys, tiny_detox(**{key: str(path)}), *expected)


# --------------------------------------------------------------------------------------- end to end (tiny)
@needs_books
def test_copyright_cpu_end_to_end_on_real_books(tmp_path, monkeypatch):
    from soul.eval.metrics import auc

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r"
    results = pipeline.reproduce(tiny_copyright(BOOKS), out, stream=None)
    names = [r["name"] for r in results["runs"]]
    assert names[:2] == ["target", "retain"] and "graddiff-signum-s0" in names
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert set(meta["books"].values()) == {"frankenstein", "pride_and_prejudice", "adventures_of_sherlock_holmes"}
    assert all("public domain" in v for v in meta["data_licences"].values()) and len(meta["data_licences"]) == 3
    for run in results["runs"]:
        m = run["metrics"]
        for key in ("retain_ppl", "unseen_ppl"):  # oracle: token-weighted from the per-passage NLLs
            per = m[key]["value_by_index"].values()
            want = math.exp(sum(v["nll"] * v["tokens"] for v in per) / sum(v["tokens"] for v in per))
            assert m[key]["agg_value"] == pytest.approx(want)
        per = m["forget_mia_auc"]["value_by_index"].values()
        assert m["forget_mia_auc"]["agg_value"] == pytest.approx(
            auc([v["score"] for v in per if v["member"]], [v["score"] for v in per if not v["member"]]))
        assert len(m["forget_bleu"]["value_by_index"]) == 3  # max_questions
        if run["role"] == "unlearned":
            assert run["attacks"] and (out / "attacks" / f"{run['name']}.json").is_file()
    table = (out / "table.md").read_text()
    assert "Unseen PPL" in table and "Forget MIA AUC" in table


@needs_detox
def test_detox_cpu_end_to_end_on_real_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r"
    results = pipeline.reproduce(tiny_detox(), out, stream=None)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert "CC-BY-NC-4.0" in meta["data_licences"]["PKU-SafeRLHF"]
    assert "Apache-2.0" in meta["data_licences"]["RealToxicityPrompts"]
    for run in results["runs"]:
        m = run["metrics"]
        for s in ("challenging", "nontoxic"):
            greedy, sampled = m[f"rtp_{s}_toxicity"]["value_by_index"], m[f"rtp_{s}_sampled_toxicity"]["value_by_index"]
            assert len(greedy) == len(sampled) == 3
            assert all(len(v["scores"]) == 2 for v in sampled.values())  # eval.samples per prompt
            scores = [x for v in sampled.values() for x in v["scores"]]
            assert m[f"rtp_{s}_sampled_toxic_rate"]["agg_value"] == pytest.approx(
                sum(x >= 0.5 for x in scores) / len(scores))
        assert m["heldout_ppl"]["agg_value"] > 1 and len(m["heldout_ppl"]["value_by_index"]) == 2
    assert "RTP chall. tox." in (out / "table.md").read_text()
