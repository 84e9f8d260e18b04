"""Reading record files (JSON array, JSON lines, Parquet, `save_to_disk` directories) and atomic writes.

TOFU's hub files are named ``*.json`` but hold JSON lines, so the reader looks at the content, not the
suffix: a document starting with ``[`` is a JSON array; one holding a single object with a list under
``"data"`` is that list; anything else is read line by line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soul.data.validate import DataError

RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")


def dump_records(records: list[dict]) -> str:
    """Canonical JSON text for a list of records: stable bytes for the same records."""
    return json.dumps(records, ensure_ascii=False, indent=1, sort_keys=True) + "\n"


def read_json_records(path: str | Path) -> list[Any]:
    """Records of one JSON-array or JSON-lines file; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(str(path), f"not UTF-8 text (line {line}, byte {err.start}: {err.reason})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(str(path), f"not valid JSON (line {err.lineno}: {err.msg})") from None
        return data
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # several objects: JSON lines
        if isinstance(data, dict):
            if isinstance(data.get("data"), list):
                return data["data"]
            return [data]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(str(path), f"line {lineno}: not valid JSON ({err.msg})") from None
    return records


def read_record_path(path: str | Path) -> list[Any]:
    """Records from a file (`.json`, `.jsonl`, `.parquet`) or a directory of such files / a `save_to_disk` dir."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            return [dict(r) for r in load_from_disk(str(path))]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in RECORD_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {'/'.join(RECORD_SUFFIXES)} files")
        out: list[Any] = []
        for f in files:
            out.extend(read_record_path(f))
        return out
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_json_records(path)


def find_split_file(directory: str | Path, name: str) -> Path:
    """The file or directory holding split `name` in `directory`: ``name.json``, ``name.jsonl``,
    ``name.parquet`` or ``name/``; a `FileNotFoundError` lists what was tried."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist")
    candidates = [directory / f"{name}{s}" for s in RECORD_SUFFIXES] + [directory / name]
    for c in candidates:
        if c.exists():
            return c
    have = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    raise FileNotFoundError(
        f"{directory}: no split {name!r} (tried {', '.join(c.name for c in candidates)}); "
        f"the directory has: {', '.join(have[:20]) or 'nothing'}"
    )
