from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soul.optim import Lion, Signum, SophiaG, build_optimizer, needs_create_graph, optimizer_options


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_each_name_builds_its_optimizer_with_the_given_options():
    adamw = build_optimizer("adamw", _params(), lr=0.01, weight_decay=0.0, betas=[0.8, 0.9])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build_optimizer("SGD", _params(), lr=0.5, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    sophia = build_optimizer("sophia", _params(), lr=2e-5, gamma=0.02, hessian_interval=5, estimator="hutchinson")
    assert isinstance(sophia, SophiaG)
    group = sophia.param_groups[0]
    assert (group["lr"], group["rho"], group["hessian_interval"], group["estimator"]) == (2e-5, 0.02, 5, "hutchinson")


def test_unknown_names_and_options_are_reported_clearly():
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'; expected one of \['adamw', 'lion', 'sgd', "
                                         r"'signum', 'sophia'\] or 'LIBRARY:Class'"):
        build_optimizer("lamb", _params())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['momentum'\] for optimizer 'adamw'"):
        build_optimizer("adamw", _params(), momentum=0.9)
    with pytest.raises(ValueError, match="either 'rho' or its alias 'gamma'"):
        build_optimizer("sophia", _params(), rho=0.1, gamma=0.1)
    assert "hessian_interval" in optimizer_options("sophia") and "gamma" in optimizer_options("sophia")


def test_the_same_loop_runs_with_every_optimizer():
    from soul.optim import estimate_hessian
    from soul.testing import tiny_model

    model, _ = tiny_model("gpt2")
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    from soul.losses import answer_nll

    for name in ("adamw", "sgd", "sophia", "signum", "lion", "torch:RAdam", "pytorch_optimizer:Lamb"):
        model, _ = tiny_model("gpt2")
        opt = build_optimizer(name, model.parameters(), lr=1e-2)
        before = answer_nll(model, batch).item()
        for _ in range(3):
            if getattr(opt, "hessian_due", lambda: False)():
                estimate_hessian(model, batch, opt)
            opt.zero_grad()
            answer_nll(model, batch).backward()
            opt.step()
        assert answer_nll(model, batch).item() < before, name


def test_library_optimizers_resolve_by_name_with_their_options():
    sgd = build_optimizer("torch:SGD", _params(), lr=0.5, momentum=0.9, nesterov=True)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] is True
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    soap = build_optimizer("pytorch_optimizer:SOAP", [torch.nn.Parameter(torch.ones(4, 3))], lr=3e-3,
                           precondition_frequency=2)
    assert type(soap) is pytorch_optimizer.SOAP and soap.param_groups[0]["lr"] == 3e-3
    assert "precondition_frequency" in optimizer_options("pytorch_optimizer:SOAP")
    assert isinstance(build_optimizer("signum", _params()), Signum)
    assert isinstance(build_optimizer("lion", _params(), betas=[0.9, 0.98]), Lion)


def test_library_names_fail_with_a_hint(monkeypatch):
    monkeypatch.setenv("SOUL_OPTIMIZER_LIBRARIES", "no_such_lib")
    with pytest.raises(ValueError, match=r"library 'no_such_lib' is not installed .*pip install no-such-lib"):
        build_optimizer("no_such_lib:Foo", _params())
    with pytest.raises(ValueError, match=r"torch.optim has no optimizer class 'Sgd'.*Did you mean SGD"):
        build_optimizer("torch:Sgd", _params())
    with pytest.raises(ValueError, match=r"expected 'LIBRARY:Class'"):
        build_optimizer("torch:", _params())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rho'\] for optimizer 'torch:SGD'"):
        build_optimizer("torch:SGD", _params(), lr=0.1, rho=0.1)


def test_create_graph_is_detected_for_optimizers_that_take_hessian_vector_products():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    assert needs_create_graph(pytorch_optimizer.AdaHessian) and needs_create_graph(pytorch_optimizer.SophiaH)
    assert not needs_create_graph(pytorch_optimizer.SOAP) and not needs_create_graph(pytorch_optimizer.Lamb)
    assert not needs_create_graph(SophiaG) and not needs_create_graph(torch.optim.AdamW)

    class Marked(torch.optim.SGD):
        requires_create_graph = True

    assert needs_create_graph(Marked(_params(), lr=0.1))


REPO = Path(__file__).resolve().parents[2]
EVIL = ("import pathlib, torch\npathlib.Path(__file__).with_name('IMPORTED-' + __name__).write_text('ran')\n"
        "class Opt(torch.optim.SGD):\n    pass\nSOAP = Opt\n")


def test_an_optimizer_module_in_the_working_directory_is_never_imported(tmp_path):
    """`python -m soul.cli` puts the working directory on sys.path: a shared preset or option naming a module
    there (or shadowing an allowed library) must not run it."""
    for name in ("evil", "pytorch_optimizer"):
        (tmp_path / f"{name}.py").write_text(EVIL)
    (tmp_path / "data").mkdir()
    facts = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]
    (tmp_path / "data" / "forget10.json").write_text(json.dumps(facts[:2]))
    (tmp_path / "data" / "retain90.json").write_text(json.dumps(facts[2:]))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("SOUL_OPTIMIZER_LIBRARIES", None)
    for optimizer, message in (("evil:Opt", "'evil' is not an allowed optimizer library (torch, pytorch_optimizer)"),
                               ("pytorch_optimizer:SOAP", f"({tmp_path / 'pytorch_optimizer.py'}) is not the "
                                                          "installed distribution's copy")):
        proc = subprocess.run([sys.executable, "-m", "soul.cli", "unlearn", "--model", "/nonexistent/model",
                               "--data", "data", "--out", "out", "--optimizer", optimizer], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"soul unlearn: error: optimizer {optimizer!r}: ") and message in lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil.py", "pytorch_optimizer.py"]


def test_an_opted_in_library_must_still_be_an_installed_distribution(tmp_path, monkeypatch):
    from soul.optim.factory import check_library

    (tmp_path / "evil.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SOUL_OPTIMIZER_LIBRARIES", "evil")
    with pytest.raises(ValueError, match=r"the 'evil' found first on the import path .*evil.py\) is not the "
                                         r"installed distribution's copy"):
        build_optimizer("evil:Opt", _params())
    assert "evil" not in sys.modules and not (tmp_path / "IMPORTED-evil").exists()
    check_library("torch:SGD")  # the allowed, installed ones pass
    pytest.importorskip("pytorch_optimizer")
    check_library("pytorch_optimizer.optimizer:SOAP")


def test_a_preset_naming_a_library_outside_the_allow_list_is_refused_whole(tmp_path):
    from soul.pipeline import load_preset

    preset = tmp_path / "p.yaml"
    text = (REPO / "src" / "soul" / "presets" / "reproduce-tiny.yaml").read_text()
    preset.write_text(text + "\n# appended by the test\n")
    load_preset(str(preset))  # the bundled preset as it is: valid
    import yaml

    data = yaml.safe_load(text)
    data["unlearn"]["optimizers"] = {"evil": {"optimizer": "evil:Opt"}}
    preset.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"unlearn.optimizers.evil.optimizer: optimizer 'evil:Opt': 'evil' is not "
                                         r"an allowed optimizer library"):
        load_preset(str(preset))
