"""K-FAC / EK-FAC curvature (soul.optim.kfac) against explicitly built Gauss-Newton matrices, in float64.

Oracles: the GGN of the mean per-token loss, (1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, with J built by
torch.func.jacrev (one layer) or one autograd.grad per (loss token, class) (tiny Llama) — never through the
hooks under test. Where K-FAC is exact (one layer, one loss token, the expectation over labels taken exactly)
its damped inverse must equal (GGN + λI)⁻¹g to 1e-8; elsewhere EK-FAC's eigenvalues must equal the GGN
block's diagonal in the Kronecker eigenbasis, which makes its Frobenius error ≤ K-FAC's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from soul.optim import KroneckerCurvature, covered_modules, fit_kfac, gnb_backward
from soul.testing import tiny_model

from . import kfac_worker
from .kfac_worker import SEQUENCES, make_batch, tiny_llama64

DT = torch.float64
REPO = Path(__file__).resolve().parents[2]


class _OneLayer(torch.nn.Module):
    """Frozen embedding -> one linear layer (nn.Linear or GPT-2's Conv1D) -> logits: K-FAC's exact case."""

    def __init__(self, layer: str, dim: int = 3, vocab: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim).requires_grad_(False)
        if layer == "conv1d":
            self.proj = Conv1D(vocab, dim)  # weight (dim, vocab): y = x W + b
        else:
            self.proj = torch.nn.Linear(dim, vocab, bias=layer == "linear_bias")
        with torch.no_grad():
            for p in self.proj.parameters():
                p.copy_(torch.randn_like(p) * 1.5)
        self.double()

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.proj(self.embed(input_ids)))


def _proj_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("layer", ["linear", "linear_bias", "conv1d"])
def test_exact_case_inverse_equals_damped_ggn_inverse(layer, kind):
    """One layer, one loss token (position 1's different input must be masked), exact label expectation:
    G ⊗ A = Jᵀ H J exactly, so (C + λ)⁻¹g = (GGN + λI)⁻¹g for an absolute and a relative λ, and Cg = GGN g."""
    model = _OneLayer(layer)
    batch = {"input_ids": torch.tensor([[3, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 2]])}
    curv = fit_kfac(model, [batch], kind=kind, fisher="exact")
    params = _proj_params(model)
    names = list(params)
    assert set(curv._block_of) == set(names) and not curv.diag  # the whole layer is one Kronecker block

    def logits(p):
        return torch.func.functional_call(model, p, (batch["input_ids"],)).logits[0, 0]

    jac = torch.func.jacrev(logits)({n: p.detach() for n, p in params.items()})
    J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)  # (V, P)
    p = torch.softmax(logits(params).detach(), -1)
    ggn = J.t() @ (torch.diag(p) - torch.outer(p, p)) @ J  # B = 1 loss token
    P = ggn.shape[0]
    g = {n: torch.randn_like(t) for n, t in params.items()}
    errors = []
    for damping, lam in ((0.05, 0.05), (None, 0.3 * float(torch.trace(ggn)) / P)):
        kwargs = {"damping": damping} if damping is not None else {"damping_relative": 0.3}
        got = _flat(curv.inverse_apply(g, **kwargs), names)
        want = torch.linalg.solve(ggn + lam * torch.eye(P, dtype=DT), _flat(g, names))
        errors.append(float((got - want).abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(_flat(curv.apply(g), names), ggn @ _flat(g, names), rtol=0, atol=1e-10)
    print(f"\n{layer}/{kind}: max |K-FAC inverse - (GGN+λI)^-1 g| = {max(errors):.2e}")


def test_sampled_labels_converge_to_the_exact_factors():
    """fisher="mc": G is a mean of k i.i.d. draws Ĝ_s = (1/B) Σ_t u_t u_tᵀ (u_t = p_t − e_ŷ); its squared
    Frobenius error has expectation σ²/k with σ² = (1/B²) Σ_t (Σ_y p_ty ‖p_t − e_y‖⁴ − ‖H_t‖²_F), computed
    exactly here. The error must stay under 4σ/√k (Chebyshev: fails by chance with probability ≤ 1/16) and
    fall with k; A does not depend on the labels."""
    model = _OneLayer("linear_bias")
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4], [4, 0, 2, 1]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])}
    exact = fit_kfac(model, [batch], fisher="exact").blocks["proj"]
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits[:, :-1][batch["labels"][:, 1:] != -100]
    probs = torch.softmax(logits, -1)
    B, V = probs.shape
    eye = torch.eye(V, dtype=DT)
    var = sum(float((probs[t] * ((probs[t] - eye) ** 2).sum(1) ** 2).sum())
              - float(((torch.diag(probs[t]) - torch.outer(probs[t], probs[t])) ** 2).sum()) for t in range(B)) / B**2
    sigma = var**0.5
    errors = {}
    for k in (10, 100, 3000):
        block = fit_kfac(model, [batch], fisher="mc", mc_samples=k, seed=1).blocks["proj"]
        torch.testing.assert_close(block.A, exact.A, rtol=0, atol=1e-14)
        errors[k] = float(torch.linalg.norm(block.G - exact.G))
        assert errors[k] <= 4 * sigma / k**0.5, (k, errors[k], sigma)
    assert errors[3000] < errors[100] < errors[10]
    assert errors[3000] < 0.05 * float(torch.linalg.norm(exact.G))
    print(f"\nmc G error (Frobenius) by samples: {errors}; sigma/sqrt(k) at 3000: {sigma / 3000**0.5:.2e}")


def _exact_ggn(model, batch):
    """(1/B) Σ_i J_iᵀ H_i J_i over all trainable parameters, J from one autograd.grad per (token, class)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    positions = mask.nonzero().tolist()
    total = None
    for n, t in positions:
        z = logits[n, t]
        p = torch.softmax(z.detach(), -1)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(z[c], params, retain_graph=True)])
                for c in range(z.shape[0])]
        J = torch.stack(rows)
        term = J.t() @ (torch.diag(p) - torch.outer(p, p)) @ J
        total = term if total is None else total + term
    sizes = [p.numel() for p in params]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    return total / len(positions), {n: (offsets[n], offsets[n] + s) for n, s in zip(names, sizes)}


def test_ekfac_is_the_ggn_diagonal_in_the_eigenbasis_and_beats_kfac_on_a_tiny_llama():
    model = tiny_llama64()
    batch = make_batch(SEQUENCES)  # prompts and right padding
    kfac = fit_kfac(model, [batch], kind="kfac", fisher="exact")
    ekfac = fit_kfac(model, [batch], kind="ekfac", fisher="exact")
    ggn, span = _exact_ggn(model, batch)
    assert len(kfac.blocks) == 14  # q, k, v, o, gate, up, down in 2 layers
    err_k = err_e = norm = 0.0
    inv_k = inv_e = inv_norm = 0.0
    lam_rel = 0.1
    for module, b in kfac.blocks.items():
        lo, hi = span[b.weight]
        block = ggn[lo:hi, lo:hi]
        eb = ekfac.blocks[module]
        Q = torch.kron(eb.QG, eb.QA)
        # EK-FAC's eigenvalues are exactly the GGN block's diagonal in its Kronecker eigenbasis
        torch.testing.assert_close(eb.S.reshape(-1), torch.diagonal(Q.t() @ block @ Q), rtol=1e-9, atol=1e-12)
        dense_k = torch.kron(b.G, b.A)
        dense_e = Q @ torch.diag(eb.S.reshape(-1)) @ Q.t()
        ek, ee = float(torch.linalg.norm(dense_k - block)), float(torch.linalg.norm(dense_e - block))
        assert ee <= ek * (1 + 1e-12), module
        err_k, err_e, norm = err_k + ek**2, err_e + ee**2, norm + float(torch.linalg.norm(block)) ** 2
        # the damped inverse applied to a vector, against the exact block's (same per-block relative damping)
        v = torch.randn(hi - lo, dtype=DT)
        lam = lam_rel * float(torch.trace(block)) / (hi - lo)
        want = torch.linalg.solve(block + lam * torch.eye(hi - lo, dtype=DT), v)
        inv_norm += float(torch.linalg.norm(want)) ** 2
        for curv, acc in ((kfac, "k"), (ekfac, "e")):
            got = curv.inverse_apply({b.weight: v.view_as(model.get_parameter(b.weight))},
                                     damping_relative=lam_rel)[b.weight].reshape(-1)
            e = float(torch.linalg.norm(got - want)) ** 2
            inv_k, inv_e = (inv_k + e, inv_e) if acc == "k" else (inv_k, inv_e + e)
    assert err_e < err_k
    # parameters outside the blocks (tied embedding, norms): the exact GGN diagonal
    for name, h in ekfac.diag.items():
        lo, hi = span[name]
        torch.testing.assert_close(h.reshape(-1), torch.diagonal(ggn[lo:hi, lo:hi]), rtol=1e-9, atol=1e-14)
    print(f"\nrelative Frobenius error of the block-diagonal GGN: K-FAC {(err_k / norm) ** 0.5:.4f}, "
          f"EK-FAC {(err_e / norm) ** 0.5:.4f}; relative error of (C+λ)^-1 v (λ = 0.1 mean eigenvalue): "
          f"K-FAC {(inv_k / inv_norm) ** 0.5:.4f}, EK-FAC {(inv_e / inv_norm) ** 0.5:.4f}")


def _factors(curv):
    out = {"tokens": torch.tensor(float(curv.tokens))}
    for m, b in curv.blocks.items():
        out.update({f"{m}.A": b.A, f"{m}.G": b.G})
        if b.S is not None:
            out[f"{m}.S"] = b.S
    out.update({f"diag.{n}": h for n, h in curv.diag.items()})
    return out


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_masked_tokens_and_padding_leave_the_factors_unchanged(fisher):
    """Adding, with arbitrary content, an attended trailing token with label -100, padding positions
    (attention 0) and a whole row without labels changes no factor: they are masked in the hooks and the
    token count is the loss-bearing one. With fisher="mc" the same seed gives the same draws."""
    model = tiny_llama64()
    base = make_batch(SEQUENCES)
    extra = [([*ids, 7], prompt) for ids, prompt in SEQUENCES]
    noisy = make_batch([*extra, ([9, 3, 3, 6, 1], 5)], length=base["input_ids"].shape[1] + 3, pad_ids=[5, 10, 4])
    for row, (ids, _) in enumerate(SEQUENCES):
        noisy["labels"][row, len(ids)] = -100  # the appended, attended token carries no loss
    assert (noisy["labels"] != -100).sum() == (base["labels"] != -100).sum()
    want = _factors(fit_kfac(model, [base], kind="ekfac", fisher=fisher, seed=3))
    got = _factors(fit_kfac(model, [noisy], kind="ekfac", fisher=fisher, seed=3))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-14, msg=key)


def test_diagonal_part_is_the_gnb_estimate_from_the_same_draws():
    """Parameters outside the blocks get GNB's B ĝ⊙ĝ averaged over draws: the estimate
    estimate_hessian(estimator="gnb", samples=3) forms from gnb_backward with the same generator."""
    model = tiny_llama64()
    batch = make_batch(SEQUENCES[:2])
    curv = fit_kfac(model, [batch], fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(11))
    assert sorted(curv.diag) == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                 "model.layers.0.post_attention_layernorm.weight",
                                 "model.layers.1.input_layernorm.weight",
                                 "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"]
    gen = torch.Generator().manual_seed(11)
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in curv.diag}
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        tokens = gnb_backward(model, batch, generator=gen)
        for n in want:
            want[n] += tokens * params[n].grad**2 / 3
    model.zero_grad(set_to_none=True)
    for n, h in curv.diag.items():
        torch.testing.assert_close(h, want[n], rtol=1e-10, atol=1e-16, msg=n)


def test_two_gloo_processes_give_one_process_factors(tmp_path):
    """Rank 0 holds 12 loss tokens, rank 1 holds 4: the all-reduced factors (sums over the global token
    count) and EK-FAC corrections equal one process's on all four sequences — a mean of per-process means,
    or no all-reduce, would not. Compared as operators (apply / inverse_apply of a fixed vector), since
    eigenvectors are defined up to sign."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(Path(kfac_worker.__file__)), "--rank", str(r), "--world", "2",
                               "--store", str(store), "--out", str(tmp_path / f"rank{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    reference = kfac_worker.fit_states([0, 1, 2, 3])  # meanwhile, in this process
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    model = tiny_llama64()
    torch.manual_seed(0)
    vec = [torch.randn_like(p) for p in model.parameters()]
    for fisher in kfac_worker.FISHERS:
        ref = KroneckerCurvature.from_state_dict(model, reference[fisher])
        assert ref.tokens == 16
        for r in (0, 1):
            got = KroneckerCurvature.from_state_dict(model, torch.load(tmp_path / f"rank{r}.pt")[fisher])
            assert got.tokens == 16
            for m, b in ref.blocks.items():
                torch.testing.assert_close(got.blocks[m].A, b.A, rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(got.blocks[m].G, b.G, rtol=1e-12, atol=1e-15)
            for fn in (lambda c: c.apply(vec), lambda c: c.inverse_apply(vec, damping=1e-3)):
                for x, y in zip(fn(got), fn(ref)):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_covered_modules_llama_and_gpt2():
    llama, _ = tiny_model("llama")
    names = covered_modules(llama)
    assert len(names) == 14 and all(n.split(".")[-1] in
                                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
                                    for n in names)
    gpt2, _ = tiny_model("gpt2")
    names = covered_modules(gpt2)  # Conv1D projections; the tied lm_head is left to the diagonal
    assert names == [f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(ValueError, match="'lm_head' shares its weight"):
        covered_modules(gpt2, ["lm_head"])
    with pytest.raises(ValueError, match=r"'transformer\.wte' is a Embedding"):
        covered_modules(gpt2, ["transformer.wte"])
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        covered_modules(gpt2, ["nope"])


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_state_dict_round_trip_and_nbytes(kind):
    model = tiny_llama64()
    curv = fit_kfac(model, [make_batch(SEQUENCES[:2])], kind=kind, mc_samples=2)
    vec = [torch.randn_like(p) for p in model.parameters()]
    again = KroneckerCurvature.from_state_dict(model, curv.state_dict())
    for fn in (lambda c: c.inverse_apply(vec), lambda c: c.apply(vec)):
        for x, y in zip(fn(again), fn(curv)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    manual = sum(t.numel() * t.element_size() for b in curv.blocks.values() for t in b.tensors())
    manual += sum(h.numel() * h.element_size() for h in curv.diag.values())
    assert curv.nbytes() == manual > 0


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_gpt2_conv1d_blocks_in_float32(kind):
    """A real GPT-2 (Conv1D, in != out, biases, float32 factors): the inverse undoes the damped product,
    (C + λ)⁻¹(Cv + λv) = v, for every trainable parameter (blocks and diagonal)."""
    model, _ = tiny_model("gpt2")
    batch = {"input_ids": torch.tensor([[5, 17, 40, 99, 7, 3], [8, 8, 61, 2, 250, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, -100, 40, 99, 7, 3], [-100, 8, 61, 2, 250, -100]])}
    curv = fit_kfac(model, [batch], kind=kind)
    blocks = curv.blocks["transformer.h.0.attn.c_attn"]
    assert blocks.transposed and blocks.A.shape == (33, 33) and blocks.G.shape == (96, 96)
    assert blocks.A.dtype == torch.float32 and "transformer.wte.weight" in curv.diag
    torch.manual_seed(0)
    vec = [torch.randn_like(p) for p in curv.params]
    lam = 0.5
    damped = [cv + lam * v for cv, v in zip(curv.apply(vec), vec)]
    for got, v in zip(curv.inverse_apply(damped, damping=lam), vec):
        torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise_clear_errors():
    model = _OneLayer("linear_bias")
    batch = {"input_ids": torch.tensor([[3, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 2]])}
    with pytest.raises(ValueError, match=r"kind must be one of \['kfac', 'ekfac'\], got 'shampoo'"):
        fit_kfac(model, [batch], kind="shampoo")
    with pytest.raises(ValueError, match=r"fisher must be one of \['mc', 'empirical', 'exact'\], got 'true'"):
        fit_kfac(model, [batch], fisher="true")
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1, got 0"):
        fit_kfac(model, [batch], mc_samples=0)
    with pytest.raises(ValueError, match="no loss-bearing tokens"):
        fit_kfac(model, [dict(batch, labels=torch.full_like(batch["labels"], -100))])
    curv = fit_kfac(model, [batch])
    g = {n: torch.ones_like(p) for n, p in _proj_params(model).items()}
    for bad in (0, -1.0, float("nan"), float("inf"), "big"):
        with pytest.raises(ValueError, match=r"damping must be a finite number > 0, got"):
            curv.inverse_apply(g, damping=bad)
        with pytest.raises(ValueError, match=r"damping_relative must be a finite number > 0, got"):
            curv.inverse_apply(g, damping_relative=bad)
    with pytest.raises(ValueError, match="not both"):
        curv.inverse_apply(g, damping=1.0, damping_relative=0.1)
    with pytest.raises(ValueError, match=r"unknown parameter names \['embed.weight'\]"):
        curv.inverse_apply({"embed.weight": torch.ones(5, 3)})
    with pytest.raises(ValueError, match=r"give both 'proj\.weight' and 'proj\.bias'"):
        curv.inverse_apply({"proj.weight": g["proj.weight"]})
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        curv.apply([g["proj.weight"]])
