"""`build_optimizer(name, params, **cfg)`: one factory for every optimizer an objective can be run with."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from soul.optim.sophia import SophiaG


def _adamw(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **cfg)


def _sgd(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **cfg)


def _sophia(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    if "gamma" in cfg:  # the Sophia paper's name for rho
        if "rho" in cfg:
            raise ValueError("sophia: give either 'rho' or its alias 'gamma', not both")
        cfg["rho"] = cfg.pop("gamma")
    return SophiaG(params, **cfg)


# name -> (builder, the class whose constructor defines the accepted options)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], type]] = {
    "adamw": (_adamw, torch.optim.AdamW),
    "sgd": (_sgd, torch.optim.SGD),
    "sophia": (_sophia, SophiaG),
}
_ALIASES = {"sophiag": "sophia", "sophia-g": "sophia", "adam_w": "adamw"}
_EXTRA_OPTIONS = {"sophia": {"gamma"}}


def optimizer_options(name: str) -> list[str]:
    """The keyword options `build_optimizer(name, ...)` accepts."""
    _, cls = OPTIMIZERS[name]
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    return sorted(set(names) | _EXTRA_OPTIONS.get(name, set()))


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                    **cfg: Any) -> torch.optim.Optimizer:
    """Build ``adamw`` (torch.optim.AdamW), ``sgd`` (torch.optim.SGD) or ``sophia`` (:class:`SophiaG`).

    ``cfg`` are the constructor's keyword options (``lr``, ``weight_decay``, ``betas``, ...); lists from
    YAML are turned into tuples for ``betas``. Unknown names and options raise ``ValueError``.
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    allowed = optimizer_options(key)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for optimizer {key!r}; accepted: {allowed}")
    if isinstance(cfg.get("betas"), list):
        cfg["betas"] = tuple(cfg["betas"])
    builder, _ = OPTIMIZERS[key]
    return builder(params, **cfg)
