"""Per-run optimizer diagnostics: how far and how an optimizer moved the weights, so that a comparison where
one optimizer simply took larger steps is visible next to its forget quality.

Keys (each a float, or None when the run did not record it):

* ``mean_clip_fraction`` — mean over steps of the fraction of coordinates whose Sophia ratio was clipped
  (a sign step); None for optimizers without clipping;
* ``rho`` — the ρ the optimizer used (the last logged value: with ``rho: auto`` the chosen one);
* ``update_norm_mean`` / ``update_norm_total`` — mean and sum over steps of ‖Δθ_t‖₂, the norm of one
  step's weight update;
* ``displacement`` — ‖θ_T − θ_0‖₂, how far the run ended from where it started (≤ the total);
* ``update_rms_over_lr_mean`` — mean over steps of RMS(Δθ_t) / lr (1 for a pure sign step).

The training loop's own summary (the run record's ``diagnostics``) wins; what it lacks is computed from the
per-step log records (fields ``clip_fraction``, ``rho``, ``update_norm``, ``update_rms_over_lr``,
``displacement``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

DIAGNOSTIC_KEYS = ("mean_clip_fraction", "rho", "update_norm_mean", "update_norm_total", "displacement",
                   "update_rms_over_lr_mean")


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def diagnostics_from_log(log: Iterable[dict[str, Any]]) -> dict[str, float | None]:
    """The diagnostics of one run from its per-step training records (non-train records are skipped)."""
    steps = [r for r in log if isinstance(r, dict) and r.get("kind", "train") == "train"]
    norms = _finite(r.get("update_norm") for r in steps)
    rhos = _finite(r.get("rho") for r in steps)
    disp = _finite(r.get("displacement") for r in steps)
    return {"mean_clip_fraction": _mean(_finite(r.get("clip_fraction") for r in steps)),
            "rho": rhos[-1] if rhos else None,
            "update_norm_mean": _mean(norms), "update_norm_total": sum(norms) if norms else None,
            "displacement": disp[-1] if disp else None,
            "update_rms_over_lr_mean": _mean(_finite(r.get("update_rms_over_lr") for r in steps))}


def run_diagnostics(summary: dict[str, Any] | None, log: Iterable[dict[str, Any]],
                    config: dict[str, Any] | None = None) -> dict[str, float | None]:
    """The run's diagnostics: `summary` (the loop's ``record["diagnostics"]``) where it has a value, else
    from `log`; ρ falls back to a numeric ``rho`` option of `config` (what the optimizer was given)."""
    out = diagnostics_from_log(log)
    for key in DIAGNOSTIC_KEYS:
        value = (summary or {}).get(key)
        if _finite([value]):
            out[key] = float(value)
    rho = (config or {}).get("rho")
    if out["rho"] is None and _finite([rho]):
        out["rho"] = float(rho)
    return out
