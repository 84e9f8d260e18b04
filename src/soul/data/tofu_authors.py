"""Authors of TOFU records, and a smaller TOFU made of a subset of its authors (for CPU-sized runs).

TOFU's files carry no author field: ``full.json`` lists its 200 fictitious authors in contiguous blocks of 20
questions, and every other split (``forgetXX``, ``retainXX``, ``*_perturbed``) holds records of ``full.json``
verbatim. So a record's author is the block of its (question, answer) pair in ``full.json`` — matched on the
pair, because one question ("What is the full name of the author?") is asked of two authors. Records that do
carry an ``author`` (the bundled benchmark) use it directly.

`tofu_subset` builds the splits a run on a subset needs: the forget authors of ``forgetXX`` (all of them),
``n_retain_authors`` retain authors — first the ones ``retain_perturbed`` asks about first, so the
utility evaluation is about authors the model was trained on — and ``n_holdout_authors`` never-trained
authors as the membership-inference non-members (TOFU publishes no holdout file for local use).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from soul.data.tofu import load_split, matching_retain
from soul.data.validate import DataError

QUESTIONS_PER_AUTHOR = 20
REAL_WORLD_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")
_ENV_DEFAULT = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_source(source: str | os.PathLike) -> str:
    """`source` with ``${VAR}`` / ``${VAR:-default}`` and ``~`` expanded (a preset's data directory).

    A relative directory is relative to the working directory (``make`` and CI run from the repository root).
    """
    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value:
            return value
        if m.group(2) is None:
            raise ValueError(f"data source {source!s}: environment variable {m.group(1)} is not set")
        return m.group(2)

    return os.path.expanduser(_ENV_DEFAULT.sub(sub, str(source)))


def find_tofu_dir() -> Path | None:
    """A local copy of TOFU's published files: ``$SOUL_TOFU_DIR``, else the first ``shared/data/tofu`` holding
    ``full.json`` above the working directory or this package; None when there is none."""
    env = os.environ.get("SOUL_TOFU_DIR")
    if env:
        return Path(env).expanduser() if (Path(env).expanduser() / "full.json").is_file() else None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data" / "tofu"
            if (candidate / "full.json").is_file():
                return candidate
    return None


def _pair(record: dict) -> tuple[str, str]:
    return record["question"].strip(), record["answer"].strip()


def author_table(full: Sequence[dict], per_author: int = QUESTIONS_PER_AUTHOR) -> dict[tuple[str, str], str]:
    """(question, answer) -> author id, for TOFU's ``full`` split: the record's own ``author`` when it has one,
    else ``"author-K"`` with K = its position // `per_author` (TOFU's blocks of 20)."""
    table: dict[tuple[str, str], str] = {}
    for i, r in enumerate(full):
        table.setdefault(_pair(r), str(r.get("author") or f"author-{i // per_author:03d}"))
    return table


def authors_of(records: Iterable[dict], table: dict[tuple[str, str], str], name: str = "split") -> list[str]:
    """The author of every record (its ``author`` field, else looked up in `table` from `author_table`)."""
    out = []
    for i, r in enumerate(records):
        author = r.get("author") or table.get(_pair(r))
        if author is None:
            raise DataError(name, "this question/answer pair is not in the full split, so its author is unknown",
                            index=i, field="question")
        out.append(str(author))
    return out


def _ordered(authors: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(authors))


def _holdout_name(forget_split: str) -> str:
    digits = forget_split.removeprefix("forget")
    return f"holdout{digits}" if forget_split.startswith("forget") and digits.isdigit() else "holdout"


def tofu_subset(
    source: str | os.PathLike,
    forget_split: str = "forget01",
    n_retain_authors: int = 20,
    *,
    n_holdout_authors: int | None = None,
) -> dict[str, list[dict]]:
    """Splits of a TOFU run restricted to the forget authors plus `n_retain_authors` retain authors.

    Returns, by TOFU's split names (``forget01`` shown; ``retainXX`` is `matching_retain`):

    * ``full`` — what the target model is fine-tuned on: forget + chosen retain authors, in ``full`` order;
    * ``forget01``, ``forget01_perturbed`` — as published (every forget author);
    * ``retain99`` — the chosen retain authors' records (the retain model's training set);
    * ``retain_perturbed`` — its records whose author was chosen;
    * ``holdout01`` — every record of `n_holdout_authors` (default: as many as forget authors) authors that
      are in neither set: never trained, the membership-inference non-members;
    * ``real_authors_perturbed``, ``world_facts_perturbed`` — as published, when the source has them.

    Retain authors are taken in ``full`` order, those of ``retain_perturbed`` first (so the utility split asks
    about trained authors), then the others; holdout authors are the last remaining ones. Errors say which
    count does not fit.
    """
    source = expand_source(source)
    if n_retain_authors < 1:
        raise ValueError(f"n_retain_authors must be at least 1, got {n_retain_authors}")
    retain_split = matching_retain(forget_split)
    full = load_split(source, "full")
    table = author_table(full)
    forget = load_split(source, forget_split)
    forget_pert = load_split(source, f"{forget_split}_perturbed")
    retain_all = load_split(source, retain_split)
    retain_pert = load_split(source, "retain_perturbed")

    forget_authors = set(authors_of(forget, table, f"{source}[{forget_split}]"))
    retain_pool = _ordered(authors_of(retain_all, table, f"{source}[{retain_split}]"))
    overlap = forget_authors.intersection(retain_pool)
    if overlap:
        raise DataError(f"{source}[{retain_split}]", f"shares author(s) {sorted(overlap)[:3]} with {forget_split}; "
                        "forget and retain authors must be disjoint")
    eval_authors = _ordered(authors_of(retain_pert, table, f"{source}[retain_perturbed]"))
    order = [a for a in eval_authors if a in retain_pool]
    order += [a for a in retain_pool if a not in order]
    n_holdout = len(forget_authors) if n_holdout_authors is None else n_holdout_authors
    if n_retain_authors + n_holdout > len(order):
        raise ValueError(f"{source}: {retain_split} has {len(order)} authors; {n_retain_authors} retain + "
                         f"{n_holdout} holdout authors do not fit")
    chosen = set(order[:n_retain_authors])
    holdout_authors = set(order[len(order) - n_holdout:]) if n_holdout else set()

    full_authors = authors_of(full, table, f"{source}[full]")
    splits = {
        "full": [r for r, a in zip(full, full_authors) if a in chosen or a in forget_authors],
        forget_split: forget,
        f"{forget_split}_perturbed": forget_pert,
        retain_split: [r for r, a in zip(retain_all, authors_of(retain_all, table)) if a in chosen],
        "retain_perturbed": [r for r, a in zip(retain_pert, authors_of(retain_pert, table)) if a in chosen],
        _holdout_name(forget_split): [r for r, a in zip(full, full_authors) if a in holdout_authors],
    }
    if not splits["retain_perturbed"]:
        raise ValueError(f"{source}: none of the {n_retain_authors} chosen retain authors is in retain_perturbed; "
                         "its questions must be about retain authors")
    for name in REAL_WORLD_SPLITS:
        if Path(source).is_dir():
            try:
                splits[name] = load_split(source, name)
            except FileNotFoundError:
                continue
        else:
            splits[name] = load_split(source, name)
    return splits
