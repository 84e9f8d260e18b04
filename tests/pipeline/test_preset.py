"""The typed preset: every nested key checked before any work, errors of one line naming the file and the
key path; seeds, optimizer entries (aliases), the ``attacks`` key; `--only` / `--seeds` checks."""

from __future__ import annotations

import re

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
    # Value ranges of the influence, eval and data blocks (issue 20, items 12-15), before any work.
    ("influence.damping", -1, "influence.damping", "must be > 0, got -1"),
    ("influence.damping_relative", 0, "influence.damping_relative", "must be > 0"),
    ("influence.alpha", float("nan"), "influence.alpha", "must be a finite number"),
    ("influence.batch_size", 0, "influence.batch_size", "must be >= 1"),
    ("influence.max_retain_batches", -2, "influence.max_retain_batches", "must be >= 1"),
    ("influence.hessian", "exact", "influence.hessian", "expected one of ['gnb', 'fisher', 'kfac', 'ekfac']"),
    ("influence.generator", 1, "influence.generator", "unknown option"),  # code, not a preset option
    ("eval.batch_size", 0, "eval.batch_size", "must be >= 1"),
    ("eval.max_new_tokens", -1, "eval.max_new_tokens", "must be >= 1"),
    ("eval.min_k", 2, "eval.min_k", "must be <= 1"),
    ("eval.prompt_format", "xml", "eval.prompt_format", "expected one of"),
    ("data.bundled.n_author", 5, "data.bundled.n_author",
     "unknown key (did you mean 'n_authors'?); known: ['n_authors', 'n_perturbed', 'qas_per_author', 'seed']"),
    ("data.bundled.n_authors", 1, "data.bundled.n_authors", "must be >= 2"),
    ("data.bundled.n_perturbed", 9, "data.bundled.n_perturbed", "must be <= 5"),
    ("data.source", 3, "data.source", "must be str"),
    ("max_questions", -1, "max_questions", "must be >= 1, got -1"),
    ("max_questions", 0, "max_questions", "must be >= 1, got 0"),
    ("seeds", [0, -1], "seeds[1]", "must be a seed in 0..4294967295"),
    ("seed", -1, "seed", "must be >= 0"),
    ("attacks.relearn.seed", -3, "attacks.relearn.seed", "must be >= 0"),
    ("attacks.relearn.train_options", {"warmup_steps": "many"}, "attacks.relearn.train_options.warmup_steps",
     "must be int"),
    ("description", ["a", "list"], "description", "must be str"),
    # Names joined into paths under --out (issue 20, item 5): one safe path component each.
    ("sweep.grid.adamw.mixed_precision", ["../../x"], "sweep.grid.adamw.mixed_precision[0]", "not a safe name"),
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


@pytest.mark.parametrize("name", ["x/../../../escaped", "..", "../up", "a/b", ".hidden", "-rf", "a b", "a:b"])
def test_names_joined_into_paths_are_refused_with_their_key_path(tmp_path, name):
    """An optimizer entry or sweep grid name becomes a run directory (``<out>/runs/<objective>-<name>-s0``):
    `x/../../../escaped` would write outside --out, so it is refused where it is given."""
    import copy

    preset = copy.deepcopy(BASE)
    preset["unlearn"]["optimizers"][name] = {"optimizer": "adamw"}
    path = write(tmp_path, preset)
    with pytest.raises(PresetError) as err:
        load_preset(path)
    assert str(err.value).startswith(f"preset {path}: unlearn.optimizers.{name}: {name!r} is not a safe name")
    swept = {**BASE, "sweep": {"grid": {name: {"lr": [1.0e-3]}}}}
    with pytest.raises(PresetError, match=r"sweep\.grid\..*is not a safe name"):
        load_preset(write(tmp_path, swept, "s.yaml"))


def test_safe_names_with_dots_and_pluses_are_accepted():
    import copy

    preset = copy.deepcopy(BASE)
    preset["unlearn"]["optimizers"]["adamw-lr1e-4+wd0.1"] = {"optimizer": "adamw", "lr": 1.0e-4}
    specs = unlearn_configs(load_preset(preset))
    assert "graddiff-adamw-lr1e-4+wd0.1-s0" in {s["name"] for s in specs}


def test_numeric_strings_in_the_influence_block_become_numbers():
    """YAML reads ``1e-5`` (no dot) as a string: the checked value is the number the run gets."""
    preset = load_preset({**BASE, "influence": {"damping": "1e-5", "batch_size": 2}})
    assert preset.influence == {"damping": 1e-5, "batch_size": 2}
    with pytest.raises(PresetError, match=r"influence\.damping: give either damping"):
        load_preset({**BASE, "influence": {"damping": 1.0, "damping_relative": 0.1}})


def test_path_under_refuses_names_that_leave_the_report_directory(tmp_path):
    """The join itself (defense in depth): a run name that climbs out, or a symlink inside --out pointing
    elsewhere, is refused before anything is written."""
    from soul.pipeline.common import path_under

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    assert path_under(out, "runs", "graddiff-adamw-s0") == out / "runs" / "graddiff-adamw-s0"
    for parts in (("runs", "x/../../../escaped"), ("runs", "/etc"), ("runs", ".."), ("..",)):
        with pytest.raises(ValueError, match="would leave the report directory"):
            path_under(out, *parts)
    (tmp_path / "elsewhere").mkdir()
    (out / "attacks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="symbolic link, or lies under one, that points outside the report"):
        path_under(out, "attacks", "graddiff-adamw-s0.json")


def test_max_questions_cap_never_slices_from_the_end():
    """`Task.cap` with a negative count would have scored N-1 questions (``records[:-1]``); it refuses."""
    import dataclasses

    preset = load_preset(BASE)
    task = preset.task_impl
    assert task.cap([1, 2, 3], dataclasses.replace(preset, max_questions=2)) == [1, 2]
    assert task.cap([1, 2, 3], preset) == [1, 2, 3]
    for bad in (-1, 0):
        with pytest.raises(ValueError, match="max_questions: must be a positive integer"):
            task.cap([1, 2, 3], dataclasses.replace(preset, max_questions=bad))


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
    ("influence.damping", -1, "influence.damping"),
    ("data.bundled.n_author", 5, "data.bundled.n_author"),
    ("max_questions", -1, "max_questions"),
    ("seeds", [-1], "seeds[0]"),
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
    for seeds, problem in (("-1", "seeds must be integers in 0..4294967295, got '-1'"), ("0,1,0", "a seed is repeated")):
        with pytest.raises(SystemExit) as exit_:
            main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "o"), "--seeds", seeds])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and "--seeds" in err[0] and problem in err[0], err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_escaping_optimizer_entry_before_anything_is_written(tmp_path, capsys, no_models):
    """``x/../../../escaped`` as an optimizer entry: exit 2, one line naming the file and the key path, no
    report directory and nothing written next to it."""
    import copy

    from soul.cli import main

    preset = copy.deepcopy(BASE)
    preset["unlearn"]["optimizers"] = {"x/../../../escaped": {"optimizer": "adamw"}}
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    path = write(work, preset)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["reproduce", "--preset", str(path), "--out", str(work / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"preset {path}: unlearn.optimizers.x/../../../escaped: " in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


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


def test_influence_rows_by_name_with_kronecker_estimators():
    """`influence:` takes named rows (several one-shot rows, e.g. GNB / K-FAC / EK-FAC side by side) as well as
    one block (one row named ``influence``); K-FAC's options are checked like the others."""
    rows = {"influence": {"hessian": "gnb"}, "influence-kfac": {"hessian": "kfac", "damping_relative": "1e-1"},
            "influence-ekfac": {"hessian": "ekfac", "kfac_fisher": "empirical", "kfac_samples": 2}}
    preset = load_preset({**BASE, "influence": rows})
    assert preset.influence_runs == {**rows, "influence-kfac": {"hessian": "kfac", "damping_relative": 0.1}}
    assert load_preset({**BASE, "influence": {"hessian": "ekfac"}}).influence_runs == {"influence": {"hessian": "ekfac"}}
    assert load_preset(BASE).influence_runs == {}
    for value, where, problem in (
            ({"hessian": "shampoo"}, "influence.hessian", "expected one of"),
            ({"influence-kfac": {"hessian": "kfac", "kfac_samples": 0}}, "influence.influence-kfac.kfac_samples",
             "must be >= 1"),
            ({"influence-kfac": {"hessian": "kfac"}, "alpha": 1.0}, "influence.alpha", "not both"),
            ({"kfac": {"hessian": "kfac"}}, "influence.kfac", "must start with 'influence'"),
            ({"influence/../x": {"hessian": "kfac"}}, "influence.influence/../x", "not a safe name"),
            ({"influence-k": {"hessian": "kfac", "damping": 1.0, "damping_relative": 0.1}}, "influence.influence-k.damping",
             "give either damping")):
        with pytest.raises(PresetError, match=re.escape(where) + ": .*" + re.escape(problem)):
            load_preset({**BASE, "influence": value})


def test_only_selects_influence_rows_by_name():
    from soul.pipeline.api import plan_reproduce

    rows = {"influence": {"hessian": "gnb"}, "influence-kfac": {"hessian": "kfac"}}
    _, specs, influence = plan_reproduce({**BASE, "influence": rows}, only=["influence-kfac"])
    assert specs == [] and influence == ["influence-kfac"]
    assert plan_reproduce({**BASE, "influence": rows})[2] == ["influence", "influence-kfac"]
