"""Kronecker-preconditioned optimizers through `soul unlearn`: Sophia with --estimator kfac|ekfac (and from a
preset), and pytorch_optimizer's SOAP and Kron as library comparison rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model
from soul.train import unlearn

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
FACTS = [{"question": f"Where does {n} work?", "answer": f"{n} works at the mill number {i}."}
         for i, n in enumerate(NAMES)]
DATA = {"full": FACTS, "forget10": FACTS[:2], "retain90": FACTS[2:]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kron-loop")
    save_model(*tiny_model("llama"), root / "base")
    data = root / "data"
    data.mkdir()
    for split, records in DATA.items():
        (data / f"{split}.json").write_text(json.dumps(records))
    return root / "base", data


def _train_log(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _changed(base: Path, out: Path) -> bool:
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(after[k]).all() for k in after)
    return any(not torch.equal(before[k], after[k]) for k in after)


def test_unlearn_cli_runs_sophia_with_ekfac(setup, tmp_path):
    base, data = setup
    out = tmp_path / "ekfac"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--optimizer", "sophia", "--estimator", "ekfac", "--hessian-interval", "1", "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["estimator"] == "ekfac" and record["steps"] == 2
    log = _train_log(out)
    assert [r["hessian_updated"] for r in log] == [True, True] and [r["hessian_updates"] for r in log] == [1, 2]
    for r in log:  # the diagnostics the reports read, filled for the Kronecker rule too
        assert 0 < r["clip_fraction"] <= 1 and r["kron_eig_mean"] > 0 and r["update_norm"] > 0
    diag = record["diagnostics"]
    assert diag["mean_clip_fraction"] == pytest.approx(sum(r["clip_fraction"] for r in log) / 2)
    assert _changed(base, out)


def test_a_preset_selects_the_kfac_estimator(setup, tmp_path):
    base, data = setup
    preset = tmp_path / "kfac.yaml"
    preset.write_text("optimizer: sophia\nestimator: kfac\nhessian_interval: 2\nmax_steps: 3\nbatch_size: 2\n"
                      "lr: 0.001\noptimizer_options:\n  damping_relative: 0.5\n")
    out = tmp_path / "kfac"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--preset", str(preset), "--out", str(out), "--no-progress"]) == 0
    log = _train_log(out)
    assert [r["hessian_updated"] for r in log] == [True, False, True]  # refit exactly every 2 steps
    assert json.loads((out / "run.json").read_text())["config"]["optimizer_options"] == {"damping_relative": 0.5}


def test_a_bad_estimator_exits_2_with_one_line_before_the_model_loads(setup, tmp_path, capsys):
    _, data = setup
    out = tmp_path / "never"
    code = main(["unlearn", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--forget-split",
                 "forget10", "--optimizer", "sophia", "--estimator", "shampoo", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    # the estimator is named (not the missing model): checked before any model is looked for
    assert "estimator must be one of ['gnb', 'hutchinson', 'gradsq', 'kfac', 'ekfac'], got 'shampoo'" in err
    assert not out.exists()


@pytest.mark.parametrize(("optimizer", "options"), [
    ("pytorch_optimizer:SOAP", "optimizer_options:\n  max_precondition_dim: 100\n  precondition_frequency: 1\n"),
    ("pytorch_optimizer:Kron", "optimizer_options:\n  pre_conditioner_update_probability: 1.0\n"),
])
def test_library_kronecker_optimizers_run_from_a_preset(setup, tmp_path, optimizer, options):
    pytest.importorskip("pytorch_optimizer")
    base, data = setup
    preset = tmp_path / "lib.yaml"
    preset.write_text(f"optimizer: {optimizer}\nlr: 0.003\nmax_steps: 3\nbatch_size: 2\nobjective: graddiff\n"
                      + options)
    out = tmp_path / "lib"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--preset", str(preset), "--out", str(out), "--no-progress"]) == 0
    log = _train_log(out)
    assert len(log) == 3 and log[-1]["update_norm"] > 0
    assert _changed(base, out)
    assert json.loads((out / "run.json").read_text())["config"]["optimizer"] == optimizer


def test_soap_preconditions_a_dimension_above_max_precondition_dim_diagonally(setup, monkeypatch):
    """SmolLM2's 49152-row embedding must not get a 49152² preconditioner: with max_precondition_dim below
    the tiny vocabulary, SOAP keeps no factor for the embedding's row dimension (identity rotation: Adam's
    diagonal there) and a full one for its columns."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model, tok = tiny_model("llama")
    seen = {}
    original = pytorch_optimizer.SOAP.step

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        embed = model.get_input_embeddings().weight
        seen["GG"] = self.state[embed].get("GG")
        return out

    monkeypatch.setattr(pytorch_optimizer.SOAP, "step", spy)
    unlearn(model, tok, data=DATA, objective="graddiff", optimizer="pytorch_optimizer:SOAP", max_steps=2,
            batch_size=2, lr=3e-3, progress=False,
            optimizer_options={"max_precondition_dim": 100, "precondition_frequency": 1})
    vocab, hidden = model.get_input_embeddings().weight.shape
    assert vocab > 100 >= hidden
    rows, cols = seen["GG"]
    assert isinstance(rows, list) and rows == [] and tuple(cols.shape) == (hidden, hidden)
