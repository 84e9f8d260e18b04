"""One-line descriptions of splits and of a generated benchmark directory (printed by `soul data`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def describe_split(records: Sequence[dict], name: str = "split") -> str:
    """``name: R records, A authors, answers W words on average (max M), P perturbed answers each``.

    Author and perturbed-answer parts appear only when the records have those fields.
    """
    parts = [f"{name}: {len(records)} records"]
    authors = {r["author"] for r in records if r.get("author")}
    if authors:
        parts.append(f"{len(authors)} author{'s' if len(authors) != 1 else ''}")
    words = [len(str(r.get("answer", "")).split()) for r in records]
    if words:
        parts.append(f"answers {sum(words) / len(words):.1f} words on average (max {max(words)})")
    perturbed = sorted({len(r["perturbed_answer"]) for r in records if isinstance(r.get("perturbed_answer"), list)})
    if perturbed:
        span = str(perturbed[0]) if len(perturbed) == 1 else f"{perturbed[0]}-{perturbed[-1]}"
        parts.append(f"{span} perturbed answers each")
    return ", ".join(parts)


def describe_benchmark(directory: str | Path) -> str:
    """Every split of a generated benchmark (from its records) under a header from its manifest."""
    from soul.data.tofu import load_split

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    lines = [f"{directory}: bundled benchmark v{manifest['version']}, seed {manifest['seed']}, "
             f"{manifest['n_authors']} authors x {manifest['qas_per_author']} questions"]
    for name in manifest["splits"]:
        lines.append("  " + describe_split(load_split(directory, name), name))
    return "\n".join(lines)
