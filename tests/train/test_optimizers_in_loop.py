"""Every optimizer through the training loop: library optimizers (plain and create_graph), rho='auto',
averaged Hessian draws, and the update diagnostics in the log and the run record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model
from soul.train import make_config, unlearn

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "teal", "navy"]
FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes {c}."} for n, c in zip(NAMES, COLOURS)]
DATA = {"full": FACTS, "forget10": FACTS[:2], "retain90": FACTS[2:]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("optim-loop")
    model, tok = tiny_model("llama")
    save_model(model, tok, root / "base")
    data = root / "data"
    data.mkdir()
    for split, records in DATA.items():
        (data / f"{split}.json").write_text(json.dumps(records))
    return root / "base", data


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("optimizer", "lr"), [("pytorch_optimizer:Lamb", "0.02"),
                                               ("pytorch_optimizer:AdaHessian", "0.1")])
def test_soul_unlearn_trains_with_a_library_optimizer(setup, tmp_path, optimizer, lr):
    pytest.importorskip("pytorch_optimizer")
    base, data = setup
    out = tmp_path / "out"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--objective", "graddiff", "--optimizer", optimizer, "--lr", lr, "--max-steps", "4",
                 "--batch-size", "2", "--warmup-steps", "0", "--out", str(out), "--no-progress"]) == 0
    log = [r for r in _log(out) if r["kind"] == "train"]
    # gradient difference: the forget NLL goes up (each record holds the loss before its step)
    assert log[-1]["forget_nll"] > log[0]["forget_nll"] + 0.05, [r["forget_nll"] for r in log]
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(after[k]).all() for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["optimizer"] == optimizer
    assert record["diagnostics"]["update_norm_total"] > 0 and record["diagnostics"]["rho"] is None


def test_create_graph_optimizer_gets_a_second_order_gradient(setup, monkeypatch):
    """AdaHessian's Hutchinson product needs .grad with a graph: without create_graph it would raise."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    seen = []
    original = pytorch_optimizer.AdaHessian.step

    def spy(self, *args, **kwargs):
        seen.append(all(p.grad is None or p.grad.requires_grad for g in self.param_groups for p in g["params"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pytorch_optimizer.AdaHessian, "step", spy)
    model, tok = tiny_model("llama")
    unlearn(model, tok, data=DATA, objective="ga", optimizer="pytorch_optimizer:AdaHessian", max_steps=2,
            batch_size=2, lr=1e-3, progress=False)
    assert seen == [True, True]


def test_signum_steps_are_sign_sized_and_the_diagnostics_add_up(setup):
    model, tok = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.01
    _, record = unlearn(model, tok, data=DATA, objective="ga", optimizer="signum", lr=lr, weight_decay=0.0,
                        max_steps=1, batch_size=2, warmup_steps=0, progress=False)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    diag, final = record["diagnostics"], record["final"]
    # every moving coordinate moved by exactly lr: ||dtheta|| = lr sqrt(#moved). In float32 the stored move of a
    # coordinate is lr rounded on the grid of |theta| (<= ulp(|theta|) / lr ~ 1e-5 relative for |theta| < 1) and
    # the norm's sum adds ~log2(n) eps32 ~ 2e-6: rel=1e-4 is >= 10x that bound (measured: 1.7e-6).
    assert final["update_norm"] == pytest.approx(lr * math.sqrt(moved), rel=1e-4)
    n = sum(p.numel() for p in model.parameters())
    assert diag["trainable_numel"] == n
    assert final["update_rms_over_lr"] == pytest.approx(math.sqrt(moved / n), rel=1e-4)
    assert moved > 0.99 * n  # tied embeddings: every coordinate has a gradient, so rms/lr is ~1
    assert diag["displacement"] == pytest.approx(diag["update_norm_total"], rel=1e-6)  # one step
    assert diag["mean_clip_fraction"] == pytest.approx(moved / n) and diag["rho"] is None


def test_adamw_diagnostics_over_several_steps(setup):
    model, tok = tiny_model("llama")
    _, record = unlearn(model, tok, data=DATA, objective="graddiff", optimizer="adamw", lr=0.01,
                        max_steps=4, batch_size=2, progress=False)
    diag = record["diagnostics"]
    assert diag["steps_measured"] == 4 and diag["mean_clip_fraction"] is None and diag["rho"] is None
    assert diag["update_norm_total"] == pytest.approx(4 * diag["update_norm_mean"])
    assert 0 < diag["displacement"] <= diag["update_norm_total"] * (1 + 1e-9)
    assert record["final"]["rho"] is None and record["final"]["update_norm"] > 0


def test_rho_auto_from_the_command_line_leaves_the_target_fraction_unclipped(setup, tmp_path):
    base, data = setup
    out = tmp_path / "auto"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--optimizer", "sophia", "--rho", "auto", "--target-unclipped", "0.3", "--hessian-samples", "2",
                 "--max-steps", "3", "--batch-size", "2", "--hessian-interval", "2", "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["config"]["rho"], record["config"]["hessian_samples"]) == ("auto", 2)
    log = [r for r in _log(out) if r["kind"] == "train"]
    rho = record["diagnostics"]["rho"]
    assert rho > 0 and all(r["rho"] == rho for r in log)  # chosen once, kept
    assert log[0]["clip_fraction"] == pytest.approx(0.7, abs=0.01)  # 1 - target on the first step
    assert record["diagnostics"]["mean_clip_fraction"] == pytest.approx(
        sum(r["clip_fraction"] for r in log) / 3)


def test_optimizer_options_and_rho_validation(setup, tmp_path, capsys):
    base, data = setup
    out = tmp_path / "sgd"
    assert main(["unlearn", "--model", str(base), "--data", str(data), "--forget-split", "forget10",
                 "--optimizer", "torch:SGD", "--optimizer-options", "momentum=0.9", "nesterov=true",
                 "--max-steps", "1", "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["optimizer_options"] == {
        "momentum": 0.9, "nesterov": True}
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["unlearn", "--model", str(base), "--rho", "lots", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "expected a number or 'auto'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="option 'target_unclipped' must be in \\(0, 1\\)"):
        make_config(target_unclipped=1.5)
    with pytest.raises(ValueError, match=r"option 'rho' must be in \(0\.0, "):
        make_config(rho=-1.0)
    assert make_config({"rho": "auto"}).rho == "auto" and make_config({"rho": "0.1"}).rho == 0.1
    with pytest.raises(ValueError, match="option 'hessian_samples' must be a positive integer"):
        make_config(hessian_samples=0)
