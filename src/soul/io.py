"""Atomic file writes: every file soul writes (results, reports, data, logs) appears complete or not at all."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and `os.replace` (readers never see half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The PID in the name lets a later run remove it when this process was killed (soul.safety.clean_leftovers).
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be read (and served) by others
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """Strict-JSON copy of `obj`: NaN/inf become null, tuples lists, paths strings, keys strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (NaN/inf as null; other non-JSON values as their `str`) written atomically."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False, ensure_ascii=False, default=str) + "\n"
    return write_text_atomic(path, text)


def read_yaml_mapping(path: str | os.PathLike, label: str, expected: str = "a mapping") -> dict[str, Any]:
    """The mapping in the YAML file `path` (an empty file is ``{}``). Errors are ValueErrors that start with
    `label`: ``<label>: not valid YAML (...)`` or ``<label>: expected <expected>, got <type>``."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{label}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected {expected}, got {type(data).__name__}")
    return data
