"""Text (copyright), multiple-choice (WMDP-style) and detox (PKU-SafeRLHF-style) loaders on small files."""

from __future__ import annotations

import json

import pytest

from soul.data.detox import load_detox
from soul.data.mcq import load_multiple_choice, mcq_from_qa
from soul.data.text import (
    TextDataset,
    continuation_items,
    load_copyright,
    load_documents,
    load_passages,
    split_passages,
)
from soul.data.validate import DataError


def jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


# --- text ---------------------------------------------------------------------------------------------------
def test_split_passages_by_hand():
    doc = " ".join(f"w{i}" for i in range(10))
    assert split_passages([doc], passage_words=4) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert split_passages([doc], passage_words=4, min_words=3) == ["w0 w1 w2 w3", "w4 w5 w6 w7"]
    items = continuation_items(["a b c d e f", "x y"], prefix_words=2, continuation_words=3)
    assert items == [{"prompt": "a b", "continuation": "c d e", "passage": 0}]


def test_text_file_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree   four five\n\nsix")
    jsonl(tmp_path / "b.jsonl", [{"text": "seven eight nine"}, {"text": "ten eleven"}])
    assert load_documents(tmp_path / "b.jsonl") == ["seven eight nine", "ten eleven"]
    assert load_passages(tmp_path / "a.txt", passage_words=4) == ["one two three four", "five six"]
    assert load_passages(tmp_path, passage_words=3) == ["one two three", "four five six", "seven eight nine",
                                                         "ten eleven"]
    jsonl(tmp_path / "c.jsonl", [{"content": "some words here"}])
    assert load_documents(tmp_path / "c.jsonl", text_field="content") == ["some words here"]


def test_text_errors(tmp_path):
    jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"bad.jsonl: record 1: field 'text': missing"):
        load_passages(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt: empty text file"):
        load_passages(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_passages(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("only three words")
    with pytest.raises(DataError, match="prefix_words=32"):
        load_copyright(tmp_path / "short.txt", passage_words=3)


def test_bundled_book_gives_prefix_continuation_items():
    passages, items = load_copyright("bundled", passage_words=64, prefix_words=32, continuation_words=32)
    assert len(passages) >= 15 and len(items) >= 15
    for it in items:
        words = passages[it["passage"]].split()
        assert it["prompt"].split() == words[:32] and it["continuation"].split() == words[32:64]


def test_text_dataset_labels_every_token(tokenizer):
    ds = TextDataset(["a short passage", "another one here"], tokenizer, max_length=5)
    for f in ds:
        assert f["labels"] == f["input_ids"] and f["input_ids"][0] == tokenizer.bos_token_id
        assert len(f["input_ids"]) <= 5


# --- multiple choice ----------------------------------------------------------------------------------------
MCQ = [{"question": "Which is a fish?", "choices": ["cat", "trout", "owl", "fern"], "answer": 1},
       {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}]


def test_mcq_local_file_and_wmdp_directory_layout(tmp_path):
    jsonl(tmp_path / "items.jsonl", MCQ)
    assert load_multiple_choice(tmp_path / "items.jsonl") == MCQ
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "wmdp" / "wmdp-bio").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(MCQ), tmp_path / "wmdp" / "wmdp-bio" / "test-00000-of-00001.parquet")
    assert load_multiple_choice(tmp_path / "wmdp", "wmdp-bio") == MCQ
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "wmdp-cyber.json").write_text(json.dumps(MCQ))
    assert load_multiple_choice(tmp_path / "flat", "wmdp-cyber") == MCQ


def test_mcq_hub_call_is_wmdp_config_test_split(monkeypatch):
    calls = []
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda p, n=None, split=None: calls.append((p, n, split)) or MCQ)
    assert load_multiple_choice("cais/wmdp", "wmdp-chem") == MCQ
    assert calls == [("cais/wmdp", "wmdp-chem", "test")]


@pytest.mark.parametrize(("record", "message"), [
    ({"question": "q", "choices": ["a", "b"]}, "record 1: field 'answer': missing"),
    ({"question": "q", "choices": ["a", "b"], "answer": "B"}, "record 1: field 'answer': expected an integer index"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "field 'answer': expected an integer index"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "field 'answer': index 2 out of range for 2 choices"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "field 'choices': expected at least 2 item"),
    ({"question": "q", "choices": "a,b", "answer": 0}, "field 'choices': expected a non-empty list"),
    ({"choices": ["a", "b"], "answer": 0}, "record 1: field 'question': missing"),
])
def test_mcq_validation_messages(tmp_path, record, message):
    path = jsonl(tmp_path / "bad.jsonl", [MCQ[0], record])
    with pytest.raises(DataError) as info:
        load_multiple_choice(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_mcq_from_bundled_qa_puts_the_true_answer_at_answer_index(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path))
    items = load_multiple_choice("bundled", "forget10_perturbed")
    from soul.data.tofu import load_split

    recs = load_split("bundled", "forget10_perturbed")
    assert [it["choices"][it["answer"]] for it in items] == [r["paraphrased_answer"] for r in recs]
    assert len({it["answer"] for it in items}) > 1  # positions are shuffled
    assert mcq_from_qa(recs) == items  # deterministic


# --- detox --------------------------------------------------------------------------------------------------
PKU = [
    {"prompt": "How do I insult my neighbour?", "response_0": "Call him a worthless idiot.",
     "response_1": "Try talking to them calmly instead.", "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "Tell me a joke.", "response_0": "Why did the chicken cross the road?",
     "response_1": "Here is a kind joke.", "is_response_0_safe": True, "is_response_1_safe": True},
    {"prompt": "Say something rude.", "response_0": "You are a moron.", "response_1": "Shut up, loser.",
     "is_response_0_safe": False, "is_response_1_safe": False},
]


def test_detox_published_layout_gives_unsafe_pairs(tmp_path):
    jsonl(tmp_path / "train.jsonl", PKU)
    pairs = load_detox(tmp_path)
    assert [(p["source_index"], p["answer"]) for p in pairs] == [
        (0, "Call him a worthless idiot."), (2, "You are a moron."), (2, "Shut up, loser.")]
    assert pairs[0]["safe_answer"] == "Try talking to them calmly instead." and "safe_answer" not in pairs[1]
    assert all(p["question"] == PKU[p["source_index"]]["prompt"] for p in pairs)


def test_detox_simple_layout_and_hub_call(tmp_path, monkeypatch):
    simple = [{"prompt": "p1", "response": "bad one"}, {"prompt": "p2", "response": "good", "is_safe": True}]
    path = jsonl(tmp_path / "simple.jsonl", simple)
    assert [p["answer"] for p in load_detox(path)] == ["bad one"]
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda p, split=None: calls.append((p, split)) or PKU)
    assert len(load_detox("PKU-Alignment/PKU-SafeRLHF", "test")) == 3
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "test")]


@pytest.mark.parametrize(("record", "message"), [
    ({**PKU[0], "is_response_1_safe": "yes"}, "record 1: field 'is_response_1_safe': expected true or false, got str"),
    ({k: v for k, v in PKU[0].items() if k != "is_response_0_safe"}, "record 1: field 'is_response_0_safe': missing"),
    ({**PKU[0], "response_1": None}, "record 1: field 'response_1': missing"),
    ({"response": "x"}, "record 1: field 'prompt': missing"),
    ({"prompt": "p", "response": 5}, "record 1: field 'response': expected a non-empty string, got int"),
])
def test_detox_validation_messages(tmp_path, record, message):
    path = jsonl(tmp_path / "bad.jsonl", [PKU[0], record])
    with pytest.raises(DataError) as info:
        load_detox(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_detox_empty_and_untokenisable(tmp_path):
    path = jsonl(tmp_path / "safe.jsonl", [PKU[1]])
    with pytest.raises(DataError, match=r"safe\.jsonl: empty split: no unsafe responses"):
        load_detox(path)

    def tok(text, add_special_tokens=False):
        return {"input_ids": [] if text == "..." else [1]}

    path = jsonl(tmp_path / "dots.jsonl", [PKU[0], {**PKU[2], "response_1": "..."}])
    with pytest.raises(DataError, match=r"dots.jsonl: record 1: field 'response_1': tokenises to no tokens"):
        load_detox(path, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="no split 'train'"):
        load_detox(tmp_path, "train")
