"""`soul eval` end to end on a tiny saved model and a small generated benchmark."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model


@pytest.fixture
def setup(tmp_path, monkeypatch):
    data = pytest.importorskip("soul.data")
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    data.make_benchmark(tmp_path / "data", n_authors=4, qas_per_author=3)
    model, tok = tiny_model("llama", seed=1)
    save_model(model, tok, tmp_path / "retain")
    return tmp_path


def test_soul_eval_with_cached_retain_reference(setup, capsys):
    tmp = setup
    argv = ["eval", "--model", str(tmp / "retain"), "--data", str(tmp / "data"), "--forget-split", "forget10",
            "--retain-model", str(tmp / "retain"), "--max-new-tokens", "4", "--out", str(tmp / "res.json")]
    assert main(argv) == 0
    res = json.loads((tmp / "res.json").read_text())
    for key in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "retain_Truth_Ratio", "ra_Q_A_ROUGE",
                "wf_Q_A_Prob_normalised", "model_utility", "mia_min_k_plus_plus", "privleak", "extraction_strength"):
        assert key in res, key
    # the retain model evaluated against its own (cached) reference: forget quality 1, no privacy leak
    assert res["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)
    assert res["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-9)
    cached = list((tmp / "cache" / "eval").glob("reference-*.json"))
    assert len(cached) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["forget_quality"] == res["forget_quality"]["agg_value"]
    # the saved results file serves as reference too
    argv2 = [*argv[:7], "--retain-results", str(tmp / "res.json"), "--max-new-tokens", "2", "--out", str(tmp / "r2.json")]
    assert main(argv2) == 0
    assert json.loads((tmp / "r2.json").read_text())["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)


def test_soul_eval_bf16_evaluates_the_retain_reference_in_bf16_too(setup):
    """--mixed-precision bf16 scores the model and its retain reference under the same autocast: the retain
    model against itself keeps forget quality 1, and the bf16 reference is cached apart from the fp32 one."""
    tmp = setup
    argv = ["eval", "--model", str(tmp / "retain"), "--data", str(tmp / "data"), "--forget-split", "forget10",
            "--retain-model", str(tmp / "retain"), "--no-holdout", "--max-new-tokens", "2"]
    assert main([*argv, "--out", str(tmp / "fp32.json")]) == 0
    assert main([*argv, "--mixed-precision", "bf16", "--out", str(tmp / "bf16.json")]) == 0
    fp32, bf16 = (json.loads((tmp / f"{n}.json").read_text()) for n in ("fp32", "bf16"))
    assert (fp32["meta"]["mixed_precision"], bf16["meta"]["mixed_precision"]) == ("no", "bf16")
    assert bf16["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)
    refs = sorted((tmp / "cache" / "eval").glob("reference-*.json"))
    assert sorted(json.loads(r.read_text())["meta"]["mixed_precision"] for r in refs) == ["bf16", "no"]
    assert fp32["forget_Q_A_Prob"]["agg_value"] != bf16["forget_Q_A_Prob"]["agg_value"]


def test_soul_eval_errors(setup, capsys, monkeypatch):
    tmp = setup
    base = ["eval", "--model", str(tmp / "retain"), "--data", str(tmp / "data")]
    assert main([*base, "--out", str(tmp / "x.json"), "--retain-results", str(tmp / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(base) == 2
    assert "--out is required" in capsys.readouterr().err
    # lm-eval absent (hidden: `make setup` installs it): refused before any evaluation
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main([*base, "--out", str(tmp / "x.json"), "--lm-eval", "mmlu"]) == 2
    assert "soul[lm-eval]" in capsys.readouterr().err
    assert not (tmp / "x.json").exists()


def test_soul_eval_max_length_truncates_a_too_long_answer_with_a_warning(setup, capsys):
    """A model with learned positions (GPT-2, 256) and a forget answer of ~2000 tokens: without --max-length
    it is refused naming the file and record (tests/test_cli_bad_inputs.py); with it the answer is cut to fit,
    as in training, with a warning naming the file — no IndexError from the position embedding."""
    tmp = setup
    model, tok = tiny_model("gpt2", seed=1)
    save_model(model, tok, tmp / "gpt2")
    split = tmp / "data" / "forget10_perturbed.json"
    records = json.loads(split.read_text())
    records[0]["answer"] = " ".join(f"word{i}" for i in range(700))
    split.write_text(json.dumps(records))
    argv = ["eval", "--model", str(tmp / "gpt2"), "--data", str(tmp / "data"), "--forget-split", "forget10",
            "--no-holdout", "--max-new-tokens", "2", "--out", str(tmp / "res.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{split}: record 0: question + answer is" in err and "more than the model's context of 256" in err
    assert not (tmp / "res.json").exists()
    assert main([*argv, "--max-length", "128"]) == 0
    err = capsys.readouterr().err
    assert f"{split}: truncated answers of 1 record(s) to max_length=128 tokens (records 0)" in err
    res = json.loads((tmp / "res.json").read_text())
    assert res["meta"]["max_length"] == 128 and res["forget_Q_A_Prob"]["agg_value"] > 0


def test_cached_retain_reference_is_keyed_on_the_weights_content(setup):
    """Retain weights replaced by different bytes of the same size, with the old modification time restored:
    the reference is recomputed (it was keyed on names, sizes and mtimes, so the stale one was reused)."""
    import os

    tmp = setup
    argv = ["eval", "--model", str(tmp / "retain"), "--data", str(tmp / "data"), "--forget-split", "forget10",
            "--retain-model", str(tmp / "retain"), "--no-holdout", "--max-new-tokens", "1"]
    assert main([*argv, "--out", str(tmp / "a.json")]) == 0
    weights = tmp / "retain" / "model.safetensors"
    before = weights.stat()
    other, tok = tiny_model("llama", seed=2)  # same architecture: the same file size, other values
    save_model(other, tok, tmp / "other")
    new_bytes = (tmp / "other" / "model.safetensors").read_bytes()
    assert len(new_bytes) == before.st_size and new_bytes != weights.read_bytes()
    weights.write_bytes(new_bytes)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert main([*argv, "--out", str(tmp / "b.json")]) == 0
    assert len(list((tmp / "cache" / "eval").glob("reference-*.json"))) == 2
    # the new weights evaluated against their own, recomputed reference: forget quality 1
    assert json.loads((tmp / "b.json").read_text())["forget_quality"]["agg_value"] == pytest.approx(1.0, abs=1e-9)


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_soul_eval_never_overwrites_an_input_or_writes_into_the_model_cache(setup, capsys, monkeypatch):
    """Issue 20 items 6 and 7: --out and --open-unlearning-dir that would replace an input file (the
    --retain-reference TOFU_EVAL.json, the --out file) or write into $SOUL_CACHE/models are refused with exit 2
    before any model is loaded; every file stays as it was."""
    tmp = setup
    base = ["eval", "--model", str(tmp / "retain"), "--data", str(tmp / "data"), "--forget-split", "forget10",
            "--no-holdout", "--max-new-tokens", "2"]
    ou = tmp / "ou"
    assert main([*base, "--retain-model", str(tmp / "retain"), "--out", str(tmp / "first.json"),
                 "--open-unlearning-dir", str(ou)]) == 0
    cached = tmp / "cache" / "models" / "smollm2-135m-1"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    capsys.readouterr()
    import soul.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the output check")

    monkeypatch.setattr(soul.models, "load_model", no_model)
    roots = [tmp / "ou", tmp / "data", tmp / "retain", tmp / "cache" / "models"]
    before = {str(r): tree_hash(r) for r in roots} | {"first": tree_hash(tmp)["first.json"]}
    reference = ["--retain-reference", str(ou / "TOFU_EVAL.json")]
    cases = [
        ([*reference, "--open-unlearning-dir", str(ou), "--out", str(tmp / "second.json")],
         f"--open-unlearning-dir {ou / 'TOFU_EVAL.json'}: would replace a file of the input"),
        (["--open-unlearning-dir", str(ou), "--out", str(ou / "TOFU_EVAL.json")], "is the --out file"),
        (["--open-unlearning-dir", str(tmp / "first.json"), "--out", str(tmp / "second.json")], "is a file"),
        (["--out", str(cached / "results.json")], f"--out {cached / 'results.json'}: would write into soul's model cache"),
        (["--out", str(cached / "config.json")], "model cache"),
        (["--open-unlearning-dir", str(cached), "--out", str(tmp / "second.json")], "model cache"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
        assert {str(r): tree_hash(r) for r in roots} | {"first": tree_hash(tmp)["first.json"]} == before
        assert not (tmp / "second.json").exists() and not (cached / "results.json").exists()
