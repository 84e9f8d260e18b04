from __future__ import annotations

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


def test_library_names_fail_with_a_hint():
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
