"""The typed preset: every nested key checked before any work, errors of one line naming the file and the
key path; seeds, optimizer entries (aliases), the ``attacks`` key; `--only` / `--seeds` checks."""

from __future__ import annotations

import pytest
import yaml

from soul.pipeline import PresetError, load_preset, read_preset, select, unlearn_configs

BASE = {"model": "tiny:llama",
        "unlearn": {"common": {"max_steps": 2},
                    "objectives": {"graddiff": {"gamma": 1.0}, "npo": {"beta": 0.1}},
                    "optimizers": {"adamw": {"lr": 1.0e-3}, "sophia": {"lr": 1.0e-3, "estimator": "gnb"}}},
        "eval": {"batch_size": 8}}


def write(tmp_path, preset, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(preset))
    return path


def with_(path: str, value):
    """A copy of BASE with the dotted key `path` set to `value`."""
    import copy

    preset = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = preset
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return preset


@pytest.mark.parametrize(("key", "value", "where", "problem"), [
    ("unlearn.objectives.npoo", {}, "unlearn.objectives.npoo", "unknown objective 'npoo'"),
    ("unlearn.optimizers.sophia.estimatr", "gnb", "unlearn.optimizers.sophia.estimatr",
     "unknown option (did you mean 'estimator'?)"),
    ("unlearn.common.forget_split", "forget01", "unlearn.common.forget_split", "set by the pipeline"),
    ("unlearn.optimizers.adamw.lr", "fast", "unlearn.optimizers.adamw.lr", "must be a number, got 'fast'"),
    ("unlearn.common.max_steps", 2.5, "unlearn.common.max_steps", "must be int"),
    ("unlearn.common.mixed_precision", True, "unlearn.common.mixed_precision", "must be str"),
    ("unlearn.optimizers.adamx", {}, "unlearn.optimizers.adamx", "unknown optimizer 'adamx'"),
    ("unlearn.optimizers.fast.optimizer", "sophie", "unlearn.optimizers.fast.optimizer", "unknown optimizer"),
    ("unlearn.overrides", {"npo/lion": {"lr": 1.0}}, "unlearn.overrides.npo/lion", "optimizer entry"),
    ("unlearn.common.optimizer", "sophia", "unlearn.common.optimizer", "set by the grid"),
    ("unlearn.common.seed", 3, "unlearn.common.seed", "set by the preset's seeds"),
    ("sweep.grid.adamw.seed", [0, 1], "sweep.grid.adamw.seed", "cannot be a sweep axis"),
    ("unlearn.objectivs", {}, "unlearn.objectivs", "unknown key"),
    ("eval.batch_sise", 4, "eval.batch_sise", "unknown key"),
    ("eval.mixed_precision", "fp16", "eval.mixed_precision", "expected one of ['auto', 'no', 'bf16']"),
    ("data.sorce", "bundled", "data.sorce", "unknown key"),
    ("target.finetune.epoch", 1, "target.finetune.epoch", "unknown option"),
    ("influence.dampng", 1.0, "influence.dampng", "unknown option"),
    ("sweep.grid.adamw.lr", ["1e-4", "fast"], "sweep.grid.adamw.lr[1]", "must be a number"),
    ("sweep.grid.adamw.lrs", [1.0], "sweep.grid.adamw.lrs", "unknown option"),
    ("sweep.objective", "npoo", "sweep.objective", "unknown objective"),
    ("seeds", [0, "1"], "seeds[1]", "must be int"),
    ("seeds", 3, "seeds", "non-empty list"),
    ("seeds", [1, 1], "seeds", "repeated seed"),
    ("attacks", ["relearn"], "attacks", "expected a mapping"),
    ("attacks.relearn", 3, "attacks.relearn", "expected a mapping"),
    # Values the type allows but the run does not: checked on each run's merged options, named by run.
    ("unlearn.common.max_steps", 0, "unlearn run graddiff-adamw", "max_steps"),
    ("unlearn.objectives.ga", {"alpha": 1.0}, "unlearn run ga-adamw", "alpha"),
])
def test_a_bad_nested_key_names_the_file_and_the_key_path(tmp_path, key, value, where, problem):
    path = write(tmp_path, with_(key, value))
    with pytest.raises(PresetError) as err:
        load_preset(path)
    msg = str(err.value)
    assert msg.startswith(f"preset {path}: {where}: "), msg
    assert problem in msg and "\n" not in msg


def test_valid_entries_aliases_and_pass_through_keys(tmp_path):
    preset = load_preset(write(tmp_path, {
        **BASE, "seeds": [3, 1],
        "unlearn": {**BASE["unlearn"], "optimizers": {
            "adamw": {"lr": "1e-4"},  # YAML's "1e-4" (no dot) is a string; numeric strings are numbers
            "sophia-auto": {"optimizer": "sophia", "rho": "auto"},
            "signum": {}, "lion": {"lr": 1.0e-4}, "lamb": {"optimizer": "pytorch_optimizer:Lamb"}}},
        "attacks": {"relearn": {"steps": 5, "lr": 1.0e-5}}}))
    assert preset.where == str(tmp_path / "p.yaml") and preset.seeds == [3, 1]
    entries = preset.unlearn.optimizers
    assert entries["sophia-auto"].optimizer == "sophia" and entries["sophia-auto"].options == {"rho": "auto"}
    assert entries["signum"].optimizer == "signum" and entries["lamb"].optimizer == "pytorch_optimizer:Lamb"
    # soul.attack's configuration, checked and with its defaults (tests/pipeline/test_robustness.py)
    assert preset.attacks["relearn"]["steps"] == 5 and preset.attacks["relearn"]["lr"] == 1.0e-5
    specs = unlearn_configs(preset)
    assert len(specs) == 2 * 5 * 2
    auto = [s for s in specs if s["optimizer"] == "sophia-auto"]
    assert {s["optimizer_type"] for s in auto} == {"sophia"} and {s["config"]["rho"] for s in auto} == {"auto"}
    assert [s["name"] for s in specs[:2]] == ["graddiff-adamw-s3", "graddiff-adamw-s1"]
    assert [s["config"]["seed"] for s in specs[:2]] == [3, 1]  # data order and GNB labels follow the seed
    assert len({s["name"] for s in specs}) == len(specs)


def test_seed_default_and_override():
    preset = load_preset({**BASE, "seed": 7})
    assert preset.seeds == [7] and {s["seed"] for s in unlearn_configs(preset)} == {7}
    assert preset.with_seeds([0, 1, 2]).seeds == [0, 1, 2]
    with pytest.raises(PresetError, match=r"preset dict: seeds\[0\]: must be int"):
        preset.with_seeds(["a"])


def test_only_must_match_a_run():
    specs = unlearn_configs(load_preset({**BASE, "seeds": [0, 1]}))
    assert [s["name"] for s in select(specs, ["graddiff-sophia"])] == ["graddiff-sophia-s0", "graddiff-sophia-s1"]
    assert [s["name"] for s in select(specs, ["npo-adamw-s1", "influence"], ("influence",))] == ["npo-adamw-s1"]
    with pytest.raises(ValueError, match=r"--only graddif-sophia: no such run; runs: graddiff-adamw"):
        select(specs, ["graddif-sophia"])


def test_read_preset_is_raw_and_editable():
    raw = read_preset("tiny")
    raw["unlearn"]["optimizers"]["adamw"]["lr"] = "fast"
    with pytest.raises(PresetError, match=r"reproduce-tiny\.yaml: unlearn\.optimizers\.adamw\.lr: must be a number"):
        load_preset(raw)


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(("key", "value", "where"), [
    ("unlearn.objectives.npoo", {}, "unlearn.objectives.npoo"),
    ("unlearn.optimizers.sophia.estimatr", "gnb", "unlearn.optimizers.sophia.estimatr"),
    ("unlearn.optimizers.adamw.lr", "fast", "unlearn.optimizers.adamw.lr"),
    ("eval.max_new_tokns", 8, "eval.max_new_tokns"),
])
def test_cli_reproduce_rejects_a_bad_preset_before_any_model(tmp_path, capsys, no_models, key, value, where):
    from soul.cli import main

    path = write(tmp_path, with_(key, value))
    assert main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"preset {path}: {where}: " in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written either


def test_cli_only_matching_nothing_and_bad_seeds_exit_2(tmp_path, capsys, no_models):
    from soul.cli import main

    path = write(tmp_path, BASE)
    assert main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "o"), "--only", "graddiff-sophie"]) == 2
    assert "--only graddiff-sophie: no such run" in capsys.readouterr().err
    assert main(["sweep", "--preset", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "sweep.grid: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "o"), "--seeds", "0,x"])
    assert exit_.value.code == 2 and "expected integers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_seeds_reach_the_runs(tmp_path, monkeypatch):
    """`--seeds 4,5` replaces the preset's seeds: the grid the pipeline would run has one run per seed."""
    import soul.pipeline.api as api
    from soul.cli import main

    seen = {}

    def stop(preset, out, progress, base):
        seen["seeds"] = preset.seeds
        raise ValueError("stop here")

    monkeypatch.setattr(api, "base_model", lambda spec: __import__("contextlib").nullcontext(spec))
    monkeypatch.setattr(api, "reference_models", stop)
    assert main(["reproduce", "--preset", str(write(tmp_path, BASE)), "--out", str(tmp_path / "o"),
                 "--seeds", "4,5", "--quiet"]) == 2
    assert seen["seeds"] == [4, 5]
