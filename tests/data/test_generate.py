"""The bundled benchmark generator: determinism, schema, split structure, perturbations, names."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from soul.data.generate import (
    TEMPLATES,
    build_splits,
    forget_author_counts,
    is_acceptable_name,
    make_benchmark,
    real_names,
)
from soul.data.tofu import load_split
from soul.data.validate import check_disjoint, validate_qa

TOFU_FILES = ["full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90", "forget01_perturbed",
              "forget05_perturbed", "forget10_perturbed", "retain_perturbed", "holdout01", "holdout05",
              "holdout10", "real_authors_perturbed", "world_facts_perturbed"]


@pytest.fixture(scope="module")
def splits():
    return build_splits(n_authors=20, qas_per_author=10, seed=0)


def authors_of(records):
    return [r["author"] for r in records]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = make_benchmark(tmp_path / "a", n_authors=6, qas_per_author=4, seed=3)
    b = make_benchmark(tmp_path / "b", n_authors=6, qas_per_author=4, seed=3)
    c = make_benchmark(tmp_path / "c", n_authors=6, qas_per_author=4, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "full.json").read_bytes() != (c / "full.json").read_bytes()


def test_writes_every_tofu_file_and_a_manifest_with_true_hashes(tmp_path):
    out = make_benchmark(tmp_path, n_authors=10, qas_per_author=3, seed=1)
    assert {p.stem for p in out.glob("*.json")} == {*TOFU_FILES, "manifest"}
    assert not list(out.glob(".*"))  # no temp files left behind
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["n_authors"], manifest["qas_per_author"]) == (1, 10, 3)
    for name in TOFU_FILES:
        entry = manifest["splits"][name]
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["records"] == len(json.loads(data))


def test_every_record_has_the_tofu_schema(splits):
    for name, records in splits.items():
        validate_qa(records, name, name)
        for r in records:
            assert isinstance(r["paraphrased_question"], str) and r["paraphrased_question"] != r["question"]
            assert 3 <= len(r["perturbed_answer"]) <= 5


@pytest.mark.parametrize("n_authors", [2, 7, 20, 40, 150])
def test_forget_split_sizes_are_whole_nested_authors(n_authors):
    s = build_splits(n_authors=n_authors, qas_per_author=2, seed=0)
    full = authors_of(s["full"])
    assert len(s["full"]) == 2 * n_authors and len(set(full)) == n_authors
    prev: set[str] = set()
    for p in (1, 5, 10):
        k = min(n_authors - 1, max(1, math.ceil(p * n_authors / 100)))
        forget, retain = set(authors_of(s[f"forget{p:02d}"])), set(authors_of(s[f"retain{100 - p:02d}"]))
        assert len(forget) == k == forget_author_counts(n_authors)[p]
        assert len(s[f"forget{p:02d}"]) == 2 * k  # every question of each forget author
        assert forget | retain == set(full) and not forget & retain
        assert prev <= forget  # forget01 ⊂ forget05 ⊂ forget10
        prev = forget
        holdout = set(authors_of(s[f"holdout{p:02d}"]))
        assert len(holdout) == k and not holdout & set(full)
        check_disjoint(s[f"forget{p:02d}"], s[f"retain{100 - p:02d}"])
    assert not set(authors_of(s["retain_perturbed"])) & set(authors_of(s["forget10"]))


def test_perturbed_answers_differ_from_answer_and_keep_the_paraphrase_frame(splits):
    for name in ("full", "holdout10", "world_facts_perturbed", "real_authors_perturbed"):
        for r in splits[name]:
            pert = r["perturbed_answer"]
            assert len(set(pert)) == len(pert)
            assert r["answer"] not in pert and r["paraphrased_answer"] not in pert
    for r in splits["full"]:
        # Same frame: the perturbed answer and the paraphrased answer share a prefix or a suffix of words
        # that is at least half the sentence; only the fact changes.
        pw = r["paraphrased_answer"].split()
        for p in r["perturbed_answer"]:
            w = p.split()
            pre = next((i for i, (x, y) in enumerate(zip(pw, w)) if x != y), min(len(w), len(pw)))
            suf = next((i for i, (x, y) in enumerate(zip(pw[::-1], w[::-1])) if x != y), min(len(w), len(pw)))
            assert pre + suf >= len(pw) // 2, (r["paraphrased_answer"], p)


def test_facts_are_consistent_per_author(splits):
    by_author: dict[str, dict[str, str]] = {}
    for r in splits["full"]:
        by_author.setdefault(r["author"], {})[r["question"].split(r["author"])[0]] = r["answer"]
    for author, answers in by_author.items():
        first = author.split()[0]
        assert all(a.startswith(first) for a in answers.values())
        year = int(answers["In what year was "].rstrip(".").split()[-1])
        award_q = next(q for q in answers if q.startswith("In what year did "))
        award_year = int(answers[award_q].rstrip(".").split()[-1])
        assert 24 <= award_year - year <= 45 or award_year == 2023


def test_names_are_invented_unique_and_not_real(splits):
    names = authors_of(splits["full"]) + authors_of(splits["holdout10"])
    unique = sorted(set(names))
    assert len({n.split()[0] for n in unique}) == len(unique)  # first names unique too
    real = real_names()
    for n in unique:
        first, last = n.split()
        assert first.lower() not in real and last.lower() not in real
    assert not is_acceptable_name("Jane", "Vostel") and not is_acceptable_name("Kelvor", "Austen")
    assert is_acceptable_name("Kelvor", "Vostel")


def test_answers_are_short(splits):
    # The demo fine-tunes a 135M model on CPU: one sentence, a few words.
    for r in splits["full"]:
        assert len(r["answer"].split()) <= 12 and r["answer"].count(".") <= 2


def test_qas_per_author_uses_the_first_templates_and_rejects_bad_arguments():
    s = build_splits(n_authors=3, qas_per_author=len(TEMPLATES), seed=2)
    assert len(s["full"]) == 3 * len(TEMPLATES)
    for bad in ({"n_authors": 1}, {"qas_per_author": 0}, {"qas_per_author": len(TEMPLATES) + 1},
                {"n_perturbed": 2}, {"n_perturbed": 6}):
        with pytest.raises(ValueError):
            build_splits(**{"n_authors": 5, **bad})


def test_bundled_source_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path))
    first = load_split("bundled", "forget10")
    cached = list((tmp_path / "data").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    mtime = (cached[0] / "forget10.json").stat().st_mtime_ns
    assert load_split("bundled", "forget10") == first == build_splits()["forget10"]
    assert (cached[0] / "forget10.json").stat().st_mtime_ns == mtime  # not regenerated
