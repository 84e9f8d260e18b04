"""Loaders of the real data (issue 22): Project Gutenberg books (`soul.data.books`) and the detox files
(`soul.data.detox`: PKU-SafeRLHF CSV / hub layout, RealToxicityPrompts JSONL), read from the shared files in
``../shared/data`` (relative to the repository root, or ``$SOUL_DATA_DIR``); skipped when they are absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from soul.data.books import book_passages, load_book_passages, read_book, resolve_book, strip_gutenberg
from soul.data.detox import load_detox, load_rtp, load_safe_responses
from soul.data.validate import DataError

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUL_DATA_DIR") or REPO.parent / "shared" / "data")
BOOKS, DETOX = DATA / "books", DATA / "detox"
BOOK_NAMES = ("alice_in_wonderland", "frankenstein", "adventures_of_sherlock_holmes", "pride_and_prejudice")
needs_books = pytest.mark.skipif(not (BOOKS / "frankenstein.txt").is_file(),
                                 reason=f"the real books are not at {BOOKS} (set SOUL_DATA_DIR)")
needs_detox = pytest.mark.skipif(not (DETOX / "pku_saferlhf_unsafe_200.csv").is_file(),
                                 reason=f"the real detox files are not at {DETOX} (set SOUL_DATA_DIR)")


@pytest.fixture(scope="module")
def tok():
    from soul.testing import tiny_tokenizer

    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------------ books
@needs_books
@pytest.mark.parametrize("name", BOOK_NAMES)
def test_every_real_book_reads_by_name_and_by_file_name(name):
    by_name, by_file = resolve_book(name, BOOKS), resolve_book(f"{name}.txt", BOOKS)
    assert by_name == by_file == BOOKS / f"{name}.txt"
    body = read_book(by_name)
    assert len(body.split()) > 20_000  # a whole novel (Alice, the shortest, has ~26k words)
    assert "PROJECT GUTENBERG" not in body.upper()[:2000]


@needs_books
def test_books_dir_defaults_to_the_environment_variable(monkeypatch):
    monkeypatch.setenv("SOUL_BOOKS_DIR", str(BOOKS))
    assert resolve_book("frankenstein") == BOOKS / "frankenstein.txt"


@needs_books
def test_real_book_passages_are_verbatim_token_bounded_and_spread_over_the_book(tok):
    text = read_book(BOOKS / "frankenstein.txt")
    flat = " ".join(text.split())
    passages = load_book_passages("frankenstein", tok, n=12, prefix_tokens=24, continuation_tokens=16,
                                  directory=BOOKS)
    assert len(passages) == 12 and {p["book"] for p in passages} == {"frankenstein"}
    for p in passages:
        assert p["passage"] == f"{p['prefix']} {p['continuation']}" and p["passage"] in flat
        n_pre = len(tok(" " + p["prefix"], add_special_tokens=False)["input_ids"])
        n_cont = len(tok(" " + p["continuation"], add_special_tokens=False)["input_ids"])
        assert n_pre == p["prefix_tokens"] <= 24 and n_cont == p["continuation_tokens"] <= 16
        assert p["prefix_tokens"] > 24 - 12 and p["continuation_tokens"] > 16 - 12  # within a word of the budget
    starts = [p["word"] for p in passages]
    assert starts == sorted(set(starts))  # distinct, in book order
    n_words = len(text.split())
    assert starts[0] > 0.01 * n_words and starts[-1] > 0.9 * n_words  # not the front matter only: the whole book


def test_gutenberg_header_and_footer_are_stripped(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("The Project Gutenberg eBook of X\nlicence words\n"
                    "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nCall me Ishmael. Some years ago.\n\n"
                    "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nMore licence words\n")
    assert read_book(path) == "Call me Ishmael. Some years ago."
    assert strip_gutenberg("*** START OF THIS PROJECT GUTENBERG EBOOK Y ***\nbody") == "body"


def test_passages_need_enough_text(tok):
    with pytest.raises(DataError, match=r"^b\.txt: book of \d+ tokens is shorter than one passage"):
        book_passages("one two three", tok, n=1, prefix_tokens=8, continuation_tokens=8, file="b.txt")
    text = " ".join(["word"] * 40)
    with pytest.raises(DataError, match=r"^b\.txt: book has \d+ passages of 4 \+ 4 tokens; 100 asked for"):
        book_passages(text, tok, n=100, prefix_tokens=4, continuation_tokens=4, file="b.txt")


# ------------------------------------------------------------------------------------------------ detox
@needs_detox
def test_real_pku_csv_files_give_unsafe_forget_pairs_and_safe_retain_records():
    unsafe = load_detox(DETOX / "pku_saferlhf_unsafe_200.csv")
    safe = load_safe_responses(DETOX / "pku_saferlhf_safe_200.csv")
    assert len(unsafe) == len(safe) == 200
    assert all(r["question"].strip() and r["answer"].strip() for r in unsafe + safe)
    assert {r["answer"] for r in unsafe}.isdisjoint(r["answer"] for r in safe)


@needs_detox
@pytest.mark.parametrize(("name", "n", "challenging"), [("realtoxicityprompts_challenging_toxic.jsonl", 1196, True),
                                                          ("realtoxicityprompts_nontoxic.jsonl", 1200, None)])
def test_real_rtp_files_read_in_their_original_schema(name, n, challenging):
    records = load_rtp(DETOX / name)
    assert len(records) == n and all(isinstance(r["prompt"], str) and r["prompt"] for r in records)
    first = json.loads((DETOX / name).read_text().splitlines()[0])
    assert records[0]["prompt"] == first["prompt"]["text"]
    if challenging:
        assert all(r["challenging"] for r in records)


def test_hub_layout_jsonl_and_csv_give_the_unsafe_and_the_safe_side(tmp_path):
    hub = {"prompt": "p?", "response_0": "bad", "response_1": "good", "is_response_0_safe": False,
           "is_response_1_safe": True}
    (tmp_path / "h.jsonl").write_text(json.dumps(hub) + "\n")
    (tmp_path / "h.csv").write_text("prompt,response_0,response_1,is_response_0_safe,is_response_1_safe\n"
                                    "p?,bad,good,FALSE,true\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "q?", "response": "fine"}) + "\n")
    for f in ("h.jsonl", "h.csv"):
        assert [r["answer"] for r in load_detox(tmp_path / f)] == ["bad"]
        assert [r["answer"] for r in load_safe_responses(tmp_path / f)] == ["good"]
    assert [r["answer"] for r in load_safe_responses(tmp_path / "s.jsonl")] == ["fine"]  # simple layout: safe set


@pytest.mark.parametrize(("content", "loader", "message"), [
    ("prompt,answer\nq?,a\n", load_detox, r"x\.csv: record 0: field 'response': missing"),
    ("prompt,response,is_safe\nq?,a,maybe\n", load_detox, r"x\.csv: record 0: field 'is_safe': expected true or false"),
    ("question,response\nq?,a\n", load_safe_responses, r"x\.csv: record 0: field 'prompt': missing"),
    ("", load_detox, r"x\.csv: empty CSV file"),
])
def test_bad_detox_csv_names_the_file_and_record(tmp_path, content, loader, message):
    (tmp_path / "x.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        loader(tmp_path / "x.csv")


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "plain string", "challenging": False}, r"record 0: field 'prompt': expected RealToxicityPrompts"),
    ({"prompt": {"toxicity": 0.1}, "challenging": False}, r"record 0: field 'text': missing"),
    ({"prompt": {"text": "hi"}}, r"record 0: field 'challenging': missing"),
])
def test_bad_rtp_records_name_the_file_and_record(tmp_path, record, message):
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl: " + message):
        load_rtp(tmp_path / "r.jsonl")
