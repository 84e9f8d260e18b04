"""Quantization attack: round the unlearned model's weights to a few bits and look at the forget set again.

Unlearning by small weight changes can sit below the resolution of a 4-bit grid: rounding snaps the weights
back towards the target model's and the forgotten answers return (Zhang et al., 2024, "Does your LLM truly
unlearn?"). `quantize_model_` applies **round-to-nearest, group-wise** weight quantization and stores the
dequantized values back in float ("fake quantization"): for every linear layer, each output row is cut into
groups of `group_size` consecutive input weights, and each group is rounded to 2^bits levels

* asymmetric (default, min-max, as int4 RTN baselines and llama.cpp's Q4_1):
  ``s = (max − min) / (2^b − 1)``, ``z = round(−min / s)``, ``q = clamp(round(w / s) + z, 0, 2^b − 1)``,
  ``ŵ = (q − z) · s``;
* symmetric (``symmetric=True``, absmax, as bitsandbytes/Q4_0): ``s = max|w| / (2^(b−1) − 1)``,
  ``q = clamp(round(w / s), −2^(b−1), 2^(b−1) − 1)``, ``ŵ = q · s``.

A row whose length is not a multiple of `group_size` ends in one shorter group; `group_size` larger than a
row means one group per row (per-channel quantization).

Why fake quantization and not a library: the forget metrics depend only on the values ŵ the model computes
with, and an integer kernel computes with exactly these (up to the order of float accumulation), so the
metrics are those of the quantized model. Checked on this machine (torch 2.13 CPU): optimum-quanto 0.2.7
installs and its dequantized int8 weights (per-channel absmax) are identical to ours with ``symmetric=True``
and one group per row (0 steps apart on a tiny Llama), but its first int4 forward spent 46 s compiling a
C++ extension (it needs a compiler at run time) and it offers 2/4/8 bits only; torchao 0.18's compiled
kernels did not load against this torch and its CPU int4 path needs bf16 and special layouts; bitsandbytes
needs a GPU. Fake quantization keeps the model a plain transformers model, so the fast scoring paths of
`soul.eval.scoring` still apply, and runs in milliseconds on a 135M model.

By default the embeddings and the output layer (``lm_head``, tied to the embeddings in SmolLM2/Llama-style
small models) are left in float, as weight-only quantization schemes usually do; ``include_embeddings=True``
quantizes them too (grouped along the hidden dimension).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

MIN_BITS, MAX_BITS = 2, 8


def _check(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def _round_groups(groups: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest of every row of `groups` [N, g] (float32) on its own 2^bits-level grid, dequantized."""
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (groups.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(tiny)
        return torch.clamp(torch.round(groups / scale), -qmax - 1, qmax) * scale
    levels = 2**bits - 1
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(tiny)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(groups / scale) + zero, 0, levels) - zero) * scale


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int = 128, *, symmetric: bool = False) -> torch.Tensor:
    """`weight` [rows, cols] rounded group-wise along each row (groups of `group_size` columns), dequantized.

    Returns a new tensor of `weight`'s dtype; the rounding is computed in float32.
    """
    _check(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    rows, cols = w.shape
    g = min(group_size, cols)
    full = cols - cols % g
    out = torch.empty_like(w)
    if full:
        out[:, :full] = _round_groups(w[:, :full].reshape(-1, g), bits, symmetric).reshape(rows, full)
    if full < cols:  # the shorter last group of each row
        out[:, full:] = _round_groups(w[:, full:], bits, symmetric)
    return out.to(weight.dtype)


def _quantizable(model: torch.nn.Module, include_embeddings: bool) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(name, weight, transposed) of each weight to quantize, each shared tensor once."""
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, weight stored [in, out]
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    skip: set[int] = set()
    if not include_embeddings:
        for getter in ("get_output_embeddings", "get_input_embeddings"):
            module = getattr(model, getter, lambda: None)()
            if module is not None and getattr(module, "weight", None) is not None:
                skip.add(id(module.weight))
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) in seen or id(weight) in skip:
            continue
        if isinstance(module, torch.nn.Linear):
            out.append((f"{name}.weight", weight, False))
        elif Conv1D and isinstance(module, Conv1D):
            out.append((f"{name}.weight", weight, True))
        elif include_embeddings and isinstance(module, torch.nn.Embedding):
            out.append((f"{name}.weight", weight, False))
        else:
            continue
        seen.add(id(weight))
    return out


@torch.no_grad()
def quantize_model_(model: torch.nn.Module, bits: int = 4, group_size: int = 128, *, symmetric: bool = False,
                    include_embeddings: bool = False) -> dict[str, Any]:
    """Fake-quantize `model`'s linear weights in place (see the module doc); returns what was done.

    ``{"bits", "group_size", "symmetric", "include_embeddings", "tensors", "weights", "relative_error"}``
    where ``relative_error`` = ‖Ŵ − W‖ / ‖W‖ over all quantized weights.
    """
    _check(bits, group_size)
    targets = _quantizable(model, include_embeddings)
    if not targets:
        raise ValueError("the model has no linear layers to quantize")
    err_sq = norm_sq = 0.0
    count = 0
    for _, weight, transposed in targets:
        w = weight.data.t() if transposed else weight.data
        q = quantize_dequantize(w, bits, group_size, symmetric=symmetric)
        err_sq += float((q.float() - w.float()).square().sum())
        norm_sq += float(w.float().square().sum())
        count += w.numel()
        weight.data.copy_(q.t() if transposed else q)
    return {"bits": bits, "group_size": group_size, "symmetric": symmetric,
            "include_embeddings": include_embeddings, "tensors": len(targets), "weights": count,
            "relative_error": (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0}


def quantized_copy(model: torch.nn.Module, bits: int, group_size: int = 128, *, symmetric: bool = False,
                   include_embeddings: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fake-quantized copy of `model` (the model itself is untouched) and `quantize_model_`'s record."""
    quantized = copy.deepcopy(model)
    info = quantize_model_(quantized, bits, group_size, symmetric=symmetric, include_embeddings=include_embeddings)
    return quantized.eval(), info
