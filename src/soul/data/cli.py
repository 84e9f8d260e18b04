"""`soul data make` (write the bundled benchmark) and `soul data show` (validate and describe a split)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _make(args: argparse.Namespace) -> int:
    from soul.cli import CLIError

    if not args.out:
        raise CLIError("--out DIR is required (on the command line or in --config)")
    from soul.data.generate import check_benchmark_args
    from soul.safety import dir_lock, require_number

    for option in ("authors", "qas_per_author", "seed", "perturbed"):
        require_number(getattr(args, option), f"--{option.replace('_', '-')}", integer=True)
    check_benchmark_args(args.authors, args.qas_per_author, args.perturbed)
    target = check_data_dir(args.out)
    with dir_lock(target):
        return _write(args)


def check_data_dir(out: str) -> Path:
    """Refuse an --out that is a link or a file, in soul's model cache, a non-empty directory (anything but
    soul's lock records) that is not a soul benchmark (no manifest.json) or an unwritable place: `make` writes
    its split files there, replacing same-named ones."""
    from soul.errors import OutputError
    from soul.safety import check_not_protected, check_writable, refuse_link, user_entries

    refuse_link(out)
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path}: is a file; give a directory for the benchmark")
    check_not_protected(path)
    if path.is_dir() and user_entries(path) and not (path / "manifest.json").is_file():
        raise OutputError(f"--out {path}: exists, is not empty and is not a soul benchmark (no manifest.json); "
                          "choose a new directory")
    check_writable(path)
    return path


def _write(args: argparse.Namespace) -> int:
    from soul.data.generate import make_benchmark
    from soul.data.summary import describe_benchmark

    out = make_benchmark(args.out, n_authors=args.authors, qas_per_author=args.qas_per_author, seed=args.seed,
                         n_perturbed=args.perturbed)
    print(describe_benchmark(out))
    return 0


def _show(args: argparse.Namespace) -> int:
    from soul.data.summary import describe_split
    from soul.data.tofu import load_split

    records = load_split(args.source, args.split)
    print(describe_split(records, args.split))
    for r in records[: args.examples]:
        print(f"  Q: {r['question']}\n  A: {r['answer']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="benchmark data: generate the bundled set, inspect splits")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    make = sub.add_parser("make", help="write the bundled fictitious-author benchmark (TOFU layout) to a directory")
    # Not `required=True`: the value may come from --config.
    make.add_argument("--out", help="output directory (required)")
    make.add_argument("--authors", type=int, default=20, help="trained authors (default 20)")
    make.add_argument("--qas-per-author", type=int, default=10, help="questions per author (1-14, default 10)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--perturbed", type=int, default=4, help="perturbed answers per question (3-5)")
    make.add_argument("--config", help="YAML file of option values")
    make.set_defaults(func=_make)

    show = sub.add_parser("show", help="validate a TOFU-schema split and print a summary")
    show.add_argument("split", nargs="?", default="full", help="split name, e.g. forget10 (default full)")
    show.add_argument("--source", default="bundled", help="'bundled', a local directory, or locuslab/TOFU")
    show.add_argument("--examples", type=int, default=2, help="records to print")
    show.add_argument("--config", help="YAML file of option values")
    show.set_defaults(func=_show)
