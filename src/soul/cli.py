"""The `soul` command line.

Each sub-package contributes its sub-commands through a ``register(subparsers)`` function in its own
``cli`` module (listed in `COMMAND_MODULES`), so a new command is one function plus one line here.
Every option can also come from a YAML file given with ``--config``; options on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
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


_STD_ACTIONS = (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
                argparse.BooleanOptionalAction)


def _config_value(where: str, key: str, value: Any, action: argparse.Action) -> Any:
    """`value` of config key `key` checked against its command-line option `action` (and converted as the
    command line would convert it); a CLIError naming `where` and the key when it has the wrong type.

    Without this a YAML ``forget_split: 10`` reached the code as an int (argparse converts only string
    defaults) and failed minutes later with an AttributeError."""
    option = f" ({action.option_strings[-1]})" if action.option_strings else ""
    name = f"{where}: key {key!r}{option}"

    def fail(expected: str, got: Any = value) -> CLIError:
        shown = "null" if got is None else f"{got!r} ({type(got).__name__})"
        return CLIError(f"{name} expects {expected}, got {shown}")

    if not isinstance(action, _STD_ACTIONS):  # a command's own action (KEY=VALUE pairs): its own checks
        return value
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if value is None:
        if action.default is None or action.default == argparse.SUPPRESS:  # null = not given
            return None
        raise fail("a value")
    convert = action.type
    kind = {int: "an integer", float: "a number", None: "a string"}.get(convert, "a value")

    def scalar(item: Any) -> Any:
        if convert in (int, float, None) and isinstance(item, bool | list | dict):
            raise fail(kind, item)
        if convert is None:
            if not isinstance(item, str):
                raise fail(kind + " (quote it in the YAML file)", item)
            converted = item
        elif convert is float and isinstance(item, int | float):
            converted = float(item)
        elif convert is int and isinstance(item, int):
            converted = item
        elif isinstance(item, str):  # as typed on the command line
            try:
                converted = convert(item)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise CLIError(f"{name}: {one_line(err)}") from None
        elif convert in (int, float):
            raise fail(kind, item)
        else:  # a command-specific type given a non-string (e.g. a list of seeds): the command checks it
            converted = item
        if action.choices is not None and converted not in action.choices:
            raise CLIError(f"{name} must be one of {', '.join(map(str, action.choices))}; got {item!r}")
        return converted

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise fail(f"a list of {kind.removeprefix('an ').removeprefix('a ')}s")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise CLIError(f"{name} expects a list of {action.nargs} values, got {len(value)}")
        if action.nargs == "+" and not value:
            raise CLIError(f"{name} expects a non-empty list")
        return [scalar(v) for v in value]
    return scalar(value)


def load_yaml_config(path: str | Path, allowed: set[str], command: str,
                     actions: dict[str, argparse.Action] | None = None) -> dict[str, Any]:
    """Read a YAML mapping of option values, checking every key is an option of `command` and, given the
    command's `actions` (dest -> argparse action), that every value has its option's type and choices."""
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
    if actions:
        normalised = {k: _config_value(f"--config {p}", k, v, actions[k]) if k in actions else v
                      for k, v in normalised.items()}
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (locks, temporary directories) runs on the way out."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Any:
    """SIGTERM raises `Terminated` while a command runs (the default would end the process on the spot)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_hint(args: argparse.Namespace) -> str:
    """What to run after `args.command` was interrupted (its locks and temporary files are gone by now)."""
    out = getattr(args, "out", None)
    if args.command in ("finetune", "unlearn"):
        if out and any(Path(out).expanduser().glob("checkpoints/step-*")):
            return f"its checkpoints are in {out}: rerun the same command with --resume to continue"
        return "no checkpoint was kept; rerun the same command to start again"
    if args.command in ("reproduce", "sweep"):
        return ("rerun the same command to continue: the reference models and evaluations it finished are cached "
                "and reused")
    return "rerun the same command"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()  # imports every command's module: seconds in which Ctrl-C is likely
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("soul: interrupted by SIGINT before any work started", file=sys.stderr)
        return 128 + signal.SIGINT
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None):
            sub = _subparser(parser, args.command)
            sub = _innermost(sub, args)  # nested commands (`soul data make`) take their own options
            actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
            sub.set_defaults(**load_yaml_config(args.config, set(actions), args.command, actions))
            args = parser.parse_args(argv)
        with _sigterm_unwinds():
            result = args.func(args)
    except KeyboardInterrupt as err:
        # Ctrl-C or SIGTERM: every lock and temporary directory was released by the `finally` blocks it ran
        # through; say what to do next instead of printing a traceback. 128 + signal number, as a shell does.
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        print(f"soul {args.command}: interrupted by {signum.name}; {resume_hint(args)}", file=sys.stderr)
        return 128 + signum
    except (CLIError, OSError, ValueError) as err:
        # Our own loaders and guards raise these with messages that name the file, the field or the option;
        # OS errors (disk full, read-only file system, permissions) name their path.
        print(f"soul {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
