"""Exceptions every part of soul may raise for the user (kept in a module of its own so that `soul.cli`
run as ``python -m soul.cli`` — where the CLI module is ``__main__`` — still catches the one class)."""

from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


class OutputError(ValueError):
    """An output path soul refuses to write to (not empty, an input, the model cache, unwritable …)."""


class LockedError(OutputError):
    """Another live process holds the lock on an output directory or cache entry."""
