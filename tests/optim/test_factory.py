from __future__ import annotations

import pytest
import torch

from soul.optim import SophiaG, build_optimizer, optimizer_options


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
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; expected one of \['adamw', 'sgd', 'sophia'\]"):
        build_optimizer("lion", _params())
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

    for name in ("adamw", "sgd", "sophia"):
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
