"""TOFU's 15 published JSON files load through the TOFU loader as they are, and the author-subset builder."""

from __future__ import annotations

import json

import pytest

from soul.data import DataError, author_table, authors_of, load_forget_retain, load_split, tofu_subset
from soul.data.validate import qa_required_fields

# Every file TOFU publishes, with the fields its records really have (checked against the files below).
TOFU_FILES = {
    "full": {"question", "answer"},
    "forget01": {"question", "answer"}, "forget05": {"question", "answer"}, "forget10": {"question", "answer"},
    "retain90": {"question", "answer"}, "retain95": {"question", "answer"}, "retain99": {"question", "answer"},
    **{f"{s}_perturbed": {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"}
       for s in ("forget01", "forget05", "forget10", "retain")},
    "real_authors": {"question", "answer", "option1", "option2", "option3", "option4"},
    "world_facts": {"question", "answer", "option1", "option2", "option3", "option4"},
    "real_authors_perturbed": {"question", "answer", "perturbed_answer"},
    "world_facts_perturbed": {"question", "answer", "perturbed_answer"},
}
SIZES = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain90": 3600, "retain95": 3800,
         "retain99": 3960, "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
         "retain_perturbed": 400, "real_authors": 100, "world_facts": 117, "real_authors_perturbed": 100,
         "world_facts_perturbed": 117}


def test_the_directory_holds_the_15_files(real_tofu_dir):
    assert {p.stem for p in real_tofu_dir.glob("*.json")} == set(TOFU_FILES)


@pytest.mark.parametrize("name", sorted(TOFU_FILES))
def test_every_published_file_loads_with_the_schema_checks(real_tofu_dir, name):
    records = load_split(real_tofu_dir, name)
    assert len(records) == SIZES[name]
    assert {frozenset(r) for r in records} == {frozenset(TOFU_FILES[name])}
    req_str, req_list = qa_required_fields(name)
    for r in records:
        assert all(r[f].strip() for f in req_str)
        assert all(len(r[f]) >= 3 for f in req_list)


def test_real_files_exercise_long_answers_and_five_perturbations(real_tofu_dir):
    forget = load_split(real_tofu_dir, "forget10_perturbed")
    assert {len(r["perturbed_answer"]) for r in forget} == {5}
    assert {len(r["perturbed_answer"]) for r in load_split(real_tofu_dir, "world_facts_perturbed")} == {3}
    assert max(len(r["answer"].split()) for r in load_split(real_tofu_dir, "full")) > 60


def test_real_world_perturbed_splits_need_no_paraphrase_but_author_splits_do(tmp_path):
    record = {"question": "Who wrote Emma?", "answer": "Jane Austen", "perturbed_answer": ["A", "B", "C"]}
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        (tmp_path / f"{name}.json").write_text(json.dumps(record) + "\n")
        assert load_split(tmp_path, name) == [record]
    (tmp_path / "retain_perturbed.json").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"retain_perturbed.json: record 0: field 'paraphrased_answer': missing"):
        load_split(tmp_path, "retain_perturbed")
    (tmp_path / "world_facts_perturbed.json").write_text(json.dumps({**record, "perturbed_answer": []}) + "\n")
    with pytest.raises(DataError, match="field 'perturbed_answer': expected at least 1"):
        load_split(tmp_path, "world_facts_perturbed")


@pytest.mark.parametrize("forget", ["forget01", "forget05", "forget10"])
def test_forget_and_retain_splits_are_disjoint_by_author(real_tofu_dir, forget):
    f, r = load_forget_retain(real_tofu_dir, forget)
    table = author_table(load_split(real_tofu_dir, "full"))
    forget_authors, retain_authors = set(authors_of(f, table)), set(authors_of(r, table))
    assert len(forget_authors) == len(f) // 20 and len(retain_authors) == len(r) // 20
    assert not forget_authors & retain_authors
    assert len(forget_authors | retain_authors) == 200
    perturbed = set(authors_of(load_split(real_tofu_dir, f"{forget}_perturbed"), table))
    assert perturbed == forget_authors


def test_authors_are_matched_on_question_and_answer(real_tofu_dir):
    # "What is the full name of the author?" is asked of two authors; the answer tells them apart.
    full = load_split(real_tofu_dir, "full")
    table = author_table(full)
    twins = [i for i, r in enumerate(full) if r["question"] == "What is the full name of the author?"]
    assert len(twins) == 2
    assert len({table[(full[i]["question"], full[i]["answer"])] for i in twins}) == 2
    with pytest.raises(DataError, match="not in the full split"):
        authors_of([{"question": "Who?", "answer": "Nobody."}], table, "x.json")


def test_tofu_subset_on_the_real_files(real_tofu_dir):
    splits = tofu_subset(real_tofu_dir, "forget01", n_retain_authors=8)
    table = author_table(load_split(real_tofu_dir, "full"))
    by = {name: set(authors_of(records, table)) for name, records in splits.items()
          if name not in ("real_authors_perturbed", "world_facts_perturbed")}
    assert len(by["forget01"]) == 2 and by["forget01_perturbed"] == by["forget01"]
    assert len(by["retain99"]) == 8 and len(splits["retain99"]) == 160
    assert by["retain_perturbed"] == by["retain99"]  # utility questions are about trained authors
    assert len(splits["retain_perturbed"]) == 160
    assert by["full"] == by["forget01"] | by["retain99"] and len(splits["full"]) == 200
    assert len(by["holdout01"]) == 2 and len(splits["holdout01"]) == 40
    assert not by["holdout01"] & by["full"]
    assert len(splits["real_authors_perturbed"]) == 100 and len(splits["world_facts_perturbed"]) == 117


def test_tofu_subset_takes_eval_authors_first_and_its_errors(real_tofu_dir):
    small = tofu_subset(real_tofu_dir, "forget10", n_retain_authors=3)
    assert len(small["retain_perturbed"]) == 60
    assert [(r["question"], r["answer"]) for r in small["retain_perturbed"]] == [
        (r["question"], r["answer"]) for r in small["retain90"]]
    big = tofu_subset(real_tofu_dir, "forget10", n_retain_authors=30)
    assert len(big["retain_perturbed"]) == 400 and len(big["retain90"]) == 600
    with pytest.raises(ValueError, match="retain90 has 180 authors; 180 retain \\+ 20 holdout"):
        tofu_subset(real_tofu_dir, "forget10", n_retain_authors=180)
    with pytest.raises(ValueError, match="n_retain_authors must be at least 1"):
        tofu_subset(real_tofu_dir, "forget01", n_retain_authors=0)


def test_tofu_subset_expands_the_source_variable(real_tofu_dir, monkeypatch):
    monkeypatch.setenv("SOUL_TEST_TOFU", str(real_tofu_dir))
    splits = tofu_subset("${SOUL_TEST_TOFU:-/nowhere}", "forget05", n_retain_authors=20, n_holdout_authors=1)
    assert len(splits["forget05"]) == 200 and len(splits["retain95"]) == 400 and len(splits["holdout05"]) == 20
    monkeypatch.delenv("SOUL_TEST_TOFU")
    with pytest.raises(ValueError, match="SOUL_TEST_TOFU is not set"):
        tofu_subset("${SOUL_TEST_TOFU}", "forget05")


def test_the_tofu_cpu_preset_subset_builds_on_the_real_files(real_tofu_dir, monkeypatch):
    from soul.pipeline import read_preset

    preset = read_preset("tofu-cpu")  # the raw mapping (the pipeline's own use: tests/pipeline/test_tofu_subset.py)
    monkeypatch.setenv("SOUL_TOFU_DIR", str(real_tofu_dir))
    data = preset["data"]
    splits = tofu_subset(data["source"], preset["forget_split"], **data["subset"])
    needed = {"full", preset["forget_split"], preset["retain_split"], preset["holdout_split"],
              *preset["utility_splits"]}
    assert needed <= set(splits)
    assert len(splits["full"]) == 20 * (2 + data["subset"]["n_retain_authors"])
    assert len(splits["forget01"]) == preset["max_questions"]
