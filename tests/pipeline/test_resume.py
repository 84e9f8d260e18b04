"""A killed `soul reproduce` grid resumes: every finished evaluation run leaves ``runs/<name>/record.json``
(keyed by what the run depends on), a rerun into the same directory reuses those records and runs only the
rest; a record for other settings, a planted link or a missing attacks file makes the run be redone. The
model stages are stubbed (`tests.pipeline.test_tune.Stub`): no model is trained."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from .test_tune import Stub, peaked, preset_dict


def eval_calls(stub):
    return [c for c in stub.calls if not c.startswith("tune-")]


def untuned():
    raw = preset_dict()
    raw.pop("tune")
    return raw


def test_a_killed_grid_reruns_only_the_runs_it_had_not_finished(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    out = tmp_path / "out"
    first = Stub(peaked, fail_after=3).install(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce(untuned(), out, stream=None)
    assert eval_calls(first) == ["graddiff-adamw-s1", "graddiff-adamw-s2", "graddiff-sophia-s1"]
    assert sorted(p.parent.name for p in out.glob("runs/*/record.json")) == eval_calls(first)

    second = Stub(lambda lr, seed: (0.9, 0.6)).install(monkeypatch, tmp_path)  # other metrics: tells reuse apart
    results = reproduce(untuned(), out, stream=None)
    assert eval_calls(second) == ["graddiff-sophia-s2"]  # only what the kill left undone
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) >= {"graddiff-adamw-s1", "graddiff-adamw-s2", "graddiff-sophia-s1", "graddiff-sophia-s2"}
    # a reused run is the record the first call made: its metrics reach the table unchanged
    assert runs["graddiff-adamw-s1"]["metrics"]["forget_quality"]["agg_value"] == pytest.approx(0.51)  # lr 1e-3
    assert runs["graddiff-sophia-s2"]["metrics"]["forget_quality"]["agg_value"] == pytest.approx(0.9)  # rerun
    table = {r["name"]: r for r in json.loads((out / "results.json").read_text())["table"]}
    assert table["graddiff-adamw"]["n"] == 2 and table["graddiff-adamw"]["forget_quality"] == pytest.approx(0.515)

    third = Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(untuned(), out, stream=None)
    assert eval_calls(third) == []  # everything finished: nothing reruns


def test_changed_settings_or_tampered_records_are_rerun(tmp_path, monkeypatch):
    from soul.pipeline import reproduce

    out = tmp_path / "out"
    Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(untuned(), out, stream=None)

    # another lr for sophia: its runs' key changes, adamw's records still hold
    raw = untuned()
    raw["unlearn"]["optimizers"]["sophia"]["lr"] = 1.0e-4
    stub = Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(raw, out, stream=None)
    assert eval_calls(stub) == ["graddiff-sophia-s1", "graddiff-sophia-s2"]

    # a record whose key was edited: soul's own file, rerun and replaced
    record = out / "runs" / "graddiff-adamw-s1" / "record.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "key": "0" * 64}))
    stub = Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(raw, out, stream=None)
    assert eval_calls(stub) == ["graddiff-adamw-s1"]
    assert json.loads(record.read_text())["key"] == saved["key"]

    # a record replaced by a link to a look-alike file elsewhere: neither trusted nor written through
    other = out / "runs" / "graddiff-adamw-s2" / "record.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_text(other.read_text())
    before = outside.read_text()
    other.unlink()
    other.symlink_to(outside)
    stub = Stub(peaked).install(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=r"symbolic link.*remove the link or choose another output directory"):
        reproduce(raw, out, stream=None)
    assert eval_calls(stub) == [] and outside.read_text() == before

def test_an_attacked_run_is_redone_when_its_attacks_file_is_gone(tmp_path, monkeypatch):
    import soul.pipeline.api as api
    from soul.pipeline import reproduce

    class FakeRobustness:
        """Stands in for the attacks: writes the result file the record names, counts the attacks."""
        attacked: ClassVar[list[str]] = []

        def __init__(self, preset, out, progress):
            self.out, self.cfg, self.references, self.first = out, {"relearn": {"steps": 1}}, {"key": "k"}, None

        def check_data(self, data):
            pass

        active = False

        def wants(self, run):
            return run.get("seed") == 1

        def attack(self, model, tokenizer, run):
            path = self.out / "attacks" / f"{run['name']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"recovery": 0.5}))
            run["attacks"], run["attacks_file"] = {"relearn_recovery": 0.5}, str(path)
            FakeRobustness.attacked.append(run["name"])
            self.first = self.first or {"recovery": 0.5}

        def finish(self, runs):
            FakeRobustness.finished_with_first = self.first

    raw = untuned()
    raw["attacks"] = {"relearn": {"steps": 1, "lr": 1.0e-4, "batch_size": 2}}
    out = tmp_path / "out"
    Stub(peaked).install(monkeypatch, tmp_path)
    monkeypatch.setattr(api, "Robustness", FakeRobustness)
    reproduce(raw, out, stream=None)
    assert FakeRobustness.attacked == ["graddiff-adamw-s1", "graddiff-sophia-s1"]

    FakeRobustness.attacked = []
    (out / "attacks" / "graddiff-sophia-s1.json").unlink()
    stub = Stub(peaked).install(monkeypatch, tmp_path)
    reproduce(raw, out, stream=None)
    assert eval_calls(stub) == ["graddiff-sophia-s1"] and FakeRobustness.attacked == ["graddiff-sophia-s1"]
    # the reused attacked run still gives the reference rows their attack values (Robustness.finish)
    assert FakeRobustness.finished_with_first == {"recovery": 0.5}
