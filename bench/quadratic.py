"""Steps to reach f <= tol·f(x0) on a deterministic diagonal quadratic: SophiaG vs torch AdamW vs SGD.

f(x) = 1/2 Σ d_i x_i², d = logspace(0, log10(cond), n), x0 ~ N(0, 1) (seed 0), float64. Sophia is given the
exact diagonal d as its Hessian estimate every step. Each optimizer is run over a learning-rate grid (and,
for Sophia, a ρ grid) and the best step count is reported, for the default momentum and for several β1
values. Why the β1 sweep: in Sophia's unclipped regime each coordinate's (x, m) iteration has a transition
matrix of determinant β1 whatever lr, ρ and d are, so f contracts at best by β1 per step; at the default
β1 = 0.965 that is ≥ ln(1/tol)/ln(1/β1) ≈ 388 steps asymptotically for tol = 1e-6.

    .venv/bin/python bench/quadratic.py --out bench/results/quadratic.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from soul.io import write_json_atomic
from soul.testing import quadratic_steps_to_tolerance

LRS = [10**e for e in (-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0)]
SGD_LRS = [2.0e-5, 5.0e-5, 1.0e-4, 1.9e-4]  # GD is stable only for lr < 2/d_max = 2e-4 at cond 1e4
RHOS = [0.04, 1.0]


def best(kind: str, curvature: torch.Tensor, x0: torch.Tensor, *, tol: float, max_steps: int,
         **opt_kwargs) -> dict:
    grid = SGD_LRS if kind == "sgd" else LRS
    rhos = RHOS if kind == "sophia" else [None]
    runs = []
    for lr in grid:
        for rho in rhos:
            kw = dict(opt_kwargs, **({"rho": rho} if rho is not None else {}))
            steps = quadratic_steps_to_tolerance(kind, lr, curvature, x0, tol=tol, max_steps=max_steps, **kw)
            runs.append({"lr": lr, "rho": rho, "steps": steps})
    top = min(runs, key=lambda r: r["steps"])
    return {"steps": top["steps"], "lr": top["lr"], "rho": top["rho"], "reached": top["steps"] < max_steps}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--cond", type=float, default=1e4)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--out", default="bench/results/quadratic.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x0 = torch.randn(args.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = torch.logspace(0, math.log10(args.cond), args.n, dtype=torch.float64)
    run = dict(tol=args.tol, max_steps=args.max_steps)
    by_beta1 = {}
    for beta1 in (None, 0.9, 0.5, 0.0):
        key = "default" if beta1 is None else f"beta1={beta1}"
        s_kw = {} if beta1 is None else {"betas": (beta1, 0.99)}
        a_kw = {} if beta1 is None else {"betas": (beta1, 0.999)}
        sophia, adamw = best("sophia", d, x0, **run, **s_kw), best("adamw", d, x0, **run, **a_kw)
        by_beta1[key] = {"sophia": sophia, "adamw": adamw, "adamw_over_sophia": adamw["steps"] / sophia["steps"]}
    result = {
        "benchmark": "quadratic",
        "problem": {"n": args.n, "cond": args.cond, "tol": args.tol, "x0": "N(0,1), seed 0", "hessian": "exact"},
        "grids": {"lr": LRS, "rho": RHOS, "sgd_lr": SGD_LRS},
        "sgd": best("sgd", d, x0, **run),
        "by_beta1": by_beta1,
        "sophia_default_beta1_bound_steps": math.log(1 / args.tol) / math.log(1 / 0.965),
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
