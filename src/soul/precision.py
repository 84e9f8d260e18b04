"""Which floating-point precision a run computes in, and why.

A table must come out the same on any CPU, so presets pin ``"no"`` (float32 throughout). ``"auto"`` is for a
user who prefers speed to identical numbers: bfloat16 autocast only where the hardware computes bfloat16
natively, float32 elsewhere. An explicit ``"bf16"`` is honoured everywhere but warned about on a CPU that only
emulates it, because there it is the slow choice (measured on an AVX2 EPYC: see README, "Precision").

Native bfloat16 on a CPU means AVX512-BF16 or AMX tiles (oneDNN's bf16 kernels); without them torch converts
bf16 to float32 and back around every kernel, 2–3× slower than plain float32.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")


class PrecisionWarning(UserWarning):
    """A precision that is slower on this hardware than float32 was asked for explicitly."""


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, with the feature that says so."""
    import torch

    cpu = torch.cpu
    checks = (("AVX512-BF16", getattr(cpu, "_is_avx512_bf16_supported", None)),
              ("AMX", getattr(cpu, "_is_amx_tile_supported", None)))
    for name, check in checks:
        if check is not None and check():
            return True, name
    return False, "no AVX512-BF16 and no AMX"


def _device_type(device: str | torch.device | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_precision(requested: str, device: str | torch.device | None = None, *,
                      warn: bool = True) -> tuple[str, str]:
    """The precision to run in for `requested` on `device` (default: the GPU if there is one, else the CPU),
    and the reason, as ``(choice, reason)`` with choice one of ``"no"``, ``"bf16"``, ``"fp16"``.

    ``"auto"`` → ``"bf16"`` on a GPU that supports it or a CPU with native bfloat16, else ``"no"``. An explicit
    ``"bf16"`` on a CPU without native bfloat16 is kept and warned about (`PrecisionWarning`) with its cost.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {requested!r}")
    import torch

    kind = _device_type(device)
    if kind == "cuda":
        native = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        feature = "GPU supports bf16" if native else "GPU without bf16 support"
    elif kind == "cpu":
        native, feature = cpu_native_bf16()
    else:  # MPS, XPU …: no reliable capability check, so auto stays in float32
        native, feature = False, f"no bf16 capability check for device type {kind!r}"
    if requested == "auto":
        choice = "bf16" if native else "no"
        return choice, f"auto: {'bf16' if native else 'float32'} ({kind}: {feature})"
    if requested == "bf16" and kind == "cpu" and not native:
        if warn:
            warnings.warn(
                f"mixed_precision bf16 on a CPU without native bfloat16 ({feature}): torch emulates it, typically "
                "2-3x slower than float32; use mixed_precision 'no' (float32) or 'auto'", PrecisionWarning,
                stacklevel=2)
        return "bf16", f"explicit bf16, emulated ({kind}: {feature})"
    return requested, f"explicit {requested} ({kind}: {feature})"
