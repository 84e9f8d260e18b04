"""`report_to`: the train_log.jsonl lines reach TensorBoard (read back from the event file), errors are clear."""

from __future__ import annotations

import json

import pytest

from soul.testing import tiny_model
from soul.train import unlearn
from soul.train.trackers import check_report_to, log_eval_metrics, numeric_fields, parse_report_to

pytest.importorskip("tensorboard")

FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes {c}."}
         for n, c in zip(["Ada", "Bo", "Cy", "Dee", "Eve", "Flo"], ["red", "blue", "green", "gold", "pink", "grey"])]
DATA = {"forget10": FACTS[:2], "retain90": FACTS[2:]}


def read_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {directory}"
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_tensorboard_gets_every_logged_field(tmp_path):
    model, tok = tiny_model("llama")
    out = tmp_path / "run"
    unlearn(model, tok, data=DATA, forget_split="forget10", objective="graddiff", optimizer="sophia",
            hessian_interval=2, max_steps=4, batch_size=1, lr=1e-3, probe_every=2, report_to=["tensorboard"],
            out_dir=out, progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / "trackers")
    assert not (tmp_path / ".run.trackers").exists()  # the working copy was moved into the output directory
    train = [r for r in log if r["kind"] == "train"]
    probes = [r for r in log if r["kind"] == "probe"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in probes] == [0, 2, 4]
    expected = {}
    for r in log:
        for tag, value in numeric_fields(r, r["kind"]).items():
            expected.setdefault(tag, {})[r["step"]] = value
    assert {"train/loss", "train/lr", "train/grad_norm", "train/hessian_updated", "train/clip_fraction",
            "probe/forget_prob", "probe/gap"} <= set(expected)
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert set(scalars[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert [scalars["train/hessian_updated"][s] for s in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 0.0]


def test_eval_metrics_are_logged(tmp_path):
    results = {"forget_quality": {"agg_value": 0.25}, "model_utility": {"agg_value": 0.5},
               "privleak": {"agg_value": None}, "meta": {"model": "x"}}
    assert log_eval_metrics(results, "tensorboard", tmp_path) == ["tensorboard"]
    assert read_scalars(tmp_path) == {"eval/forget_quality": {0: 0.25}, "eval/model_utility": {0: 0.5}}


def test_report_to_errors(monkeypatch, tmp_path):
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['comet'\]; choose from tensorboard, wandb"):
        parse_report_to(["comet"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="tracker 'wandb' needs the 'wandb' package, which is not installed"):
        check_report_to("wandb")
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="tracker 'wandb' needs"):  # before any training step
        unlearn(model, tok, data=DATA, report_to=["wandb"], max_steps=1, out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="needs an output directory"):
        unlearn(model, tok, data=DATA, report_to=["tensorboard"], max_steps=1, progress=False)
