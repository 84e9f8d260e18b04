"""Helpers every pipeline stage and task shares: content hashes, model loading, progress messages.

Nothing here imports another `soul.pipeline` module, so tasks and stages can both use it without a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # annotations only
    from soul.pipeline.preset_types import Preset

CACHE_VERSION = 1  # bump when the meaning of a cached model or result changes


def path_under(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...``, refused (ValueError) unless it resolves inside `root`: run and file names come
    from the preset, and `load_preset` checks them, but a path outside the report directory is never written
    whatever the names (defense in depth; symlinks resolved on both sides)."""
    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        lexical = Path(os.path.normpath(Path(root).absolute().joinpath(*parts)))
        if lexical.is_relative_to(Path(root).absolute()) and lexical != Path(root).absolute():
            raise ValueError(f"{path}: is a symbolic link, or lies under one, that points outside the report "
                             f"directory {root}; soul does not write through links it did not make: remove the "
                             "link or choose another output directory")
        raise ValueError(f"{path}: a run or file name {'/'.join(parts)!r} would leave the report directory "
                         f"{root}; names must be one path component ([A-Za-z0-9._+-], no '..')")
    return path


def sha(obj: Any) -> str:
    """SHA-256 of `obj`'s canonical JSON (sorted keys; non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_records(records: list[dict]) -> str:
    """SHA-256 of the records' canonical JSON (key order and whitespace do not matter)."""
    return sha(records)


def model_fingerprint(name_or_path: str | os.PathLike) -> str:
    """A content hash of a local model directory (`soul.safety.fingerprint_files`: every file's name and
    bytes, bookkeeping left out), or ``hub:<id>`` for a hub id (which the hub versions itself)."""
    from soul.models import resolve_model_path
    from soul.safety import fingerprint_files

    resolved = Path(resolve_model_path(name_or_path))
    if not resolved.is_dir():
        return f"hub:{name_or_path}"
    return fingerprint_files(resolved)


class Progress:
    """Stage / run messages on a stream (the training loop draws its own step bars with ETA)."""

    def __init__(self, stream: TextIO | None, n_stages: int, prefix: str = "soul") -> None:
        self.stream, self.n_stages, self.prefix = stream, n_stages, prefix
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if self.stream is not None:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.prefix} {elapsed:6.0f}s] {msg}", file=self.stream, flush=True)

    def stage(self, i: int, name: str) -> None:
        self.say(f"stage {i}/{self.n_stages}: {name}")


@contextlib.contextmanager
def base_model(spec: str) -> Iterator[str]:
    """A loadable path or id for the preset's ``model``; ``tiny:<family>`` builds a tiny random model from
    `soul.testing` and saves it to a temporary directory for the duration of the run."""
    if not spec.startswith("tiny:"):
        yield spec
        return
    from soul.models import save_model
    from soul.testing import tiny_model

    model, tokenizer = tiny_model(spec.split(":", 1)[1])
    from soul.safety import TINY_PREFIX

    # The PID in the name lets a later run remove it if this one is killed (soul.safety.clean_tiny_tempdirs).
    tmp = Path(tempfile.mkdtemp(prefix=f"{TINY_PREFIX}{os.getpid()}-"))
    try:
        save_model(model, tokenizer, tmp / "model")
        yield str(tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TOKENIZERS: dict[str, Any] = {}


def tokenizer_for(spec: str) -> Any:
    """The tokenizer of model `spec` alone (no weights): ``tiny:<family>`` → `soul.testing.tiny_tokenizer` (every
    tiny family shares it), else the tokenizer files of `soul.models.resolve_model_path` (the bundled alias is
    converted and cached once, as the run itself would). Kept per process: tasks that cut data by tokens
    (copyright books) read it when checking the inputs and again when loading the data."""
    if spec not in _TOKENIZERS:
        if spec.startswith("tiny:"):
            from soul.testing import tiny_tokenizer

            _TOKENIZERS[spec] = tiny_tokenizer()
        else:
            from transformers import AutoTokenizer

            from soul.models import _finish_tokenizer, resolve_model_path

            _TOKENIZERS[spec] = _finish_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(spec)))
    return _TOKENIZERS[spec]


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load(path: str, preset: Preset):
    """(model, tokenizer) of `path` in the preset's dtype on its device."""
    from soul.models import load_model

    return load_model(path, dtype=preset.dtype, device=resolve_device(preset.device))
