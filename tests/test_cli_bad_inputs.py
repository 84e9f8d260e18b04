"""Every sub-command against a list of bad inputs: missing, corrupt or non-UTF-8 files, wrong types, values out of
range, unsafe or unwritable outputs. Each must exit with status 2 and one line on stderr that names the file or
the option — no traceback — and leave every file as it was (inputs hashed before and after) with no output
written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model

FACTS = [{"question": f"Where does {n} live?", "answer": f"{n} lives at number {i}."}
         for i, n in enumerate(["Ada", "Bo", "Cy", "Dee", "Eve", "Flo"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A directory holding a model, a data set, broken versions of both, configs and results files."""
    root = tmp_path_factory.mktemp("world")
    save_model(*tiny_model("llama"), root / "model")
    data = root / "data"
    data.mkdir()
    perturbed = [{**r, "paraphrased_answer": r["answer"], "perturbed_answer": ["No.", "Nowhere.", "Elsewhere."]}
                 for r in FACTS[:2]]
    for name, records in {"full": FACTS, "forget10": FACTS[:2], "retain90": FACTS[2:],
                          "forget10_perturbed": perturbed}.items():
        (data / f"{name}.json").write_text(json.dumps(records))
    overlap = root / "overlap"
    overlap.mkdir()
    for name, records in {"forget10": FACTS[:2], "retain90": FACTS[1:], "full": FACTS}.items():
        (overlap / f"{name}.json").write_text(json.dumps(records))
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "forget10.json").write_text('[{"question": "Q?", "answer": ')
    (bad_json / "full.json").write_text('[{"question": "Q?", "answer": ')
    latin = root / "latin"
    latin.mkdir()
    for name in ("forget10", "retain90", "full", "forget10_perturbed"):
        (latin / f"{name}.json").write_bytes('[{"question": "Où?", "answer": "Là."}]'.encode("latin-1"))
    truncated = root / "truncated_model"
    truncated.mkdir()
    for f in (root / "model").iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "a_file").write_text("not a directory\n")
    (root / "not_empty").mkdir()
    (root / "not_empty" / "notes.md").write_text("mine\n")
    (root / "bool_steps.yaml").write_text("max_steps: true\n")
    (root / "str_authors.yaml").write_text("authors: many\n")
    (root / "broken.yaml").write_text("max_steps: [1,\n")
    (root / "a_list.yaml").write_text("- max_steps: 1\n")
    (root / "bomb.yaml").write_text(alias_bomb())
    (root / "huge.yaml").write_text("# padding\n" * 120_000)  # 1.2 MB of comments: valid YAML, too large
    (root / "results_not_soul.json").write_text(json.dumps({"forget_quality": {"agg_value": 0.5}}))
    # `soul eval --config`: every value checked against its option's type and choices (issue 20, item 16)
    (root / "int_split.yaml").write_text("forget_split: 10\n")
    (root / "bad_choice.yaml").write_text("prompt_format: xml\n")
    (root / "str_flag.yaml").write_text("no_holdout: 'yes'\n")
    (root / "float_batch.yaml").write_text("batch_size: 2.5\n")
    (root / "bad_mc_protocol.yaml").write_text("task: wmdp\neval: {mc_protocol: letters}\n")
    # A model with learned positions (256) and a data set whose forget record 1 has a ~2000-token answer.
    save_model(*tiny_model("gpt2"), root / "gpt2")
    long = root / "long"
    long.mkdir()
    long_perturbed = [dict(r) for r in perturbed]
    long_perturbed[1]["answer"] = " ".join(f"word{i}" for i in range(700))
    for name, records in {"forget10_perturbed": long_perturbed, "retain_perturbed": perturbed,
                          "real_authors_perturbed": perturbed, "world_facts_perturbed": perturbed,
                          "holdout10": FACTS[2:4]}.items():
        (long / f"{name}.json").write_text(json.dumps(records))
    (root / "results_bad.json").write_text("{not json")
    return root


def alias_bomb(levels: int = 10, width: int = 10) -> str:
    """A YAML file of < 1 KB whose aliases expand to width**levels (1e10) scalars: each level lists the
    previous one `width` times. Parsing it is instant; walking the result (str, deepcopy, a key check that
    prints it) never ends."""
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


M, D = "{root}/model", "{root}/data"
OUT = "{root}/out"
TRAIN = ["--max-steps", "1", "--no-progress"]
CASES = [
    # (argv with {root}, what the error line must contain)
    (["ask", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["ask", "hi", "--max-new-tokens", "x"], "--max-new-tokens"),
    (["ask", "hi", "--model", "{root}/missing"], "{root}/missing"),
    (["ask", "hi", "--model", "{root}/truncated_model"], "{root}/truncated_model"),
    (["ask", "hi", "--config", "{root}/missing.yaml"], "{root}/missing.yaml"),
    (["data", "make", "--out", OUT, "--authors", "190"], "--authors"),
    (["data", "make", "--out", OUT, "--authors", "1"], "--authors"),
    (["data", "make", "--out", OUT, "--qas-per-author", "0"], "qas_per_author"),
    (["data", "make", "--out", OUT, "--perturbed", "9"], "n_perturbed"),
    (["data", "make", "--out", OUT, "--seed", "1.5"], "--seed"),
    (["data", "make", "--out", "{root}/a_file"], "{root}/a_file: is a file"),
    (["data", "make", "--out", "{root}/not_empty"], "{root}/not_empty: exists, is not empty"),
    (["data", "make", "--out", "{root}/a_file/sub"], "{root}/a_file is a file"),
    (["data", "make", "--out", OUT, "--config", "{root}/str_authors.yaml"], "--authors"),
]
for command in ("finetune", "unlearn"):
    CASES += [
        ([command, "--model", "{root}/missing", "--data", D, "--out", OUT, *TRAIN], "{root}/missing"),
        ([command, "--model", "{root}/truncated_model", "--data", D, "--out", OUT, *TRAIN], "{root}/truncated_model"),
        ([command, "--model", M, "--data", "{root}/missing_data", "--out", OUT, *TRAIN], "{root}/missing_data"),
        ([command, "--model", M, "--data", "{root}/bad_json", "--out", OUT, *TRAIN], "{root}/bad_json/"),
        ([command, "--model", M, "--data", "{root}/latin", "--out", OUT, *TRAIN], "{root}/latin/"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--lr", "-1", *TRAIN], "'lr'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--lr", "1e300", *TRAIN], "'lr'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--max-steps", "0", "--no-progress"], "'max_steps'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--batch-size", "two", *TRAIN], "--batch-size"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--max-grad-norm", "-1", *TRAIN], "'max_grad_norm'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--optimizer", "adamax", *TRAIN], "'adamax'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--prompt-format", "xml", *TRAIN], "'prompt_format'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--config", "{root}/bool_steps.yaml"], "'max_steps'"),
        ([command, "--model", M, "--data", D, "--out", OUT, "--config", "{root}/missing.yaml"], "{root}/missing.yaml"),
        ([command, "--model", M, "--data", D, "--out", "{root}/a_file", *TRAIN], "{root}/a_file: is a file"),
        ([command, "--model", M, "--data", D, "--out", "{root}/not_empty", *TRAIN], "{root}/not_empty: exists"),
        ([command, "--model", M, "--data", D, "--out", "{root}", *TRAIN], "would replace the input"),
        ([command, "--model", M, "--data", D, "--out", D, *TRAIN], "would replace the input {root}/data"),
        ([command, "--model", M, "--data", D, "--out", "{root}/a_file/sub", *TRAIN], "{root}/a_file is a file"),
    ]
CASES += [
    (["unlearn", "--model", M, "--data", "{root}/overlap", "--out", OUT, *TRAIN], "{root}/overlap"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--forget-split", "forget99", *TRAIN], "forget99"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--objective", "forgetall", *TRAIN], "forgetall"),
    (["finetune", "--model", M, "--data", D, "--out", OUT, "--split", "nosuch", *TRAIN], "nosuch"),
    (["eval", "--model", "{root}/missing", "--data", D, "--out", "{root}/r.json"], "{root}/missing"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/not_empty"], "{root}/not_empty: is a directory"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/a_file/r.json"], "{root}/a_file is a file"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/model/model.safetensors"], "would replace a file"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--min-k", "2"], "--min-k"),
    (["eval", "--model", M, "--data", "{root}/missing_data", "--out", "{root}/r.json"], "{root}/missing_data"),
    (["eval", "--model", M, "--data", "{root}/latin", "--out", "{root}/r.json", "--forget-split", "forget10"],
     "{root}/latin/"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--config", "{root}/int_split.yaml"],
     "--config {root}/int_split.yaml: key 'forget_split' (--forget-split) expects a string"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--config", "{root}/bad_choice.yaml"],
     "--config {root}/bad_choice.yaml: key 'prompt_format' (--prompt-format) must be one of"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--config", "{root}/str_flag.yaml"],
     "--config {root}/str_flag.yaml: key 'no_holdout' (--no-holdout) expects true or false"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--config", "{root}/float_batch.yaml"],
     "--config {root}/float_batch.yaml: key 'batch_size' (--batch-size) expects an integer"),
    # outputs are checked before any data or model is loaded (item 18)
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--open-unlearning-dir", "{root}/a_file"],
     "--open-unlearning-dir {root}/a_file: is a file; give a directory"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--open-unlearning-dir", "{root}/a_file/sub"],
     "{root}/a_file is a file"),
    (["eval", "--model", M, "--data", D, "--out", "{root}/r.json", "--report-to", "tensorboard", "--tracker-dir",
      "{root}/a_file"], "--tracker-dir {root}/a_file: exists and is not a directory"),
    # no sequence longer than the model's context is scored (item 17): the file and record are named
    (["eval", "--model", "{root}/gpt2", "--data", "{root}/long", "--out", "{root}/r.json"],
     "{root}/long/forget10_perturbed.json: record 1: question + answer is"),
    (["eval", "--model", "{root}/gpt2", "--data", "{root}/long", "--out", "{root}/r.json", "--max-length", "300"],
     "'max_length' is 300, more than the model's context of 256 tokens"),
    (["reproduce", "--preset", "{root}/missing.yaml", "--out", OUT], "{root}/missing.yaml"),
    (["reproduce", "--preset", "tiny", "--out", "{root}/a_file"], "{root}/a_file: is a file"),
    (["reproduce", "--preset", "tiny", "--out", "{root}/not_empty"], "{root}/not_empty: exists"),
    (["reproduce", "--preset", "tiny", "--out", "{root}/a_file/sub"], "{root}/a_file is a file"),
    (["sweep", "--preset", "{root}/missing.yaml", "--out", OUT], "{root}/missing.yaml"),
    # the three YAML readers (--config, a training --preset, a reproduce preset) share one helper
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--config", "{root}/broken.yaml"],
     "--config {root}/broken.yaml: not valid YAML"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--config", "{root}/a_list.yaml"],
     "--config {root}/a_list.yaml: expected a mapping of option: value, got list"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--preset", "{root}/broken.yaml"],
     "preset {root}/broken.yaml: not valid YAML"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--preset", "{root}/a_list.yaml"],
     "preset {root}/a_list.yaml: expected a mapping of option: value, got list"),
    (["reproduce", "--preset", "{root}/broken.yaml", "--out", OUT], "preset {root}/broken.yaml: not valid YAML"),
    (["reproduce", "--preset", "{root}/a_list.yaml", "--out", OUT],
     "preset {root}/a_list.yaml: expected a mapping, got list"),
    # YAML aliases expanding to 1e10 values, and a file too large to be settings: refused by that reader
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--config", "{root}/bomb.yaml"],
     "--config {root}/bomb.yaml: aliases expand to more than"),
    (["unlearn", "--model", M, "--data", D, "--out", OUT, "--preset", "{root}/bomb.yaml"],
     "preset {root}/bomb.yaml: aliases expand to more than"),
    (["reproduce", "--preset", "{root}/bomb.yaml", "--out", OUT], "preset {root}/bomb.yaml: aliases expand to more than"),
    (["reproduce", "--preset", "{root}/huge.yaml", "--out", OUT], "preset {root}/huge.yaml: larger than 1048576 bytes"),
    (["reproduce", "--preset", "{root}/bad_mc_protocol.yaml", "--out", OUT],
     "preset {root}/bad_mc_protocol.yaml: eval.mc_protocol: expected one of ['lm_eval', 'cloze'], got 'letters'"),
    (["sweep", "--preset", "tiny", "--out", "{root}/a_file/sub"], "{root}/a_file is a file"),
    (["report", "{root}/missing.json", "--out", OUT], "{root}/missing.json"),
    (["report", "{root}/results_bad.json", "--out", OUT], "{root}/results_bad.json"),
    (["report", "{root}/results_not_soul.json", "--out", OUT], "{root}/results_not_soul.json"),
    (["report", "{root}/results_not_soul.json", "--out", OUT, "--utility-fraction", "2"], "--utility-fraction"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("SOUL_CACHE", str(world.parent / "cache"))
    args = [a.format(root=world) for a in argv]
    before = tree(world)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(args))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("soul "), lines[0]
    assert expected.format(root=world) in lines[0], lines[0]
    assert tree(world) == before  # no input changed, no output written
    assert not (world / "out").exists() and not (world / "r.json").exists()
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []  # no lock or temp file


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """The one YAML reader bounds what aliases expand to before anything walks the data (< 2 s; without the
    bound the file parses instantly and whatever reads it next hangs). Merge keys and small aliases still
    work; a document that contains itself is refused too."""
    import time

    from soul.io import read_yaml_mapping

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 2048
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^preset {bomb}: aliases expand to more than 100000 values"):
        read_yaml_mapping(bomb, f"preset {bomb}")
    assert time.perf_counter() - start < 2
    (tmp_path / "loop.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(ValueError, match="refers to a node that contains it"):
        read_yaml_mapping(tmp_path / "loop.yaml", "x")
    (tmp_path / "ok.yaml").write_text("base: &b {lr: 1.0e-4, steps: 2}\nrun: {<<: *b, steps: 3}\nagain: *b\n")
    assert read_yaml_mapping(tmp_path / "ok.yaml", "x") == {
        "base": {"lr": 1.0e-4, "steps": 2}, "run": {"lr": 1.0e-4, "steps": 3}, "again": {"lr": 1.0e-4, "steps": 2}}
