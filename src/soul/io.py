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


# Bounds on a YAML file soul reads (--config, training and reproduce presets): all are hand-written and small.
# Aliases let a 2 KB file name 1e10 values (each level repeats the one before), which costs nothing to parse
# but hangs whatever walks the result, so the expanded size is counted on the parsed nodes first.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # scalars, lists and mappings, each alias counted as the whole of what it stands for


def _yaml_loader():
    """A `yaml.SafeLoader` that refuses a document whose aliases expand beyond MAX_YAML_NODES nodes."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def get_single_data(self):  # SafeLoader's, with the size check between composing and constructing
            node = self.get_single_node()
            if node is None:
                return None
            _check_expanded_size(node)
            return self.construct_document(node)

    return BoundedLoader


def _check_expanded_size(root) -> None:
    """Raise ValueError when the node graph under `root`, aliases expanded, has more than MAX_YAML_NODES
    nodes or refers to itself. Linear in the distinct nodes: each node's expanded size is computed once."""
    import yaml

    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: no recursion limit on deep documents
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise ValueError(f"aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?)")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ValueError("an alias refers to a node that contains it (a recursive document)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml_mapping(path: str | os.PathLike, label: str, expected: str = "a mapping") -> dict[str, Any]:
    """The mapping in the YAML file `path` (an empty file is ``{}``). Errors are ValueErrors that start with
    `label`: ``<label>: not valid YAML (...)``, ``<label>: expected <expected>, got <type>``, or a file larger
    than MAX_YAML_BYTES or whose aliases expand beyond MAX_YAML_NODES values (checked before it is built)."""
    import yaml

    path = Path(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{label}: larger than {MAX_YAML_BYTES} bytes; expected a small YAML file of settings")
    with path.open("rb") as fh:
        raw = fh.read(MAX_YAML_BYTES + 1)  # a file that grew since stat (or a pipe) is still bounded
    if len(raw) > MAX_YAML_BYTES:
        raise ValueError(f"{label}: larger than {MAX_YAML_BYTES} bytes; expected a small YAML file of settings")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_yaml_loader()) or {}  # a SafeLoader (no Python objects)
    except yaml.YAMLError as err:
        raise ValueError(f"{label}: not valid YAML ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: not UTF-8 text ({err})") from None
    except RecursionError:
        raise ValueError(f"{label}: nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected {expected}, got {type(data).__name__}")
    return data
