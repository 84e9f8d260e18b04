"""Project Gutenberg books → prefix / continuation passages (the ``copyright-cpu`` task's data).

A book is a UTF-8 ``.txt`` file. When it carries Project Gutenberg's markers, only the text between the
``*** START OF THE PROJECT GUTENBERG EBOOK … ***`` and ``*** END OF THE PROJECT GUTENBERG EBOOK … ***``
lines is kept (licence header and footer dropped; "THIS" instead of "THE" is accepted too); a file without
markers is taken whole (the files in ``../shared/data/books`` are bodies already).

Books are found in a directory: ``$SOUL_BOOKS_DIR``, else ``../shared/data/books`` (relative to the working
directory: ``make`` and CI run from the repository root). A book is named by its file stem
(``frankenstein``), its file name (``frankenstein.txt``) or a path to a file.

Passages (`book_passages`): the book's words (whitespace normalised) are cut from the start into
consecutive, non-overlapping passages; each passage is a *prefix* of whole words holding at most
`prefix_tokens` tokens followed by a *continuation* of whole words holding at most `continuation_tokens`
tokens (the largest such runs, so each is within one word of its budget). Cutting at words, not tokens,
keeps the two halves clean text, so training (prompt = prefix, answer = continuation, ``raw`` format) and
the verbatim-continuation evaluation see the same split. `n` passages are then taken evenly spaced over the
book (the middle passage of n equal stretches), so they sample the whole book, not its front matter. Word token counts are those of
``" " + word`` (exact for byte-level BPE tokenizers, whose pre-tokenizer never merges across a space).

Every problem is a `DataError` (one line naming the file, and the passage where relevant): a missing file,
an unknown book name (the message lists the books there), a file that is not UTF-8, an empty book (nothing
between the markers), a book too short for one passage or for the `n` passages asked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from soul.data.validate import DataError

BOOKS_ENV = "SOUL_BOOKS_DIR"
DEFAULT_BOOKS_DIR = "../shared/data/books"
_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.IGNORECASE | re.MULTILINE)

# Licence of the Project Gutenberg texts (data README): travels with results that use them.
GUTENBERG_LICENCE = "public domain in the United States (Project Gutenberg eBook)"


def books_dir(directory: str | os.PathLike | None = None) -> Path:
    """`directory`, else ``$SOUL_BOOKS_DIR``, else ``../shared/data/books`` (``~`` expanded)."""
    chosen = directory if directory not in (None, "") else (os.environ.get(BOOKS_ENV) or DEFAULT_BOOKS_DIR)
    return Path(os.path.expanduser(str(chosen)))


def available_books(directory: str | os.PathLike | None = None) -> list[str]:
    """The book names (``.txt`` file stems) in the books directory, sorted; [] when it does not exist."""
    root = books_dir(directory)
    return sorted(p.stem for p in root.glob("*.txt") if p.is_file()) if root.is_dir() else []


def resolve_book(name: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """The file of book `name`: a path to an existing file, else ``<dir>/<name>`` or ``<dir>/<name>.txt``."""
    given = Path(os.path.expanduser(str(name)))
    if given.is_file():
        return given
    root = books_dir(directory)
    for candidate in (root / str(name), root / f"{name}.txt"):
        if candidate.is_file():
            return candidate
    looks_like_path = os.sep in str(name) or str(name).endswith(".txt")
    if looks_like_path:
        where = given if os.sep in str(name) else root / str(name)
        raise DataError(str(where), "book file does not exist")
    known = available_books(directory)
    if not root.is_dir():
        raise DataError(str(root / f"{name}.txt"), f"unknown book {str(name)!r}: the books directory {root} does "
                                                   f"not exist (set {BOOKS_ENV} or run from the repository root)")
    raise DataError(str(root / f"{name}.txt"), f"unknown book {str(name)!r}; books in {root}: "
                                               f"{', '.join(known) or 'none'}")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END marker lines (each optional), stripped."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


def read_book(path: str | os.PathLike) -> str:
    """The body of the book at `path` (`strip_gutenberg`); `DataError` when missing, not UTF-8 or empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "book file does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(str(path), f"not UTF-8 text (line {line}, byte {err.start}: {err.reason})") from None
    body = strip_gutenberg(text)
    if not body:
        marked = bool(_START.search(text) or _END.search(text))
        raise DataError(str(path), "empty book: no text between the Project Gutenberg START and END markers"
                        if marked else "empty book: the file holds no text")
    return body


def _take(words: list[str], counts: list[int], start: int, budget: int) -> int:
    """End index of the longest run of words from `start` whose token counts sum to at most `budget`."""
    end, used = start, 0
    while end < len(words) and used + counts[end] <= budget:
        used += counts[end]
        end += 1
    return end


def book_passages(text: str, tokenizer: Any, *, n: int, prefix_tokens: int, continuation_tokens: int,
                  file: str = "book") -> list[dict[str, Any]]:
    """`n` passages of `text` (module docstring), evenly spaced: ``{"prefix", "continuation", "passage",
    "index": its position among the book's passages, "word": its first word's index, "prefix_tokens",
    "continuation_tokens"}``. `file` names the book in errors."""
    for key, value in (("n", n), ("prefix_tokens", prefix_tokens), ("continuation_tokens", continuation_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    words = text.split()
    unique = list(dict.fromkeys(words))  # a book has ~10x fewer distinct words than words: tokenise each once
    count_of = dict(zip(unique, map(len, tokenizer([" " + w for w in unique], add_special_tokens=False)["input_ids"])))
    counts = [count_of[w] for w in words]
    cuts: list[tuple[int, int, int]] = []  # (start, prefix end, continuation end) word indices
    start = 0
    while start < len(words):
        mid = _take(words, counts, start, prefix_tokens)
        if mid == start:  # one word longer than the prefix budget: start after it
            start += 1
            continue
        end = _take(words, counts, mid, continuation_tokens)
        if end == mid:  # no word left, or one longer than the continuation budget
            start = mid + 1
            continue
        if end == len(words) and sum(counts[mid:end]) < continuation_tokens:
            break  # cut short by the end of the book: shorter than prefix + continuation
        cuts.append((start, mid, end))
        start = end
    if not cuts:
        raise DataError(file, f"book of {sum(counts)} tokens is shorter than one passage of prefix + continuation "
                              f"= {prefix_tokens} + {continuation_tokens} tokens")
    if len(cuts) < n:
        raise DataError(file, f"book has {len(cuts)} passages of {prefix_tokens} + {continuation_tokens} tokens; "
                              f"{n} asked for (passage {len(cuts)} would be shorter than prefix + continuation)")
    picked = [(len(cuts) * (2 * j + 1)) // (2 * n) for j in range(n)]  # the middle of n equal stretches
    out = []
    for k in picked:
        s, m, e = cuts[k]
        prefix, continuation = " ".join(words[s:m]), " ".join(words[m:e])
        out.append({"prefix": prefix, "continuation": continuation, "passage": f"{prefix} {continuation}",
                    "index": k, "word": s, "prefix_tokens": sum(counts[s:m]),
                    "continuation_tokens": sum(counts[m:e])})
    return out


def load_book_passages(name: str | os.PathLike, tokenizer: Any, *, n: int, prefix_tokens: int,
                       continuation_tokens: int, directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """`book_passages` of book `name` (`resolve_book`), each record also naming its ``book`` (file stem)."""
    path = resolve_book(name, directory)
    passages = book_passages(read_book(path), tokenizer, n=n, prefix_tokens=prefix_tokens,
                             continuation_tokens=continuation_tokens, file=str(path))
    return [{**p, "book": path.stem} for p in passages]
