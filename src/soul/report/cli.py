"""`soul reproduce`, `soul sweep` and `soul report`."""

from __future__ import annotations

import argparse
import sys


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` (commas or spaces)."""
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed, e.g. 0,1,2")
    from soul.pipeline.preset_types import MAX_SEED

    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be integers in 0..{MAX_SEED}, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated (each seed is one run per setting), got {text!r}")
    return seeds


def _guarded_report_dir(out: str):
    """Check the report directory (`soul.safety.check_report_dir`), lock it for the run and mark it as soul's."""
    import contextlib

    from soul.safety import (
        OUTPUT_MARKER,
        check_report_dir,
        clean_leftovers,
        clean_tiny_tempdirs,
        dir_lock,
        mark_output,
    )

    path = check_report_dir(out)
    stack = contextlib.ExitStack()
    stack.enter_context(dir_lock(path))
    check_report_dir(path)
    clean_tiny_tempdirs()
    clean_leftovers(path / OUTPUT_MARKER)
    mark_output(path, "report")
    return stack


def _reproduce(args: argparse.Namespace) -> int:
    from soul.pipeline import reproduce
    from soul.pipeline.api import plan_reproduce

    # Every problem with the preset, --seeds or --only is a ValueError raised before the report directory
    # is made or any model is loaded; `soul.cli.main` prints it as one line and exits 2.
    plan_reproduce(args.preset, args.only or None, args.seeds, args.tune_seeds, args.no_tune)
    with _guarded_report_dir(args.out):
        reproduce(args.preset, args.out, keep_models=args.keep_models, only=args.only or None, seeds=args.seeds,
                  tune_seeds=args.tune_seeds, no_tune=args.no_tune, stream=None if args.quiet else sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from soul.pipeline import sweep
    from soul.pipeline.api import plan_sweep

    plan_sweep(args.preset, args.seeds)
    with _guarded_report_dir(args.out):
        sweep(args.preset, args.out, seeds=args.seeds, stream=None if args.quiet else sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from soul.cli import CLIError
    from soul.eval.results import load_results
    from soul.report import write_report
    from soul.safety import require_number

    require_number(args.utility_fraction, "--utility-fraction", low=0, high=1)
    results = load_results(args.results)
    if not isinstance(results, dict) or "runs" not in results:
        raise CLIError(f"{args.results}: not a soul results.json (no 'runs'); give the results.json that "
                       "`soul reproduce` or `soul sweep` wrote")
    with _guarded_report_dir(args.out):
        write_report(results, args.out, fraction=args.utility_fraction)
    return 0


def _presets_help() -> str:
    from soul.pipeline import list_presets

    return ", ".join(list_presets()) or "none"


def register(subparsers: argparse._SubParsersAction) -> None:
    presets = _presets_help()
    p = subparsers.add_parser(
        "reproduce", help="fine-tune target/retain, unlearn with every objective x optimizer, evaluate, report",
        description="SOUL's first-order vs second-order comparison end to end; writes results.json, "
                    "table.md, figures and report.html into --out.")
    p.add_argument("--preset", default="demo", help=f"preset name ({presets}) or a YAML file")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--only", nargs="*", help="run only these unlearning runs: a setting (graddiff-sophia: every "
                                             "seed), one seed (graddiff-sophia-s1) or influence")
    p.add_argument("--seeds", type=_seeds, help="evaluation seeds, e.g. 0,1,2 (overrides the preset's seeds; "
                                                "the only seeds in the table and verdicts)")
    tune = p.add_mutually_exclusive_group()
    tune.add_argument("--tune-seeds", type=_seeds, help="tuning seeds, e.g. 0,4 (overrides the preset's "
                                                        "tune.seeds; must not overlap the evaluation seeds)")
    tune.add_argument("--no-tune", action="store_true", help="skip the preset's tune: stage (every run at its "
                                                             "preset options)")
    p.add_argument("--keep-models", action="store_true", help="save every unlearned model under OUT/runs/")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--config", help="YAML file of option values")
    p.set_defaults(func=_reproduce)

    s = subparsers.add_parser(
        "sweep", help="grid over lr / gamma / steps per optimizer; Pareto front of forget quality vs utility",
        description="Runs the preset's sweep.grid for each optimizer and reports the Pareto front and, per "
                    "optimizer, the best forget quality at model utility >= 95%% of the target's.")
    s.add_argument("--preset", default="demo", help=f"preset name ({presets}) or a YAML file")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--seeds", type=_seeds, help="seeds per grid point, e.g. 0,1,2 (overrides the preset's seeds)")
    s.add_argument("--quiet", action="store_true", help="no progress messages")
    s.add_argument("--config", help="YAML file of option values")
    s.set_defaults(func=_sweep)

    r = subparsers.add_parser("report", help="redraw table, figures and report.html from a results.json")
    r.add_argument("results", help="results.json written by soul reproduce / soul sweep")
    r.add_argument("--out", required=True, help="report directory")
    r.add_argument("--utility-fraction", type=float, default=0.95,
                   help="utility floor (fraction of the target's) for the best-per-optimizer mark")
    r.add_argument("--config", help="YAML file of option values")
    r.set_defaults(func=_report)
