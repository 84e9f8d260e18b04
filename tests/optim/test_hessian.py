from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from soul.losses import answer_nll
from soul.optim import SophiaG, estimate_hessian, gnb_backward, hutchinson_diagonal, rademacher_like
from soul.testing import tiny_model


class _Quadratic(torch.nn.Module):
    """f(x) = (x1 + x2)^2 + 3 x3^2: diag H = (2, 2, 6) while the row sums of H are (4, 4, 6)."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.7]))

    @staticmethod
    def loss(model, batch):
        x = model.x
        return (x[0] + x[1]) ** 2 + 3 * x[2] ** 2


def test_rademacher_draws_both_signs_with_equal_probability():
    u = rademacher_like(torch.empty(20000), torch.Generator().manual_seed(0))
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    assert abs(u.mean().item()) < 0.03


def test_hutchinson_averages_to_the_true_hessian_diagonal_not_the_row_sums():
    model, gen = _Quadratic(), torch.Generator().manual_seed(0)
    n = 4000
    total = torch.zeros(3)
    for _ in range(n):
        total += hutchinson_diagonal(_Quadratic.loss(model, None), [model.x], generator=gen)[0]
    mean = total / n
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, 6.0]), rtol=0.05, atol=0)


def test_hutchinson_through_estimate_hessian_feeds_the_optimizer():
    model = _Quadratic()
    opt = SophiaG(model.parameters(), betas=(0.9, 0.0), estimator="hutchinson")
    gen = torch.Generator().manual_seed(3)
    seen = torch.zeros(3)
    for _ in range(400):
        estimate_hessian(model, {}, opt, loss_fn=_Quadratic.loss, generator=gen)
        seen += opt.state[model.x]["hessian"]  # beta2 = 0: h is the (clamped) estimate itself
    torch.testing.assert_close(seen / 400, torch.tensor([2.0, 2.0, 6.0]), rtol=0.12, atol=0)
    assert model.x.grad is None


def test_hutchinson_refuses_sharded_parameters_with_a_clear_error():
    model = _Quadratic()
    model.x._is_flat_param = True  # what FSDP's flat parameters look like
    opt = SophiaG(model.parameters())
    with pytest.raises(NotImplementedError, match="estimator='gnb'"):
        estimate_hessian(model, {}, opt, estimator="hutchinson", loss_fn=_Quadratic.loss)


class _SoftmaxModel(torch.nn.Module):
    """logits[b, t] = W x(input_ids[b, t]) with fixed random token features x: a one-layer softmax model."""

    def __init__(self, vocab_in: int = 6, dim: int = 4, classes: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("features", torch.randn(vocab_in, dim, generator=gen))
        self.W = torch.nn.Parameter(0.7 * torch.randn(classes, dim, generator=gen))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.features[input_ids] @ self.W.T)


def _toy_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (3, 5), generator=gen)
    labels = torch.randint(0, 5, (3, 5), generator=gen)
    labels[:, :2] = -100
    labels[2, 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_gnb_matches_the_exact_gauss_newton_diagonal_of_a_softmax_model():
    model, batch = _SoftmaxModel(), _toy_batch()
    # exact GN diagonal of the mean CE over the loss-bearing positions t (label at t + 1 != -100)
    mask = batch["labels"][:, 1:] != -100
    x = model.features[batch["input_ids"][:, :-1][mask]]  # [B, dim]
    p = torch.softmax(x @ model.W.detach().T, dim=-1)  # [B, classes]
    exact = ((p * (1 - p)).T @ (x**2)) / mask.sum()  # [classes, dim]

    opt = SophiaG(model.parameters(), betas=(0.9, 0.0))
    gen, n, total = torch.Generator().manual_seed(2), 1500, torch.zeros_like(exact)
    for _ in range(n):
        info = estimate_hessian(model, batch, opt, generator=gen)
        total += opt.state[model.W]["hessian"]
    assert info["tokens"] == int(mask.sum()) == 8
    rel = ((total / n - exact).abs() / exact).mean()
    assert rel < 0.10


def test_gnb_scale_is_the_number_of_loss_bearing_tokens():
    model, batch = _SoftmaxModel(), _toy_batch()
    tokens = gnb_backward(model, batch, generator=torch.Generator().manual_seed(5))
    g = model.W.grad.clone()
    model.W.grad = None
    opt = SophiaG(model.parameters(), betas=(0.9, 0.0))
    estimate_hessian(model, [batch], opt, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(opt.state[model.W]["hessian"], tokens * g * g)


def test_estimate_hessian_restores_grads_and_leaves_the_training_backward_unchanged():
    model, _ = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    answer_nll(model, batch).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for estimator in ("gnb", "hutchinson"):
        opt = SophiaG(model.parameters(), estimator=estimator)
        estimate_hessian(model, batch, opt)  # grads present before: put back untouched
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, reference[n]), n
        assert all(float(s["hessian"].max()) > 0 for s in opt.state.values())
    model.zero_grad(set_to_none=True)
    opt = SophiaG(model.parameters())
    estimate_hessian(model, batch, opt)
    assert all(p.grad is None for p in model.parameters())
    answer_nll(model, batch).backward()  # the loop's own backward sees no leftover
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n])
    opt.step()
    assert 0.0 <= opt.last_stats["clip_fraction"] <= 1.0


def test_estimate_hessian_errors():
    model, batch = _SoftmaxModel(), _toy_batch()
    with pytest.raises(TypeError, match="SophiaG"):
        estimate_hessian(model, batch, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"inside SophiaG\.step"):
        estimate_hessian(model, batch, SophiaG(model.parameters(), estimator="gradsq"))
    with pytest.raises(ValueError, match="unknown Hessian estimator 'newton'"):
        estimate_hessian(model, batch, SophiaG(model.parameters()), estimator="newton")
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no loss-bearing tokens"):
        estimate_hessian(model, empty, SophiaG(model.parameters()))
    with pytest.raises(KeyError, match=r"batch 1 .* lacks \[.labels.\]"):
        estimate_hessian(model, [batch, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}],
                         SophiaG(model.parameters()))


def test_clip_fraction_and_tokens_are_reduced_over_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, batch = _SoftmaxModel(), _toy_batch()
        opt = SophiaG(model.parameters(), foreach=True)
        assert estimate_hessian(model, batch, opt)["tokens"] == 8
        model.W.grad = torch.ones_like(model.W)
        opt.step()
        stats = opt.last_stats
        assert 0.0 <= stats["clip_fraction"] <= 1.0 and stats["h_max"] >= stats["h_mean"] > 0
    finally:
        dist.destroy_process_group()
