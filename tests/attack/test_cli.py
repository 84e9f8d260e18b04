"""`soul attack` end to end on tiny saved models and a small generated benchmark, and its refusals."""

from __future__ import annotations

import json

import pytest

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from soul.data import make_benchmark

    tmp = tmp_path_factory.mktemp("attack-cli")
    # 20 authors x 2 questions: forget10 holds 2 authors (4 questions), forget01 a single author.
    make_benchmark(tmp / "data", n_authors=20, qas_per_author=2)
    for seed, name in ((0, "unlearned"), (1, "target"), (2, "retain")):
        model, tok = tiny_model("llama", seed=seed)
        save_model(model, tok, tmp / name)
    return tmp


def _argv(tmp, command: str, out, *extra: str) -> list[str]:
    return ["attack", command, "--model", str(tmp / "unlearned"), "--data", str(tmp / "data"),
            "--target", str(tmp / "target"), "--max-new-tokens", "3", "--out", str(out), *extra]


def test_relearn_quantize_paraphrase_write_results(setup, tmp_path, capsys):
    out = tmp_path / "relearn.json"
    assert main([*_argv(setup, "relearn", out, "--retain", str(setup / "retain"), "--steps", "2", "--lr", "1e-3",
                       "--batch-size", "2")]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["tool"] == "soul attack" and res["meta"]["model"] == str(setup / "unlearned")
    rel = res["relearn"]
    assert rel["config"]["steps"] == 2 and rel["split"]["by"] == "author" and len(rel["split"]["heldout"]) == 2
    assert set(rel["models"]) == {"unlearned", "target", "retain"}
    assert set(rel["recovery"]) == {"prob", "rouge", "truth_ratio"}
    assert json.loads(capsys.readouterr().out)["recovery"] == rel["recovery"]
    # Rewriting a file `soul attack` wrote is fine; options may come from a YAML file.
    (tmp_path / "opts.yaml").write_text("steps: 1\nno-generate: true\n")
    assert main([*_argv(setup, "relearn", out, "--config", str(tmp_path / "opts.yaml"))]) == 0
    again = json.loads(out.read_text())
    assert again["relearn"]["config"]["steps"] == 1 and again["meta"]["config"]["generate"] is False

    q = tmp_path / "q.json"
    assert main([*_argv(setup, "quantize", q, "--bits", "8", "4", "--group-size", "16", "--no-generate")]) == 0
    by_bits = json.loads(q.read_text())["quantize"]["by_bits"]
    assert set(by_bits) == {"8", "4"} and by_bits["4"]["quantized"]["group_size"] == 16
    assert by_bits["8"]["models"]["target"]["after"]["rouge"] is None  # --no-generate: no ROUGE

    p = tmp_path / "p.json"
    assert main([*_argv(setup, "paraphrase", p, "--retain", str(setup / "retain"))]) == 0
    assert json.loads(p.read_text())["paraphrase"]["n"] == 4


def _refused(argv, capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_input_is_refused_with_one_line_and_nothing_written(setup, tmp_path, capsys):
    out = tmp_path / "res.json"
    cases = [
        (_argv(setup, "relearn", out, "--steps", "0"), ("--steps",)),
        (_argv(setup, "relearn", out, "--lr", "-1"), ("--lr",)),
        (_argv(setup, "relearn", out, "--heldout-fraction", "1.5"), ("--heldout-fraction",)),
        (_argv(setup, "relearn", out, "--optimizer", "adam"), ("--optimizer", "adamw")),
        (_argv(setup, "quantize", out, "--bits", "9"), ("--bits", "2..8")),
        (_argv(setup, "quantize", out, "--group-size", "0"), ("--group-size",)),
        (_argv(setup, "paraphrase", out, "--max-new-tokens", "0"), ("--max-new-tokens",)),
        (_argv(setup, "paraphrase", out, "--eval-batch-size", "0"), ("--eval-batch-size",)),
        (_argv(setup, "relearn", out, "--forget-split", "forget01"), ("at least two authors",)),
        (_argv(setup, "relearn", out, "--forget-split", "forget42"), ("forget42",)),
        ([*_argv(setup, "relearn", out)[:3], str(tmp_path / "nope"), *_argv(setup, "relearn", out)[4:]],
         ("--model", "nope")),
        ([*_argv(setup, "relearn", out), "--retain", str(tmp_path / "gone")], ("--retain", "gone")),
        ([*_argv(setup, "relearn", out)[:5], str(tmp_path / "nodata"), *_argv(setup, "relearn", out)[6:]],
         ("nodata",)),
        (_argv(setup, "relearn", "")[:-2], ("--out is required",)),
        (_argv(setup, "relearn", tmp_path), ("--out", "is a directory")),
    ]
    for argv, needles in cases:
        _refused(argv, capsys, *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], argv  # nothing written, not even a temp file

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}\n')
    _refused(_argv(setup, "quantize", foreign), capsys, "--out", "not written by `soul attack`")
    assert foreign.read_text() == '{"mine": true}\n'

    no_para = tmp_path / "plain"
    no_para.mkdir()
    records = json.loads((setup / "data" / "forget10.json").read_text())
    (no_para / "forget10.json").write_text(json.dumps([{k: r[k] for k in ("question", "answer")} for r in records]))
    argv = _argv(setup, "paraphrase", out)
    _refused([*argv[:5], str(no_para), *argv[6:]], capsys, "paraphrased_question")
    assert not out.exists()
