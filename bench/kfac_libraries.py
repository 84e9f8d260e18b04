"""soul's own K-FAC hooks (`soul.optim.kfac.fit_kfac`) against curvlinops-for-pytorch's KFACLinearOperator /
EKFACLinearOperator (issue 21): agreement with the exact Gauss-Newton matrix, fit time, factor memory.

1. Agreement, float64, a 2-layer Llama with hidden 8 and an 11-token vocabulary (every Linear block at most
   8 x 8, so the exact GGN fits in memory): the exact GGN of the mean per-token loss, restricted to the
   weights of the 14 attention/MLP projections, built with one autograd.grad per (token, class) — no hooks.
   Each approximation is block-diagonal over those weights; reported: the relative Frobenius error of its
   blocks against the GGN's diagonal blocks (``block_error``) and against the whole GGN restricted to those
   weights (``full_error``, cross-block terms included), and the relative difference between the two
   libraries (``vs_soul``). Both use the exact expectation over labels (soul ``fisher="exact"``, curvlinops
   ``type-2``) and K-FAC's "expand" form (each token its own example), so K-FAC should agree to rounding.
   curvlinops 3.0.1's EK-FAC takes one loss term per example (2-d outputs) only, so it cannot fit a causal
   LM's sequences: reported as ``unsupported`` with its message. curvlinops' ``type-2`` G differs from the
   expectation of its own Monte-Carlo G on sequences (it backpropagates one sqrt-Hessian column of every token
   together, so cross-token products stay; independent label draws cancel them in expectation), so part 1
   also fits both libraries' ``mc`` with ``--mc-samples`` draws: ``curvlinops_mc.vs_soul`` -> 0 (up to MC
   noise, ~``soul_mc.vs_soul``) shows the two implement the same estimator.
   Every position is a loss position here (curvlinops has no ignore_index): the sequences are plain
   next-token prediction, soul gets ``labels = input_ids``, curvlinops ``(ids[:, :-1], ids[:, 1:])``.
2. Cost, float32, a tiny Llama (hidden ``--hidden``, 2 layers, vocabulary 384), ``--batches`` batches of
   8 x 64 tokens, Monte-Carlo Fisher with one draw: wall time of the fit (median of ``--rounds``) and the
   bytes of the stored factors (eigenbases included for EK-FAC), each library fitting the same projection
   weights (soul's bytes also hold K-FAC's eigendecomposition and the GNB diagonal of the embedding and
   norms, which curvlinops does not fit). Peak resident memory of a process that only fits (``ru_maxrss``,
   one child process per fit) and how much the fit raised it (``rss_growth_mb``; at these sizes 0: the
   imports and the model set the peak).

Without curvlinops the bench prints ``{"skipped": true, "reason": ...}`` and exits 0; it then leaves an
existing measured ``--out`` file as it is (a skip never replaces a measurement).

    python bench/kfac_libraries.py --out bench/results/kfac_libraries.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch


def _curvlinops() -> Any:
    try:
        import curvlinops
    except ImportError as err:
        return str(err)
    return curvlinops


def _rms_norm_float64(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_llama(*, vocab: int, hidden: int, layers: int = 2, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> torch.nn.Module:
    """A Llama through SDPA attention, and in float64 with RMSNorm in float64 (as tests/optim/kfac_worker.py:
    HF computes softmax and norms in float32 otherwise, which would cap the agreement at ~1e-8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * (1 if hidden <= 8 else 2),
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.4,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype).eval()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_rms_norm_float64, module)
    return model


class _Logits(torch.nn.Module):
    """curvlinops' model_func: input ids -> logits as (batch, classes, positions), CrossEntropyLoss's layout."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits.transpose(1, 2)


def _projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    from soul.optim.kfac import covered_modules

    modules = dict(model.named_modules())
    return [(f"{m}.weight", modules[m].weight) for m in covered_modules(model)]


def _soul_fit(model: torch.nn.Module, ids_list: list[torch.Tensor], kind: str, fisher: str,
              mc_samples: int = 1) -> Any:
    from soul.optim.kfac import fit_kfac

    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in ids_list]
    return fit_kfac(model, batches, kind=kind, fisher=fisher, seed=0, mc_samples=mc_samples)


def _curv_fit(cl: Any, model: torch.nn.Module, ids_list: list[torch.Tensor], kind: str, fisher: str,
              mc_samples: int = 1) -> Any:
    cls = cl.KFACLinearOperator if kind == "kfac" else cl.EKFACLinearOperator
    params = [p for _, p in _projections(model)]
    data = [(ids[:, :-1], ids[:, 1:]) for ids in ids_list]
    return cls(_Logits(model), torch.nn.CrossEntropyLoss(), params, data, fisher_type=fisher, check_deterministic=False,
               num_data=sum(ids.shape[0] for ids in ids_list), mc_samples=mc_samples)


def _soul_dense_blocks(curv: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, _ in _projections(model):
        block = next(b for b in curv.blocks.values() if b.weight == name)
        if curv.kind == "kfac":
            out[name] = torch.kron(block.G, block.A)
        else:
            q = torch.kron(block.QG, block.QA)
            out[name] = q @ torch.diag(block.S.reshape(-1)) @ q.t()
    return out


def _curv_dense_blocks(op: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    proj = _projections(model)
    sizes = [p.numel() for _, p in proj]
    dense = op @ torch.eye(sum(sizes), dtype=torch.float64)
    out, lo = {}, 0
    for (name, _), n in zip(proj, sizes):
        out[name] = dense[lo:lo + n, lo:lo + n]
        lo += n
    return out


def _exact_ggn(model: torch.nn.Module, ids_list: list[torch.Tensor]) -> torch.Tensor:
    """(1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i over the projection weights (every position but the last)."""
    params = [p for _, p in _projections(model)]
    total, count = None, 0
    for ids in ids_list:
        logits = model(input_ids=ids).logits
        for n in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                z = logits[n, t]
                p = torch.softmax(z.detach(), -1)
                rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(z[c], params, retain_graph=True)])
                        for c in range(z.shape[0])]
                jac = torch.stack(rows)
                term = jac.t() @ (torch.diag(p) - torch.outer(p, p)) @ jac
                total = term if total is None else total + term
                count += 1
    assert total is not None
    return total / count


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def agreement(cl: Any, mc_samples: int) -> dict[str, Any]:
    model = tiny_llama(vocab=11, hidden=8)
    gen = torch.Generator().manual_seed(0)
    ids_list = [torch.randint(1, 11, (3, 7), generator=gen)]
    ggn = _exact_ggn(model, ids_list)
    sizes = [p.numel() for _, p in _projections(model)]
    spans, lo = [], 0
    for n in sizes:
        spans.append((lo, lo + n))
        lo += n
    diag_blocks = torch.block_diag(*[ggn[a:b, a:b] for a, b in spans])
    out: dict[str, Any] = {"model": "Llama, 2 layers, hidden 8, vocab 11, float64", "tokens": 3 * 6,
                           "parameters": sum(sizes), "blocks": len(sizes)}
    for kind in ("kfac", "ekfac"):
        t0 = time.perf_counter()
        ours = _soul_fit(model, ids_list, kind, "exact")
        t_ours = time.perf_counter() - t0
        dense_ours = torch.block_diag(*_soul_dense_blocks(ours, model).values())
        out[kind] = {"soul": {"block_error": _rel(dense_ours, diag_blocks), "full_error": _rel(dense_ours, ggn),
                              "fit_s": t_ours}}
        t0 = time.perf_counter()
        try:
            theirs = _curv_fit(cl, model, ids_list, kind, "type-2")
            _ = theirs @ torch.zeros(sum(sizes), dtype=torch.float64)  # curvlinops computes its factors lazily
        except ValueError as err:  # curvlinops 3.0.1's EK-FAC takes one loss term per example only
            out[kind]["curvlinops"] = {"unsupported": str(err)}
            continue
        t_theirs = time.perf_counter() - t0
        dense_theirs = torch.block_diag(*_curv_dense_blocks(theirs, model).values())
        out[kind]["curvlinops"] = {"block_error": _rel(dense_theirs, diag_blocks),
                                   "full_error": _rel(dense_theirs, ggn), "fit_s": t_theirs,
                                   "vs_soul": _rel(dense_theirs, dense_ours)}
        # type-2 backpropagates the same column of every token's sqrt-Hessian together, so a token's output
        # gradient mixes with the others' (cross-token terms, which sampled labels cancel in expectation):
        # its Monte-Carlo Fisher with many draws is the reference that should approach soul's exact factors.
        t0 = time.perf_counter()
        theirs_mc = _curv_fit(cl, model, ids_list, kind, "mc", mc_samples)
        dense_mc = torch.block_diag(*_curv_dense_blocks(theirs_mc, model).values())
        t_mc = time.perf_counter() - t0
        ours_mc = torch.block_diag(*_soul_dense_blocks(_soul_fit(model, ids_list, kind, "mc", mc_samples), model)
                                   .values())
        out[kind]["curvlinops_mc"] = {"mc_samples": mc_samples, "block_error": _rel(dense_mc, diag_blocks),
                                      "fit_s": t_mc, "vs_soul": _rel(dense_mc, dense_ours),
                                      "vs_curvlinops_type2": _rel(dense_mc, dense_theirs)}
        out[kind]["soul_mc"] = {"mc_samples": mc_samples, "vs_soul": _rel(ours_mc, dense_ours)}
    return out


def _factor_bytes(obj: Any) -> int:
    if hasattr(obj, "nbytes") and callable(obj.nbytes):
        return int(obj.nbytes())
    total, seen = 0, set()
    for value in vars(obj).values():
        tensors = value.values() if isinstance(value, dict) else [value]
        for t in tensors:
            if torch.is_tensor(t) and id(t) not in seen and t.dim() >= 1 and not isinstance(t, torch.nn.Parameter):
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def cost_once(library: str, kind: str, hidden: int, batches: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = tiny_llama(vocab=384, hidden=hidden, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids_list = [torch.randint(3, 384, (8, 64), generator=gen) for _ in range(batches)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if library == "soul":
        curv = _soul_fit(model, ids_list, kind, "mc")
    else:
        cl = _curvlinops()
        curv = _curv_fit(cl, model, ids_list, kind, "mc")
        curv @ torch.zeros(sum(p.numel() for _, p in _projections(model)))  # its factors are computed lazily
    seconds = time.perf_counter() - t0
    return {"fit_s": seconds, "factor_bytes": _factor_bytes(curv),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def cost(hidden: int, batches: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": f"Llama, 2 layers, hidden {hidden}, vocab 384, float32",
                           "data": f"{batches} batch(es) of 8 x 64 tokens", "fisher": "mc, 1 draw", "rounds": rounds}
    for kind in ("kfac", "ekfac"):
        for library in ("soul", "curvlinops"):
            runs = []
            for _ in range(rounds):
                proc = subprocess.run([sys.executable, __file__, "--worker", library, kind, str(hidden), str(batches)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    runs = [{"unsupported": (proc.stderr.strip().splitlines() or ["?"])[-1]}]
                    break
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if "unsupported" in runs[0]:
                out.setdefault(kind, {})[library] = runs[0]
                continue
            out.setdefault(kind, {})[library] = {
                "fit_s_median": statistics.median(r["fit_s"] for r in runs), "factor_bytes": runs[0]["factor_bytes"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "rss_growth_mb": max(r["rss_growth_mb"] for r in runs)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mc-samples", type=int, default=2000, help="draws of the Monte-Carlo references (part 1)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        library, kind, hidden, batches = args.worker
        print(json.dumps(cost_once(library, kind, int(hidden), int(batches))))
        return 0
    cl = _curvlinops()
    if isinstance(cl, str):
        result: dict[str, Any] = {"skipped": True, "reason": f"curvlinops-for-pytorch is not installed ({cl})"}
    else:
        torch.set_num_threads(1)
        from importlib.metadata import version

        result = {"skipped": False, "versions": {"torch": torch.__version__,
                                                 "curvlinops": version("curvlinops-for-pytorch"),
                                                 "python": platform.python_version()},
                  "agreement": agreement(cl, args.mc_samples), "cost": cost(args.hidden, args.batches, args.rounds)}
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "platform": platform.platform()}
    if result["skipped"] and args.out and os.path.isfile(args.out):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(Path(args.out).read_text()).get("skipped") is False:
                result["kept"] = f"{args.out} holds a measurement; not replaced by this skip"
                args.out = None
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from soul.io import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
