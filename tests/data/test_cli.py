"""`soul data make` and `soul data show`."""

from __future__ import annotations

import json

from soul.cli import main
from soul.data.generate import build_splits


def test_data_make_writes_the_benchmark_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["data", "make", "--out", str(out), "--authors", "12", "--qas-per-author", "3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert json.loads((out / "full.json").read_text()) == build_splits(12, 3, 5)["full"]
    # forget10 of 12 authors = ceil(1.2) = 2 authors x 3 questions.
    assert "forget10: 6 records, 2 authors" in printed and "full: 36 records, 12 authors" in printed


def test_data_make_reads_a_yaml_config(tmp_path, capsys):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"out: {tmp_path / 'b'}\nauthors: 5\nqas_per_author: 2\n")
    assert main(["data", "make", "--config", str(cfg)]) == 0
    assert len(json.loads((tmp_path / "b" / "full.json").read_text())) == 10


def test_data_show_reports_errors_as_one_line(tmp_path, capsys):
    (tmp_path / "forget10.json").write_text(json.dumps([{"question": "q?", "answer": 3}]))
    assert main(["data", "show", "forget10", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"soul data: error: {tmp_path / 'forget10.json'}: record 0: field 'answer': "
                           "expected a non-empty string, got int 3")


def test_data_show_prints_examples(tmp_path, capsys):
    main(["data", "make", "--out", str(tmp_path), "--authors", "3", "--qas-per-author", "2"])
    capsys.readouterr()
    assert main(["data", "show", "retain90", "--source", str(tmp_path), "--examples", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    first = build_splits(3, 2, 0)["retain90"][0]
    assert out == ["retain90: 4 records, 2 authors, " + out[0].split("2 authors, ")[1],
                   f"  Q: {first['question']}", f"  A: {first['answer']}"]


def test_data_make_without_out_is_a_clear_error(capsys):
    assert main(["data", "make"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
