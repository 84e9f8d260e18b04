"""The `soul` command line.

Each sub-package contributes its sub-commands through a ``register(subparsers)`` function in its own
``cli`` module (listed in `COMMAND_MODULES`), so a new command is one function plus one line here.
Every option can also come from a YAML file given with ``--config``; options on the command line win.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from soul.errors import CLIError

COMMAND_MODULES = [
    "soul.cli_ask",
    "soul.data.cli",
    "soul.train.cli",
    "soul.eval.cli",
    "soul.report.cli",
    "soul.attack.cli",
]


__all__ = ["CLIError", "build_parser", "load_yaml_config", "main"]


class SoulArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``soul COMMAND: error: …``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line, naming the path of an OS error."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def load_yaml_config(path: str | Path, allowed: set[str], command: str) -> dict[str, Any]:
    """Read a YAML mapping of option values, checking every key is an option of `command`."""
    from soul.io import read_yaml_mapping

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {p}: file not found")
    try:
        data = read_yaml_mapping(p, f"--config {p}", "a mapping of option: value")
    except ValueError as err:
        raise CLIError(str(err)) from None
    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - allowed)
    if unknown:
        raise CLIError(f"--config {p}: unknown option(s) {unknown} for `soul {command}`")
    return normalised


def build_parser() -> argparse.ArgumentParser:
    parser = SoulArgumentParser(
        prog="soul", description="Unlearning for causal LMs with second-order optimization (SOUL)."
    )
    from soul._version import __version__

    parser.add_argument("--version", action="version", version=f"soul {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # that part of soul is not there: skip its commands
                continue
            raise
        module.register(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the deepest sub-command chosen in `args` (e.g. `make` under `soul data`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None):
            sub = _subparser(parser, args.command)
            sub = _innermost(sub, args)  # nested commands (`soul data make`) take their own options
            allowed = {a.dest for a in sub._actions} - {"help", "config"}
            sub.set_defaults(**load_yaml_config(args.config, allowed, args.command))
            args = parser.parse_args(argv)
        result = args.func(args)
    except (CLIError, OSError, ValueError) as err:
        # Our own loaders and guards raise these with messages that name the file, the field or the option;
        # OS errors (disk full, read-only file system, permissions) name their path.
        print(f"soul {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
