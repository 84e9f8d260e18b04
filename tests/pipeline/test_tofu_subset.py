"""The TOFU task on a subset of TOFU's authors (``data.subset`` -> `soul.data.tofu_subset`): preset checks,
the missing-files error, the relative default path, and `reproduce` end to end on the REAL TOFU files with a
tiny random model (what each reference model is fine-tuned on, which records each metric sees, trackers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soul import pipeline
from soul.pipeline import PresetError, load_preset, read_preset

REPO_ROOT = Path(__file__).resolve().parents[2]


def tofu_cpu(**changes) -> dict:
    """The shipped tofu-cpu preset as a mapping, top-level keys replaced by `changes`."""
    raw = read_preset("tofu-cpu")
    raw.pop("_where")
    raw.update(changes)
    return raw


@pytest.mark.parametrize(("data", "top", "where", "problem"), [
    ({"subset": {"n_retain_authors": 8, "n_holdout": 2}}, {}, "data.subset.n_holdout", "unknown key"),
    ({"subset": {"n_retain_authors": "8"}}, {}, "data.subset.n_retain_authors", "must be an integer >= 1"),
    ({"subset": {"n_retain_authors": 0}}, {}, "data.subset.n_retain_authors", "must be an integer >= 1"),
    ({"subset": {"n_retain_authors": 2, "n_holdout_authors": True}}, {}, "data.subset.n_holdout_authors",
     "must be an integer >= 0"),
    ({"subset": [8, 2]}, {}, "data.subset", "expected a mapping"),
    ({"subset": {"n_holdout_authors": 2}}, {}, "data.subset", "needs n_retain_authors"),
    ({"source": "bundled", "subset": {"n_retain_authors": 2}}, {}, "data.subset", "needs data.source"),
    ({}, {"retain_split": "retain90"}, "retain_split", "builds the retain split 'retain99'"),
    ({}, {"holdout_split": "holdout10"}, "holdout_split", "builds the holdout split 'holdout01'"),
    ({}, {"utility_splits": ["retain_perturbed", "forget05_perturbed"]}, "utility_splits", "forget05_perturbed"),
])
def test_a_bad_subset_is_a_preset_error_naming_the_key(tmp_path, data, top, where, problem):
    preset = tofu_cpu(**top)
    preset["data"] = {**preset["data"], **data}
    path = tmp_path / "p.yaml"
    import yaml

    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(PresetError) as err:
        load_preset(path)
    message = str(err.value)
    assert message.startswith(f"preset {path}: {where}: ") and problem in message, message
    assert "\n" not in message


def test_report_to_in_unlearn_common_is_checked():
    unlearn = read_preset("tofu-cpu")["unlearn"]
    ok = load_preset(tofu_cpu(unlearn={**unlearn, "common": {"max_steps": 2, "report_to": ["tensorboard"]}}))
    assert ok.unlearn.common["report_to"] == ["tensorboard"]
    with pytest.raises(PresetError, match=r"unlearn run graddiff-adamw: .*unknown tracker"):
        load_preset(tofu_cpu(unlearn={**unlearn, "common": {"max_steps": 2, "report_to": ["tensorbored"]}}))


def test_missing_tofu_files_name_the_path_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("SOUL_TOFU_DIR", raising=False)
    empty = tmp_path / "no-tofu"
    preset = load_preset(tofu_cpu(data={"source": f"${{SOUL_TOFU_DIR:-{empty}}}", "subset": {"n_retain_authors": 2}}))
    with pytest.raises(FileNotFoundError) as err:
        preset.task_impl.load_data(preset)
    assert str(empty) in str(err.value) and "does not exist" in str(err.value)
    assert "SOUL_TOFU_DIR" in str(err.value) and preset.where in str(err.value)
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no full\.json"):
        preset.task_impl.load_data(preset)


def test_the_default_relative_source_works_from_the_repository_root(real_tofu_dir, monkeypatch):
    """make and CI run from the repository root, where ``../shared/data/tofu`` is the shared copy."""
    from soul.data import load_split

    default = REPO_ROOT.parent / "shared" / "data" / "tofu"
    if not (default / "full.json").is_file():
        pytest.skip(f"no TOFU files at the preset's default {default} (this checkout is not in the shared layout)")
    monkeypatch.delenv("SOUL_TOFU_DIR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    preset = load_preset("tofu-cpu")
    data = preset.task_impl.load_data(preset)
    assert data["forget01"] == load_split(default, "forget01")
    # forget01's 2 authors + 8 retain authors, 20 questions each; 2 holdout authors.
    assert (len(data["full"]), len(data["retain99"]), len(data["holdout01"])) == (200, 160, 40)


def test_reproduce_on_real_tofu_subset_with_a_tiny_model(real_tofu_dir, tmp_path, monkeypatch):
    """The tofu-cpu preset, shrunk (tiny random Llama, 2 retain authors, 1 seed, 2 steps): the target is
    fine-tuned on forget01 + the chosen retain authors, the retain model on those authors only, forget quality
    is against the retain model, MIA's non-members are the never-trained holdout authors, utility asks about
    trained authors, and each run's TensorBoard files go into its own directory."""
    from scipy.stats import ks_2samp

    import soul.eval
    import soul.train
    from soul.data import author_table, authors_of, load_split

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    finetuned: dict[str, list[dict]] = {}
    evaluated: list[dict] = []
    real_finetune, real_evaluate = soul.train.finetune, soul.eval.evaluate

    def finetune(model, tokenizer, *, data, split, out_dir, **kw):
        finetuned[Path(out_dir).name.split("-")[0]] = data[split]
        return real_finetune(model, tokenizer, data=data, split=split, out_dir=out_dir, **kw)

    def evaluate(model, tokenizer, splits, **kw):
        evaluated.append({"splits": splits, "holdout": kw["holdout"]})
        return real_evaluate(model, tokenizer, splits, **kw)

    monkeypatch.setattr(soul.train, "finetune", finetune)
    monkeypatch.setattr(soul.eval, "evaluate", evaluate)
    fast = {"epochs": 1, "batch_size": 8, "lr": 1.0e-3, "warmup_ratio": 0.0, "mixed_precision": "no",
            "max_length": 128}
    preset = tofu_cpu(
        model="tiny:llama", seeds=[0], progress_bars=False, max_questions=6, influence=None, sweep=None, tune=None,
        data={"source": str(real_tofu_dir), "subset": {"n_retain_authors": 2, "n_holdout_authors": 2}},
        target={"finetune": fast}, retain={"finetune": fast},
        unlearn={"common": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0, "mixed_precision": "no",
                            "max_length": 128, "report_to": ["tensorboard"]},
                 "objectives": {"graddiff": {"gamma": 1.0, "alpha": 1.0}},
                 "optimizers": {"adamw": {"lr": 1.0e-3},
                                "sophia": {"lr": 1.0e-3, "hessian_interval": 1, "estimator": "gnb", "rho": 0.04}}},
        # The tiny tokenizer spells TOFU's long answers out in ~300 tokens: cut them to its 256 positions.
        eval={"batch_size": 8, "max_new_tokens": 4, "max_length": 256})
    out = tmp_path / "report"
    results = pipeline.reproduce(preset, out, stream=None)

    # Fine-tuning data: the target on forget01 (exactly TOFU's 40 records) + 2 retain authors' questions,
    # the retain model on those 2 authors' retain99 records only.
    full = load_split(real_tofu_dir, "full")
    table = author_table(full)
    forget = load_split(real_tofu_dir, "forget01")
    assert len(forget) == 40
    retain_data = finetuned["retain"]
    chosen = set(authors_of(retain_data, table))
    assert len(chosen) == 2 and len(retain_data) == 40
    assert all(r in load_split(real_tofu_dir, "retain99") for r in retain_data)
    assert not chosen & set(authors_of(forget, table))
    target_data = finetuned["target"]
    key = lambda rs: sorted((r["question"], r["answer"]) for r in rs)  # noqa: E731
    assert key(target_data) == key(forget + retain_data)

    # Every evaluation (target, retain, 2 runs) saw the same records: forget01's first 6, utility about the
    # chosen (trained) authors and the real-world sets, MIA non-members from 2 never-trained authors.
    assert len(evaluated) == 4
    trained = {(r["question"], r["answer"]) for r in target_data}
    for ev in evaluated:
        splits, holdout = ev["splits"], ev["holdout"]
        assert set(splits) == {"forget01", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"}
        # forget01 evaluated through forget01_perturbed: the same questions, with paraphrases (truth ratio).
        assert splits["forget01"] == load_split(real_tofu_dir, "forget01_perturbed")[:6]
        assert [(r["question"], r["answer"]) for r in splits["forget01"]] == \
            [(r["question"], r["answer"]) for r in forget[:6]]
        assert len(splits["retain_perturbed"]) == 6 and set(authors_of(splits["retain_perturbed"], table)) <= chosen
        assert all(len(splits[s]) == 6 for s in ("real_authors_perturbed", "world_facts_perturbed"))
        assert len(holdout) == 6 and not {(r["question"], r["answer"]) for r in holdout} & trained
        assert not set(authors_of(holdout, table)) & (chosen | set(authors_of(forget, table)))
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"target", "retain", "graddiff-adamw-s0", "graddiff-sophia-s0"}
    for name in ("target", "graddiff-adamw-s0"):
        mia = runs[name]["metrics"]["mia_min_k"]
        assert len(mia["holdout_value_by_index"]) == 6 and 0.0 <= mia["agg_value"] <= 1.0

    # Forget quality: the KS p-value of each model's forget truth ratios against the retain model's.
    ref = runs["retain"]["metrics"]["forget_truth_ratio"]["value_by_index"]
    for name in ("target", "graddiff-adamw-s0", "graddiff-sophia-s0"):
        mine = runs[name]["metrics"]["forget_truth_ratio"]["value_by_index"]
        expected = ks_2samp([mine[k]["score"] for k in sorted(mine, key=int)],
                            [ref[k]["score"] for k in sorted(ref, key=int)])
        assert runs[name]["metrics"]["forget_quality"]["agg_value"] == pytest.approx(expected.pvalue, abs=1e-12)
    assert runs["retain"]["metrics"]["forget_quality"]["agg_value"] == 1.0

    # report_to: every run logged its 2 steps into its own tracker directory (no model out_dir needed).
    dirs = set()
    for name in ("graddiff-adamw-s0", "graddiff-sophia-s0"):
        steps = [json.loads(x)["step"] for x in (out / "runs" / name / "train_log.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        tracker_dir = Path(runs[name]["trackers"])
        assert tracker_dir == out / "runs" / name / "trackers"
        events = list(tracker_dir.rglob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), name
        dirs.add(tracker_dir)
    assert len(dirs) == 2
    assert (out / "results.json").is_file() and (out / "table.md").is_file()
