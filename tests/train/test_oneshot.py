"""`soul unlearn --optimizer influence`: one Newton step from the command line, written like a training run's
output (safetensors + run.json with the Newton-model diagnostics); bad options refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soul.cli import main
from soul.models import load_model, save_model
from soul.safety import is_run_record
from soul.testing import tiny_model

FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes {c}."}
         for n, c in zip(["Ada", "Bo", "Cy", "Dee", "Eve", "Flo"], ["red", "blue", "green", "gold", "pink", "grey"])]
DATA = {"forget10": FACTS[:2], "retain90": FACTS[2:]}
DIAGNOSTICS = ("cosine_with_ascent", "cosine_with_diagonal", "step_norm", "first_order_forget_change",
               "first_order_retain_change", "quadratic_term", "predicted_forget_change", "measured_forget_change",
               "predicted_retain_change", "measured_retain_change", "forget_loss", "forget_loss_after",
               "retain_loss", "retain_loss_after")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oneshot")
    save_model(*tiny_model("llama"), root / "model")
    (root / "data").mkdir()
    for name, records in DATA.items():
        (root / "data" / f"{name}.json").write_text(json.dumps(records))
    return root


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("estimator", ["gnb", "kfac", "ekfac"])
def test_cli_influence_writes_a_loadable_model_and_the_diagnostics(world, tmp_path, estimator, capsys):
    out = tmp_path / "out"
    before = _weights(world / "model")
    argv = ["unlearn", "--model", str(world / "model"), "--data", str(world / "data"), "--optimizer", "influence",
            "--estimator", estimator, "--step-size", "1e-3", "--damping-relative", "0.2", "--batch-size", "2",
            "--max-retain-batches", "1", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert f"one {estimator} Newton step" in line and "predicted" in line and str(out) in line
    record = json.loads((out / "run.json").read_text())
    assert is_run_record(out / "run.json")  # so a later --overwrite recognises the output as soul's
    assert record["kind"] == "unlearn" and record["optimizer"] == "influence" and record["steps"] == 1
    cfg = record["config"]
    assert (cfg["estimator"], cfg["hessian_batch"], cfg["step_size"], cfg["damping_relative"], cfg["damping"],
            cfg["seed"]) == (estimator, "retain", 1e-3, 0.2, None, 3)
    assert record["batches"] == {"forget": 1, "retain": 1}  # 2 forget records / 2; retain capped at 1 batch
    assert record["data"]["retain"]["split"] == "retain90" and record["data"]["forget"]["n"] == 2
    stats = record["stats"]
    for key in DIAGNOSTICS:
        assert isinstance(stats[key], float), key
    assert stats["measured_forget_change"] == pytest.approx(stats["forget_loss_after"] - stats["forget_loss"])
    assert stats["predicted_forget_change"] == pytest.approx(stats["first_order_forget_change"]
                                                             + stats["quadratic_term"])
    if estimator == "gnb":
        assert stats["cosine_with_diagonal"] == 1.0
    model, _ = load_model(str(out))
    after = {k: v for k, v in model.state_dict().items() if k in before}
    assert any(not torch.equal(after[k], before[k]) for k in before)
    moved = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before) ** 0.5
    assert moved == pytest.approx(stats["step_norm"], rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in _weights(world / "model").items())  # input untouched


def test_cli_influence_overwrite_replaces_only_its_own_output(world, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["unlearn", "--model", str(world / "model"), "--data", str(world / "data"), "--optimizer", "influence",
            "--step-size", "1e-3", "--out", str(out)]
    assert main(base) == 0
    assert main(base) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--estimator", "kfac"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["estimator"] == "kfac"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine\n")
    assert main([*base[:-1], str(mine), "--overwrite"]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no staging or lock left behind


BAD = [
    (["--optimizer", "influence", "--estimator", "hutchinson"], "'estimator' with optimizer 'influence' must be one of"),
    (["--optimizer", "influence", "--estimator", "shampoo"], "'estimator' with optimizer 'influence' must be one of"),
    (["--optimizer", "adamw", "--estimator", "kfac"], "--estimator kfac is a Kronecker curvature for --optimizer sophia or influence"),
    (["--optimizer", "sophia", "--estimator", "fisher"], "--estimator fisher is a curvature for --optimizer influence"),
    (["--optimizer", "influence", "--damping", "0"], "'damping' must be a finite number > 0"),
    (["--optimizer", "influence", "--damping-relative", "-0.1"], "'damping_relative' must be a finite number > 0"),
    (["--optimizer", "influence", "--damping-relative", "nan"], "'damping_relative' must be a finite number > 0"),
    (["--optimizer", "influence", "--damping", "1", "--damping-relative", "0.1"], "exclude each other"),
    (["--optimizer", "influence", "--step-size", "0"], "'step_size' must be a finite number > 0"),
    (["--optimizer", "influence", "--max-retain-batches", "0"], "'max_retain_batches' must be an integer >= 1"),
    (["--optimizer", "influence", "--hessian-batch", "sideways"], "'hessian_batch' must be one of"),
    (["--optimizer", "influence", "--kfac-fisher", "true"], "'kfac_fisher' must be one of"),
    (["--optimizer", "influence", "--hessian-samples", "4"], "'hessian_samples' (label draws) applies to"),
    (["--optimizer", "influence", "--lr", "1e-3"], "option 'lr' does not apply to optimizer 'influence'"),
    (["--optimizer", "influence", "--objective", "npo"], "option 'objective' does not apply"),
    (["--optimizer", "adamw", "--step-size", "1"], "--step-size applies to --optimizer influence only"),
    (["--optimizer", "adamw", "--damping-relative", "0.1"], "--damping-relative applies to --optimizer influence"),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_influence_options_exit_2_before_any_model_loads(world, tmp_path, monkeypatch, capsys, extra, expected):
    import soul.models

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(soul.models, "load_model", boom)
    out = tmp_path / "out"
    code = main(["unlearn", "--model", str(world / "model"), "--data", str(world / "data"), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("soul unlearn: error: ") and expected in lines[0], lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
