"""Preset ``attacks:`` in the pipeline: every key checked at load time, the data checked before any model is
trained, and the tiny grid end to end with robustness columns, the recovery plot and robustness verdicts."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import pytest
import yaml

from soul import pipeline
from soul.pipeline import PresetError, load_preset, read_preset

BASE = {"model": "tiny:llama",
        "unlearn": {"common": {"max_steps": 2},
                    "objectives": {"graddiff": {"gamma": 1.0}},
                    "optimizers": {"adamw": {"lr": 1.0e-3}, "sophia": {"lr": 1.0e-3, "estimator": "gnb"}}},
        "seeds": [0, 1]}


def write(tmp_path, attacks, **extra):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra, "attacks": attacks}))
    return path


def test_attacks_are_normalized_with_seeds_and_influence(tmp_path):
    preset = load_preset(write(tmp_path, {"relearn": {"steps": 5, "lr": "1e-5"}, "quantize": {"bits": 4},
                                          "paraphrase": None, "generate": False, "seeds": [1],
                                          "influence": False}))
    assert preset.attacks["relearn"]["steps"] == 5 and preset.attacks["relearn"]["lr"] == 1e-5
    assert preset.attacks["relearn"]["batch_size"] == 4  # the attack's defaults filled in
    assert preset.attacks["quantize"]["bits"] == [4] and preset.attacks["paraphrase"] == {}
    assert preset.attacks["generate"] is False and "seeds" not in preset.attacks
    assert preset.attack_seeds == [1] and preset.attack_influence is False
    plain = load_preset(write(tmp_path, {"quantize": {}}))
    assert plain.attack_seeds is None and plain.attack_influence is True and "relearn" not in plain.attacks
    assert load_preset(BASE).attacks is None


@pytest.mark.parametrize(("attacks", "where", "problem"), [
    ({"relearn": {"stepz": 5}}, "attacks.relearn.stepz", "unknown option (did you mean 'steps'?)"),
    ({"relern": {}}, "attacks.relern", "unknown key (did you mean 'relearn'?)"),
    ({"relearn": {"steps": 0}}, "attacks.relearn.steps", "must be a positive integer"),
    ({"relearn": {"lr": "fast"}}, "attacks.relearn.lr", "must be a positive number"),
    ({"relearn": {"heldout_fraction": 1.5}}, "attacks.relearn.heldout_fraction", "in (0, 1)"),
    ({"relearn": {"optimizer": "adamx"}}, "attacks.relearn.optimizer", "unknown optimizer 'adamx'"),
    ({"relearn": {"train_options": {"lr": 1.0}}}, "attacks.relearn.train_options", "set by the attack's own"),
    ({"quantize": {"bits": [4, 9]}}, "attacks.quantize.bits", "integers in 2..8"),
    ({"quantize": {"symmetric": "yes"}}, "attacks.quantize.symmetric", "true or false"),
    ({"quantize": {}, "max_questions": 0}, "attacks.max_questions", "positive integer"),
    ({"relearn": 3}, "attacks.relearn", "expected a mapping of options"),
    ({"quantize": {}, "seeds": [5]}, "attacks.seeds", "not among the preset's seeds [0, 1]"),
    ({"quantize": {}, "seeds": []}, "attacks.seeds", "non-empty list"),
    ({"quantize": {}, "influence": "yes"}, "attacks.influence", "must be bool"),
    ({"relearn": False}, "attacks", "no attack enabled"),
    (["relearn"], "attacks", "expected a mapping"),
])
def test_a_bad_attacks_key_names_the_file_and_the_key_path(tmp_path, attacks, where, problem):
    path = write(tmp_path, attacks)
    with pytest.raises(PresetError) as err:
        load_preset(path)
    msg = str(err.value)
    assert msg.startswith(f"preset {path}: {where}: "), msg
    assert problem in msg and "\n" not in msg


def test_tasks_without_attacks_refuse_them_at_load_time():
    # (copyright has attacks since issue 22: on its prefix -> continuation forget records)
    raw = read_preset("tiny-detox")
    raw["attacks"] = {"quantize": {}}
    with pytest.raises(PresetError, match=r"reproduce-tiny-detox\.yaml: attacks: task 'detox' has no "
                                          r"attacks"):
        load_preset(raw)


@pytest.mark.parametrize("attacks", [{"relearn": {"stepz": 5}}, {"quantize": {"bits": [1]}}])
def test_cli_reproduce_rejects_bad_attacks_before_any_model(tmp_path, capsys, no_models, attacks):
    from soul.cli import main

    path = write(tmp_path, attacks)
    assert main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"preset {path}: attacks." in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_forget_set_of_one_author_fails_before_any_training(tmp_path, monkeypatch):
    """The `tiny` preset's forget10 holds one author: relearning cannot hold one out. The error names the
    preset and `attacks` and comes right after the data is read, before any model is fine-tuned."""
    import soul.pipeline.stages as stages

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the attacks' data was checked")

    monkeypatch.setattr(stages, "load", boom)
    raw = read_preset("tiny")
    raw["attacks"] = {"relearn": {}}
    with pytest.raises(PresetError, match=r"preset .*reproduce-tiny\.yaml: attacks: .*at least two authors"):
        pipeline.reproduce(raw, tmp_path / "out", stream=None)


ATTACKED = ("relearn_recovery_prob", "relearn_excess_prob", "quant8_recovery_prob", "quant4_recovery_prob",
            "paraphrase_recovery_prob")


@pytest.mark.slow
@pytest.mark.smoke
def test_tiny_pipeline_with_attacks(tmp_path, monkeypatch):
    """`tiny-attacks` (2 seeds, attacks on every run and influence): one result file per attacked model,
    written atomically; robustness columns with finite values, aggregated over seeds like every column;
    the references' rows; report.html's Robustness section and plot; robustness verdicts in results.json."""
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    log = io.StringIO()
    pipeline.reproduce("tiny-attacks", out, stream=log)

    groups = [f"{o}-{p}" for o in ("graddiff", "npo") for p in ("adamw", "sophia")]
    run_names = [f"{g}-s{s}" for g in groups for s in (0, 1)]
    files = sorted(p.name for p in (out / "attacks").iterdir())
    assert files == sorted(f"{n}.json" for n in [*run_names, "influence"])  # no temporary file left behind
    assert "attacking graddiff-sophia-s1: relearn (2 steps), quantize (8-bit, 4-bit), paraphrase" in log.getvalue()

    data = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    table = {r["name"]: r for r in data["table"]}
    for name in [*run_names, "influence"]:
        full = json.loads((out / "attacks" / f"{name}.json").read_text())
        assert runs[name]["attacks_file"] == str(out / "attacks" / f"{name}.json")
        assert full["meta"]["tool"] == "soul attack" and full["relearn"]["split"]["groups"] == 2
        # The run's columns are the file's figures.
        assert runs[name]["attacks"]["relearn_recovery_prob"] == pytest.approx(full["relearn"]["recovery"]["prob"])
        assert runs[name]["attacks"]["quant4_recovery_prob"] == pytest.approx(
            full["quantize"]["by_bits"]["4"]["recovery"]["prob"])
        for key in ATTACKED:
            assert math.isfinite(runs[name]["attacks"][key]), (name, key)
    for g in groups:  # mean ± std over the two seeds, like any other column
        values = [runs[f"{g}-s{s}"]["attacks"]["quant4_recovery_prob"] for s in (0, 1)]
        assert table[g]["quant4_recovery_prob"] == pytest.approx(sum(values) / 2)
        assert table[g]["quant4_recovery_prob_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        for key in ATTACKED:
            assert math.isfinite(table[g][key]) and math.isfinite(table[g][f"{key}_std"]), (g, key)
    # References: the target row holds the quantization noise, the retain row the relearning baseline.
    some = json.loads((out / "attacks" / "graddiff-adamw-s0.json").read_text())
    assert table["retain"]["relearn_recovery_prob"] == pytest.approx(some["relearn"]["baseline_recovery"]["prob"])
    assert table["target"]["quant4_recovery_prob"] == pytest.approx(
        some["quantize"]["by_bits"]["4"]["target_shift"]["prob"])
    assert table["target"]["relearn_recovery_prob"] is None and table["retain"]["quant4_recovery_prob"] is None
    assert data["problems"] == []  # negative recoveries are results, not range problems

    verdicts = data["robustness_verdicts"]
    assert {(v["objective"], v["optimizer"], v["baseline"]) for v in verdicts} == {
        ("graddiff", "sophia", "adamw"), ("npo", "sophia", "adamw")}
    assert {v["attack"] for v in verdicts} == {"relearn_recovery_prob", "quant8_recovery_prob",
                                               "quant4_recovery_prob", "paraphrase_recovery_prob"}
    for v in verdicts:
        assert v["verdict"] in ("less recovered (more robust)", "more recovered (less robust)",
                                "no difference measured")
        assert "(n = 2 vs 2 seeds)" in v["sentence"]

    md = (out / "table.md").read_text()
    assert "4-bit recovery (prob.)" in md and "Relearn recovery (prob.)" in md and "## Robustness" in md
    html = (out / "report.html").read_text()
    assert "<h2>Robustness</h2>" in html and verdicts[0]["sentence"].split(":")[0] in html
    embedded = [base64.b64decode(u) for u in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert (out / "recovery.png").read_bytes() in embedded


def test_attacked_seeds_follow_seeds_overrides(tmp_path):
    """Default: every seed run (``--seeds`` included); explicit ``attacks.seeds`` not run are said, not hidden."""
    from soul.pipeline.common import Progress
    from soul.pipeline.robustness import Robustness

    preset = load_preset(write(tmp_path, {"quantize": {}}))
    assert Robustness(preset.with_seeds([4, 5]), tmp_path, Progress(None, 4)).seeds == [4, 5]
    bounded = load_preset(write(tmp_path, {"quantize": {}, "seeds": [1], "influence": False}))
    rob = Robustness(bounded, tmp_path, Progress(None, 4))
    assert rob.seeds == [1] and rob.wants({"seed": 1}) and not rob.wants({"seed": 0})
    assert not rob.wants({"role": "influence"})
    log = io.StringIO()
    none = Robustness(bounded.with_seeds([4]), tmp_path, Progress(log, 4))
    assert none.seeds == [] and not none.active and "none of attacks.seeds [1] is run" in log.getvalue()
