"""Loading TOFU-schema splits from the bundled benchmark, a local directory, or the Hugging Face hub.

``load_split(source, name)`` — `source` is one of:

* ``"bundled"`` (default): the generated benchmark (`soul.data.generate`), written once into
  ``<soul cache>/data/bundled-v<version>-a<authors>-q<qas>-s<seed>-p<perturbed>`` and read from there;
* a local directory holding ``<name>.json`` (a JSON array or JSON lines, as the hub's TOFU files are),
  ``<name>.jsonl``, ``<name>.parquet`` or a ``<name>/`` directory of such files (or a ``save_to_disk`` dir);
* a hub id: ``locuslab/TOFU`` (or any id written ``hf:owner/name``), loaded with
  ``datasets.load_dataset(id, name, split="train")`` — needs internet, never used by the tests.

Whatever the source, the records are validated (`soul.data.validate.validate_qa`) before they are returned.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from soul.data.generate import GENERATOR_VERSION, make_benchmark
from soul.data.io import find_split_file, read_record_path
from soul.data.validate import check_disjoint, validate_qa

KNOWN_HUB_IDS = ("locuslab/TOFU",)
HUB_PREFIX = "hf:"


def bundled_dir(n_authors: int = 20, qas_per_author: int = 10, seed: int = 0, n_perturbed: int = 4) -> Path:
    """Directory of the bundled benchmark with these parameters, generated on first use (atomically)."""
    from soul.paths import cache_dir

    target = cache_dir() / "data" / (
        f"bundled-v{GENERATOR_VERSION}-a{n_authors}-q{qas_per_author}-s{seed}-p{n_perturbed}"
    )
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Generate next to the target and rename, so a concurrent reader never sees half a benchmark.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_benchmark(tmp, n_authors, qas_per_author, seed, n_perturbed)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_hub_id(source: str) -> bool:
    return source.startswith(HUB_PREFIX) or source in KNOWN_HUB_IDS


def load_hub_split(hub_id: str, name: str) -> list[dict]:
    """TOFU config `name` from the hub (``split="train"``, the only split TOFU publishes)."""
    from datasets import load_dataset

    hub_id = hub_id.removeprefix(HUB_PREFIX)
    return [dict(r) for r in load_dataset(hub_id, name, split="train")]


def load_split(source: str | os.PathLike = "bundled", name: str = "full", *, tokenizer=None) -> list[dict]:
    """Records of split `name` from `source` (see the module docstring), validated.

    With a `tokenizer`, an answer that tokenises to nothing is an error too. Errors name the file, the record
    index and the field.
    """
    src = str(source)
    if src == "bundled":
        path = find_split_file(bundled_dir(), name)
        records, where = read_record_path(path), str(path)
    elif Path(src).exists():
        path = find_split_file(src, name)
        if path.is_dir() and split_files(path):
            # A split directory of several files: validate each one, so errors name the file and its own index.
            return [r for f in split_files(path) for r in validate_qa(read_record_path(f), str(f), name, tokenizer)]
        records, where = read_record_path(path), str(path)
    elif is_hub_id(src):
        records, where = load_hub_split(src, name), f"{src.removeprefix(HUB_PREFIX)}[{name}]"
    else:
        raise FileNotFoundError(
            f"data source {src!r} is not 'bundled', an existing directory, or a hub id "
            f"({', '.join(KNOWN_HUB_IDS)} or '{HUB_PREFIX}owner/name')"
        )
    return validate_qa(records, where, name, tokenizer)


def split_files(path: Path) -> list[Path]:
    """The record files of a split directory, in reading order; empty for a `save_to_disk` directory."""
    from soul.data.io import RECORD_SUFFIXES

    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in RECORD_SUFFIXES)


def matching_retain(forget: str) -> str:
    """TOFU's retain split for a forget split: forgetXX -> retain(100-XX), e.g. forget10 -> retain90."""
    digits = forget.removeprefix("forget").removesuffix("_perturbed")
    if not forget.startswith("forget") or not digits.isdigit():
        raise ValueError(f"cannot infer the retain split for {forget!r}; name it explicitly (e.g. retain90)")
    return f"retain{100 - int(digits):02d}"


def load_forget_retain(source: str | os.PathLike = "bundled", forget: str = "forget10",
                       retain: str | None = None, *, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """(forget records, retain records), each validated, and checked not to share a question.

    `retain` defaults to TOFU's matching split (`matching_retain`).
    """
    retain = retain or matching_retain(forget)
    f = load_split(source, forget, tokenizer=tokenizer)
    r = load_split(source, retain, tokenizer=tokenizer)
    check_disjoint(f, r, forget_name=f"{source}[{forget}]", retain_name=f"{source}[{retain}]")
    return f, r
