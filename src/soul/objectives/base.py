"""The objective protocol: `Objective` (coefficients, input checks) and `ObjectiveOutput`.

An objective is called as ``objective(model, forget_batch, retain_batch=None, ref_model=None)`` and returns
``ObjectiveOutput(loss, parts)``: the scalar loss to minimise (with its autograd graph) and the unweighted
terms as plain floats for logging. The attributes ``needs_retain``, ``needs_reference`` and ``needs_refusal``
tell the training loop what it must provide; a call without them fails with a message naming the objective
and the missing input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

BATCH_KEYS = ("input_ids", "attention_mask", "labels")

# Value rules per coefficient name. A weight below zero would flip its term's direction (ascent ↔ descent);
# beta is an inverse temperature and must be positive; delta (a margin) may be any finite number.
_RULES: dict[str, tuple[str, Any]] = {
    "alpha": (">= 0", lambda v: v >= 0),
    "gamma": (">= 0", lambda v: v >= 0),
    "beta": ("> 0", lambda v: v > 0),
}


@dataclass
class ObjectiveOutput:
    """The loss to minimise and its named, unweighted terms (detached floats) for logging."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def _coefficient(objective: str, name: str, value: Any) -> float:
    """Validate one coefficient and return it as a float (numeric strings from YAML, e.g. '1e-3', accepted)."""
    if isinstance(value, bool):
        raise ValueError(f"objective {objective!r}: coefficient {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"objective {objective!r}: coefficient {name!r} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"objective {objective!r}: coefficient {name!r} must be finite, got {value!r}")
    if name in _RULES:
        rule, ok = _RULES[name]
        if not ok(number):
            raise ValueError(f"objective {objective!r}: coefficient {name!r} must be {rule}, got {value!r}")
    return number


class Objective:
    """Base class of unlearning objectives.

    Subclasses set ``name``, ``defaults`` (coefficient name → default value, documented in the subclass)
    and the ``needs_*`` flags, and implement :meth:`compute`. Coefficients become attributes
    (``obj.alpha``, ``obj.beta`` …). For an objective with a retain term weighted by ``alpha``,
    ``alpha == 0`` switches the term off: ``needs_retain`` is then False and no retain forward is run.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {}
    needs_retain: bool = False
    needs_reference: bool = False
    needs_refusal: bool = False

    def __init__(self, **coeffs: Any) -> None:
        unknown = sorted(set(coeffs) - set(self.defaults))
        if unknown:
            expected = f"expected one of {sorted(self.defaults)}" if self.defaults else "it takes no coefficients"
            raise ValueError(f"objective {self.name!r} has no coefficient {unknown[0]!r}; {expected}")
        for key, default in self.defaults.items():
            setattr(self, key, _coefficient(self.name, key, coeffs.get(key, default)))
        if type(self).needs_retain and "alpha" in self.defaults:
            self.needs_retain = self.alpha != 0

    @property
    def coefficients(self) -> dict[str, float]:
        """The coefficient values in use (for run records)."""
        return {key: getattr(self, key) for key in self.defaults}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.coefficients.items())
        return f"{type(self).__name__}({args})"

    def __call__(
        self,
        model: torch.nn.Module,
        forget_batch: Mapping[str, Any],
        retain_batch: Mapping[str, Any] | None = None,
        ref_model: torch.nn.Module | None = None,
    ) -> ObjectiveOutput:
        check_batch(forget_batch, self.name, "forget batch")
        if self.needs_refusal:
            if not isinstance(forget_batch, Mapping) or "refusal" not in forget_batch:
                raise ValueError(
                    f"objective {self.name!r} needs refusal answers: forget_batch['refusal'] is missing "
                    "(build the forget data with refusals, e.g. QADataset(..., refusals=load_refusals()))"
                )
            refusal = forget_batch["refusal"]
            check_batch(refusal, self.name, "refusal batch forget_batch['refusal']")
            if refusal["input_ids"].shape[0] != forget_batch["input_ids"].shape[0]:
                raise ValueError(
                    f"objective {self.name!r}: forget_batch['refusal'] has {refusal['input_ids'].shape[0]} rows "
                    f"but the forget batch has {forget_batch['input_ids'].shape[0]}; they must pair row by row"
                )
        if self.needs_retain:
            if retain_batch is None:
                raise ValueError(
                    f"objective {self.name!r} needs a retain batch (retain_batch=None); "
                    "give retain data, or set alpha=0 to drop the retain term"
                )
            check_batch(retain_batch, self.name, "retain batch")
        if self.needs_reference and ref_model is None:
            raise ValueError(
                f"objective {self.name!r} needs a reference model (ref_model=None): "
                "pass a frozen copy of the model before unlearning"
            )
        return self.compute(model, forget_batch, retain_batch, ref_model)

    def compute(
        self,
        model: torch.nn.Module,
        forget_batch: Mapping[str, Any],
        retain_batch: Mapping[str, Any] | None,
        ref_model: torch.nn.Module | None,
    ) -> ObjectiveOutput:
        raise NotImplementedError


def check_batch(batch: Any, objective: str, role: str) -> None:
    """A batch must map input_ids/attention_mask/labels to [B, T] tensors of one shape (docs/ARCHITECTURE.md)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"objective {objective!r}: the {role} must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"objective {objective!r}: the {role} is missing {missing}; expected keys {list(BATCH_KEYS)} "
            f"(labels = -100 on prompt and padding), got {sorted(batch)}"
        )
    shapes = {}
    for key in BATCH_KEYS:
        value = batch[key]
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(
                f"objective {objective!r}: the {role}'s {key!r} must be a [B, T] tensor, got "
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
            )
        shapes[key] = tuple(value.shape)
    if len(set(shapes.values())) != 1:
        raise ValueError(f"objective {objective!r}: the {role}'s tensors differ in shape: {shapes}")
