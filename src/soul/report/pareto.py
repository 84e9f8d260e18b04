"""Pareto front of forget quality vs model utility, and the best forget quality at a utility floor.

Both axes are "higher is better". Point q *dominates* p when fq_q ≥ fq_p and mu_q ≥ mu_p with at least
one strict inequality; the Pareto front is the set of points no other point dominates. A single setting
per method hides this trade-off (one can always buy forget quality with utility), which is why sweeps
report the front and the best forget quality among settings keeping utility ≥ 95 % of the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FQ = "forget_quality"
MU = "model_utility"


def _num(point: dict[str, Any], key: str, i: int) -> float:
    v = point.get(key)
    if not isinstance(v, int | float):
        raise ValueError(f"point {i} ({point.get('name', '?')}): '{key}' must be a number, got {v!r}")
    return float(v)


def dominates(q: dict[str, Any], p: dict[str, Any]) -> bool:
    """True when q is at least as good as p on both axes and strictly better on one."""
    return q[FQ] >= p[FQ] and q[MU] >= p[MU] and (q[FQ] > p[FQ] or q[MU] > p[MU])


def pareto_front(points: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the non-dominated points, sorted by increasing model utility (ties: by forget quality).

    Duplicated points are all on the front (neither dominates the other). O(n²), fine for sweep sizes.
    """
    for i, p in enumerate(points):
        _num(p, FQ, i)
        _num(p, MU, i)
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][MU], points[i][FQ], i))


def best_at_utility(points: Sequence[dict[str, Any]], target_utility: float, fraction: float = 0.95,
                    group_key: str = "optimizer") -> dict[str, int | None]:
    """Per group (e.g. optimizer): index of the point with the highest forget quality among those with
    model utility ≥ ``fraction × target_utility``; ties go to the higher utility, then the earlier point.
    A group with no qualifying point maps to None."""
    if not 0 < fraction <= 1:
        raise ValueError(f"utility fraction must be in (0, 1], got {fraction}")
    floor = fraction * target_utility
    best: dict[str, int | None] = {}
    for i, p in enumerate(points):
        group = str(p.get(group_key))
        best.setdefault(group, None)
        fq, mu = _num(p, FQ, i), _num(p, MU, i)
        if mu < floor - 1e-12:  # tolerance: 0.95 × 0.8 is 0.76000000000000001 in floating point
            continue
        j = best[group]
        if j is None or (fq, mu) > (points[j][FQ], points[j][MU]):
            best[group] = i
    return best
