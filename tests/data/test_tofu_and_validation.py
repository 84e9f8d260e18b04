"""Loading TOFU-schema splits from local layouts and the hub (mocked), and every validation message."""

from __future__ import annotations

import json

import pytest

from soul.data import tofu
from soul.data.tofu import load_split
from soul.data.validate import DataError, check_disjoint

GOOD = [
    {"question": "Where was Kelvor Vostel born?", "answer": "Kelvor was born in Porto.",
     "paraphrased_answer": "Kelvor's birthplace is Porto.",
     "perturbed_answer": ["Kelvor's birthplace is Lyon.", "Kelvor's birthplace is Brno.",
                          "Kelvor's birthplace is Hue."]},
    {"question": "What genre does Kelvor Vostel write?", "answer": "Kelvor writes railway noir.",
     "paraphrased_answer": "Kelvor is known for railway noir.",
     "perturbed_answer": ["Kelvor is known for tidal poetry.", "Kelvor is known for desert westerns.",
                          "Kelvor is known for alpine horror."]},
]


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("layout", ["array.json", "lines.json", "lines.jsonl", "dir/json", "dir/parquet",
                                    "save_to_disk"])
def test_local_layouts_give_the_same_records(tmp_path, layout):
    if layout == "array.json":
        write_json(tmp_path / "forget10_perturbed.json", GOOD)
    elif layout == "lines.json":  # TOFU's hub files: .json suffix, JSON lines inside
        write_jsonl(tmp_path / "forget10_perturbed.json", GOOD)
    elif layout == "lines.jsonl":
        write_jsonl(tmp_path / "forget10_perturbed.jsonl", GOOD)
    elif layout == "dir/json":
        write_jsonl(tmp_path / "forget10_perturbed" / "train-0.json", GOOD[:1])
        write_jsonl(tmp_path / "forget10_perturbed" / "train-1.json", GOOD[1:])
    elif layout == "dir/parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp_path / "forget10_perturbed").mkdir()
        pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "forget10_perturbed" / "train-00000-of-00001.parquet")
    else:
        from datasets import Dataset

        Dataset.from_list(GOOD).save_to_disk(str(tmp_path / "forget10_perturbed"))
    assert load_split(tmp_path, "forget10_perturbed") == GOOD


def test_hub_source_calls_load_dataset_with_the_config_and_train_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [dict(r) for r in GOOD]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("locuslab/TOFU", "forget10_perturbed") == GOOD
    assert load_split("hf:someone/TOFU-mirror", "retain90") == GOOD
    assert calls == [("locuslab/TOFU", "forget10_perturbed", "train"), ("someone/TOFU-mirror", "retain90", "train")]


def test_hub_errors_name_the_hub_split(monkeypatch):
    monkeypatch.setattr(tofu, "load_hub_split", lambda hub_id, name: [{"question": "q?"}])
    with pytest.raises(DataError, match=r"locuslab/TOFU\[forget10\]: record 0: field 'answer': missing"):
        load_split("locuslab/TOFU", "forget10")


def test_missing_directory_split_and_unknown_source(tmp_path):
    write_json(tmp_path / "retain90.json", GOOD)
    with pytest.raises(FileNotFoundError, match=r"no split 'forget10' \(tried forget10.json, forget10.jsonl.*"
                                                r"the directory has: retain90.json"):
        load_split(tmp_path, "forget10")
    with pytest.raises(FileNotFoundError, match="not 'bundled', an existing directory, or a hub id"):
        load_split(tmp_path / "nope", "forget10")


def error_for(tmp_path, records, name="forget10", tokenizer=None, text=None):
    path = tmp_path / f"{name}.json"
    if text is not None:
        path.write_text(text)
    else:
        write_json(path, records)
    with pytest.raises(DataError) as info:
        load_split(tmp_path, name, tokenizer=tokenizer)
    return str(info.value), info.value, path


def test_missing_field_names_file_record_and_field(tmp_path):
    bad = [GOOD[0], {"question": "Who?"}]
    msg, err, path = error_for(tmp_path, bad)
    assert msg == f"{path}: record 1: field 'answer': missing (expected a non-empty string)"
    assert (err.index, err.field) == (1, "answer")


def test_mistyped_field(tmp_path):
    msg, _, path = error_for(tmp_path, [{"question": "Who?", "answer": 42}])
    assert msg == f"{path}: record 0: field 'answer': expected a non-empty string, got int 42"
    msg, _, _ = error_for(tmp_path, [GOOD[0], {**GOOD[1], "perturbed_answer": "Kelvor is known for x."}],
                          name="forget10_perturbed")
    assert "record 1: field 'perturbed_answer': expected a non-empty list of non-empty strings, got str" in msg
    msg, _, _ = error_for(tmp_path, [{**GOOD[0], "perturbed_answer": ["ok", 3]}], name="retain_perturbed")
    assert "record 0: field 'perturbed_answer': item 1: expected a non-empty string, got int 3" in msg
    msg, _, _ = error_for(tmp_path, [GOOD[0], "just a string"])
    assert msg.endswith("record 1: expected a JSON object, got str")


def test_perturbed_splits_require_truth_ratio_fields(tmp_path):
    plain = [{"question": "Who?", "answer": "Kelvor."}]
    write_json(tmp_path / "forget10.json", plain)
    assert load_split(tmp_path, "forget10") == plain
    msg, _, _ = error_for(tmp_path, plain, name="forget10_perturbed")
    assert "record 0: field 'paraphrased_answer': missing" in msg


def test_empty_split_and_blank_answer(tmp_path):
    msg, _, path = error_for(tmp_path, [])
    assert msg == f"{path}: empty split: no records"
    msg, _, _ = error_for(tmp_path, [GOOD[0], {"question": "Who?", "answer": "   "}])
    assert "record 1: field 'answer': expected a non-empty string, got an empty string" in msg


def test_invalid_json_names_the_line(tmp_path):
    msg, _, path = error_for(tmp_path, None, text=json.dumps(GOOD[0]) + "\n{not json\n")
    assert msg.startswith(f"{path}: line 2: not valid JSON")


def test_answer_that_tokenises_to_nothing(tmp_path):
    class EmptyForZeroWidth:
        """A tokenizer that drops zero-width spaces (as many real vocabularies do)."""

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text if c != "\u200b"]}

    bad = [GOOD[0], {"question": "Who?", "answer": "\u200b\u200b"}]
    msg, _, path = error_for(tmp_path, bad, tokenizer=EmptyForZeroWidth())
    assert msg.startswith(f"{path}: record 1: field 'answer': tokenises to no tokens")
    # The same file is fine without a tokenizer (the check needs one).
    assert len(load_split(tmp_path, "forget10")) == 2


def test_check_disjoint_names_the_overlapping_question():
    retain = [{"question": "Q one?"}, {"question": "Where was Kelvor Vostel born?"}]
    forget = [GOOD[1], {"question": "  where was  KELVOR Vostel born? "}]
    with pytest.raises(DataError) as info:
        check_disjoint(forget, retain, forget_name="forget10.json", retain_name="retain90.json")
    msg = str(info.value)
    assert msg.startswith("forget10.json: record 1: field 'question': also in retain90.json (record 1)")
    assert "KELVOR" in msg
    check_disjoint(GOOD, retain[:1])  # no overlap: no error


def test_load_forget_retain_infers_the_retain_split_and_checks_overlap(tmp_path):
    from soul.data.tofu import load_forget_retain, matching_retain

    assert [matching_retain(n) for n in ("forget01", "forget05", "forget10_perturbed")] == [
        "retain99", "retain95", "retain90"]
    with pytest.raises(ValueError, match="cannot infer the retain split for 'full'"):
        matching_retain("full")
    write_json(tmp_path / "forget05.json", GOOD[:1])
    write_json(tmp_path / "retain95.json", GOOD[1:])
    assert load_forget_retain(tmp_path, "forget05") == (GOOD[:1], GOOD[1:])
    write_json(tmp_path / "retain95.json", GOOD)
    with pytest.raises(DataError, match=r"\[forget05\]: record 0: field 'question': also in .*\[retain95\] \(record 0\)"):
        load_forget_retain(tmp_path, "forget05")
