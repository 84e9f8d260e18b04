"""Issue 14 on the training commands: what `soul finetune`/`soul unlearn` refuse, and safe checkpoints/resume."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from soul.cli import main
from soul.models import save_model
from soul.testing import tiny_model
from soul.train import make_config, unlearn

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes colour {i}."} for i, n in enumerate(NAMES)]
DATA = {"full": FACTS, "forget10": FACTS[:2], "retain90": FACTS[2:]}
REPO = Path(__file__).resolve().parents[2]


def write_data(directory: Path, data: dict = DATA) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, records in data.items():
        (directory / f"{split}.json").write_text(json.dumps(records))
    return directory


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    model, tok = tiny_model("llama")
    return save_model(model, tok, tmp_path_factory.mktemp("base") / "model")


def run_cli(*args: str) -> int:
    return main([*args, "--no-progress"])


def unlearn_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--optimizer", "adamw", *extra]


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------------------ item 1 and 2
@pytest.mark.parametrize("command", ["unlearn", "finetune"])
def test_out_never_deletes_what_soul_did_not_write(base, tmp_path, capsys, command):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('precious')\n")
    data = write_data(tmp_path / "data")
    parent_of_model = base.parent
    before = {p: tree_hash(p) for p in (project, data, parent_of_model)}
    for out, message in ((project, "not a soul output"), (data, "would replace the input"),
                         (parent_of_model, "would replace the input")):
        args = unlearn_args(base, data, out) if command == "unlearn" else \
            ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "2"]
        assert run_cli(*args) == 2
        assert message in last_error(capsys)
    assert {p: tree_hash(p) for p in before} == before


def test_overwrite_replaces_only_a_previous_soul_output(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_cli(*unlearn_args(base, data, out)) == 0
    first = json.loads((out / "run.json").read_text())
    assert run_cli(*unlearn_args(base, data, out, "--lr", "2e-5")) == 2
    assert "--overwrite" in last_error(capsys)
    assert run_cli(*unlearn_args(base, data, out, "--lr", "2e-5", "--overwrite")) == 0
    second = json.loads((out / "run.json").read_text())
    assert (first["config"]["lr"], second["config"]["lr"]) == (1e-5, 2e-5)
    # --overwrite does not extend to directories soul did not write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert run_cli(*unlearn_args(base, data, tmp_path / "mine", "--overwrite")) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_cached_base_model_cannot_be_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "smollm2-135m-12345"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "run.json").write_text("{}")  # even dressed up as a soul output, with --overwrite
    data = write_data(tmp_path / "data")
    code = run_cli("unlearn", "--model", "smollm2-135m", "--data", str(data), "--out", str(cached), "--overwrite")
    assert code == 2 and "model cache" in last_error(capsys)
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "run.json"]


# ------------------------------------------------------------------------------------------ item 3 and 4
class Stop(Exception):
    pass


def stop_at(n):
    def hook(step, record):
        if step == n:
            raise Stop
    return hook


def killed_run(base: Path, out: Path, **extra) -> Path:
    options = dict(data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
                   checkpoint_every=2, progress=False)
    with pytest.raises(Stop):
        unlearn(str(base), out_dir=out, on_step_end=stop_at(3), **{**options, **extra})
    return out / "checkpoints" / "step-00000002"


class Planted:
    """Unpickling it creates a file: the proof that a checkpoint pickle ran."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (Path.touch, (self.proof,))


def test_checkpoints_hold_only_safetensors_and_json_and_resume_never_unpickles(base, tmp_path):
    ckpt = killed_run(base, tmp_path / "run")
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    proof = tmp_path / "pickle-ran"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted(proof)))
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl is not a \.safetensors or \.json file"):
        unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
                checkpoint_every=2, progress=False, out_dir=tmp_path / "run", resume=True)
    assert not proof.exists()


@pytest.mark.parametrize("change, message", [
    ({"lr": 2e-3}, "option 'lr' was 0.001, now 0.002"),
    ({"gamma": 0.5}, "option 'gamma' was None, now 0.5"),
    ({"estimator": "gradsq"}, "option 'estimator'"),
    ({"data": {**DATA, "forget10": [FACTS[1], FACTS[0]]}}, "the train data differ"),
    ({"retain_split": "full", "data": {**DATA, "full": FACTS[3:]}}, "option 'retain_split'"),
])
def test_resume_refuses_another_run_naming_what_differs(base, tmp_path, change, message):
    out = tmp_path / "run"
    killed_run(base, out)
    options = dict(data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
                   checkpoint_every=2, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume from .*step-00000002") as err:
        unlearn(str(base), out_dir=out, resume=True, **{**options, **change})
    assert message in str(err.value)


def test_resume_accepts_the_same_run_given_with_tuples(base, tmp_path):
    out = tmp_path / "run"
    killed_run(base, out, betas=(0.9, 0.99))
    _, record = unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3,
                        hessian_interval=2, checkpoint_every=2, progress=False, out_dir=out, resume=True,
                        betas=(0.9, 0.99))
    assert record["resumed_from_step"] == 2


def test_resume_refuses_another_input_model(base, tmp_path):
    out = tmp_path / "run"
    killed_run(base, out)
    model, tok = tiny_model("llama", layers=3)
    other = save_model(model, tok, tmp_path / "other")
    with pytest.raises(ValueError, match="the input model differs"):
        unlearn(str(other), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
                checkpoint_every=2, progress=False, out_dir=out, resume=True)


def test_resume_logs_h_stats_and_drops_a_partial_last_log_line(base, tmp_path):
    out = tmp_path / "run"
    killed_run(base, out)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a kill in the middle of a line
    unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
            checkpoint_every=2, progress=False, out_dir=out, resume=True)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Step 3 after resuming from step 2 takes no new Hessian estimate (interval 2): its h stats come from the
    # restored state and equal those an uninterrupted run logs.
    straight_out = tmp_path / "straight"
    unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
            checkpoint_every=2, progress=False, out_dir=straight_out)
    straight = [json.loads(x) for x in (straight_out / "train_log.jsonl").read_text().splitlines()]
    assert log[3]["h_mean"] is not None and log[3]["h_mean"] == straight[3]["h_mean"]
    assert log[3]["h_max"] == straight[3]["h_max"]


# --------------------------------------------------------------------------------------------- item 5, 6
@pytest.mark.parametrize("options, message", [
    ({"max_grad_norm": -1.0}, "'max_grad_norm' must be in [0.0"),
    ({"max_steps": True}, "'max_steps' must be an integer, got bool"),
    ({"resume": "no"}, "'resume' must be true or false"),
    ({"lr": 1e300}, "'lr' must be in (0.0, 10.0]"),
    ({"lr": float("nan")}, "'lr' must be in"),
    ({"weight_decay": -0.1}, "'weight_decay' must be in"),
    ({"betas": [0.9, 1.5]}, "'betas' must be two numbers in [0, 1)"),
    ({"rho": 0}, "'rho' must be in (0.0"),
    ({"batch_size": 2.5}, "'batch_size' must be an integer"),
    ({"warmup_ratio": 1.0}, "'warmup_ratio' must be in"),
    ({"lora_dropout": 1.0}, "'lora_dropout' must be in"),
    ({"progress": 1}, "'progress' must be true or false"),
    ({"lora_target_modules": "q_proj"}, "'lora_target_modules' must be list[str]"),
])
def test_every_option_is_range_and_type_checked(options, message):
    with pytest.raises(ValueError) as err:
        make_config(**options)
    assert message in str(err.value)


def test_yaml_options_are_checked_too(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    for text, message in (("max_steps: true\n", "key 'max_steps' (--max-steps) expects an integer"),
                          ("resume: 'no'\n", "'resume'"),
                          ("lr: 1.0e+300\n", "'lr' must be in"), ("max_grad_norm: -1\n", "'max_grad_norm'")):
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        assert main(["unlearn", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--config", str(config)]) == 2
        assert message in last_error(capsys)
    assert not (tmp_path / "o").exists()


def test_negative_max_grad_norm_no_longer_flips_the_gradient(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    assert run_cli(*unlearn_args(base, data, tmp_path / "o", "--max-grad-norm", "-1")) == 2
    assert "'max_grad_norm' must be in [0.0" in last_error(capsys)


def test_forget_retain_overlap_is_refused(base, tmp_path, capsys):
    data = write_data(tmp_path / "data", {**DATA, "retain90": DATA["retain90"] + [FACTS[1]]})
    assert run_cli(*unlearn_args(base, data, tmp_path / "o")) == 2
    line = last_error(capsys)
    assert "forget split 'forget10' record 1 is also retain split 'retain90' record 6" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- item 8
def test_corrupt_or_truncated_weights_are_one_line_errors(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00garbage" * 50)):
        broken = tmp_path / name
        broken.mkdir()
        for f in base.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        weights = broken / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        assert run_cli(*unlearn_args(broken, data, tmp_path / f"out-{name}")) == 2
        line = last_error(capsys)
        assert str(broken) in line and "corrupt or truncated" in line
        assert not (tmp_path / f"out-{name}").exists()


def test_out_naming_a_file_is_refused_before_training(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    target = tmp_path / "out.txt"
    target.write_text("mine")
    assert run_cli(*unlearn_args(base, data, target)) == 2
    assert "is a file" in last_error(capsys) and target.read_text() == "mine"


def test_disk_full_while_saving_is_one_line_naming_the_path(base, tmp_path, capsys, monkeypatch):
    import errno

    import soul.train.loop as loop

    data = write_data(tmp_path / "data")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(loop.shutil, "copy2", full)  # the log copy into the staged model directory
    assert run_cli(*unlearn_args(base, data, tmp_path / "out")) == 2
    assert last_error(capsys).endswith(f"{tmp_path / 'out'}: No space left on device")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.final")] == []  # staging removed


# ----------------------------------------------------------------------------------------------- item 9
def test_records_longer_than_the_context_are_refused_by_name(base, tmp_path, capsys):
    huge = [{"question": "Q?", "answer": "word " * 2_000_000}]  # 10 MB
    data = write_data(tmp_path / "data", {**DATA, "forget10": DATA["forget10"] + huge})
    assert run_cli(*unlearn_args(base, data, tmp_path / "o")) == 2
    line = last_error(capsys)
    assert f"{data / 'forget10.json'}: record 2 has 10000002 characters" in line and "context of 256" in line
    long = [{"question": "Q?", "answer": "word " * 300}]  # > 256 tokens, not absurdly many characters
    data = write_data(tmp_path / "data2", {**DATA, "forget10": DATA["forget10"] + long})
    assert run_cli(*unlearn_args(base, data, tmp_path / "o")) == 2
    assert f"{data / 'forget10.json'}: record 2 is " in last_error(capsys)
    assert run_cli(*unlearn_args(base, data, tmp_path / "o", "--max-length", "64")) == 0
    err = capsys.readouterr().err
    assert f"{data / 'forget10.json'}: truncated 1 record(s) to max_length=64 tokens (records 2)" in err


# ---------------------------------------------------------------------------------------------- item 13
def test_data_errors_name_the_file(base, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    (data / "forget10.json").write_bytes('[{"question": "Q?", "answer": "caf\xe9"}]'.encode("latin-1"))
    assert run_cli(*unlearn_args(base, data, tmp_path / "o")) == 2
    assert f"{data / 'forget10.json'}: not UTF-8 text (line 1" in last_error(capsys)
    split_dir = write_data(tmp_path / "data2")
    (split_dir / "forget10.json").unlink()
    (split_dir / "forget10").mkdir()
    (split_dir / "forget10" / "a.json").write_text(json.dumps(FACTS[:2]))
    (split_dir / "forget10" / "b.json").write_text(json.dumps([FACTS[2], {"question": "Q?"}]))
    assert run_cli(*unlearn_args(base, split_dir, tmp_path / "o")) == 2
    assert f"{split_dir / 'forget10' / 'b.json'}: record 1: field 'answer'" in last_error(capsys)
    # Errors found later (here: too long for the context) name the file and index inside the directory too.
    (split_dir / "forget10" / "b.json").write_text(json.dumps([{"question": "A?", "answer": "B."}, {"question": "Q?", "answer": "w " * 400}]))
    assert run_cli(*unlearn_args(base, split_dir, tmp_path / "o")) == 2
    assert f"{split_dir / 'forget10' / 'b.json'}: record 1 is " in last_error(capsys)


def test_an_answer_that_tokenises_to_nothing_names_the_file(base, tmp_path):
    from tokenizers import normalizers

    from soul.models import load_model

    model, tok = load_model(base)
    tok.backend_tokenizer.normalizer = normalizers.Replace("@", "")
    data = write_data(tmp_path / "data", {**DATA, "forget10": [FACTS[0], {"question": "Q?", "answer": "@@"}]})
    with pytest.raises(ValueError, match=rf"{data / 'forget10.json'}: record 1: field 'answer': tokenises to no"):
        unlearn(model, tok, data=str(data), max_steps=1, progress=False)


# ------------------------------------------------------------------------------------------ item 14, 15
def test_leftovers_of_killed_runs_are_cleaned_at_the_next_start(base, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    leftovers = [tmp_path / f".out.final-{dead}", tmp_path / f"..out.final-{dead}.tmp-abc", tmp_path / f".out.old-{dead}"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1000)
    unlearn(str(base), data=DATA, optimizer="adamw", max_steps=1, progress=False, out_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_model_directories_are_not_private(base, tmp_path):
    old = os.umask(0o022)
    try:
        unlearn(str(base), data=DATA, optimizer="adamw", max_steps=1, progress=False, out_dir=tmp_path / "out")
        save_model(*tiny_model("llama"), tmp_path / "saved")
    finally:
        os.umask(old)
    for d in (tmp_path / "out", tmp_path / "saved"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_checkpoint_files_are_fsynced_before_the_rename(base, tmp_path, monkeypatch):
    import soul.train.loop as loop

    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    events: list[tuple[str, str]] = []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(loop.os, "replace", replace)
    unlearn(str(base), data=DATA, optimizer="adamw", max_steps=3, checkpoint_every=2, keep_checkpoints=True,
            progress=False, out_dir=tmp_path / "out")
    tmp_ckpt = next(src for src, dst in events if dst.endswith("step-00000002"))
    for name in ("model.safetensors", "optimizer.safetensors", "checkpoint.json", "rank-0.json"):
        assert f"{tmp_ckpt}/{name}" in synced, name
    assert load_file(str(tmp_path / "out" / "checkpoints" / "step-00000002" / "model.safetensors"))


def test_python_m_soul_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "soul.cli", "unlearn", "--model", "/nonexistent/model", "--data",
                           str(write_data(tmp_path / "data")), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("soul unlearn: error: model '/nonexistent/model' not found")
    proc = subprocess.run([sys.executable, "-m", "soul.cli", "data", "make", "--out", str(tmp_path / "d"),
                           "--authors", "190"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "soul data: error: n_authors (--authors) must be in 2..181 (one to forget, one to retain; the generator "
        "has titles for 181), got 190"]
    assert not (tmp_path / "d").exists()


def test_data_generator_allows_its_largest_author_count():
    from soul.data.generate import build_splits, max_authors

    splits = build_splits(max_authors(), 1)
    assert len({r["author"] for r in splits["full"]}) == max_authors() == 181


# ---------------------------------------------------------------------------------------------- item 11
def test_an_output_in_use_by_another_process_is_refused(base, tmp_path, capsys):
    from soul.safety import lock_path

    data = write_data(tmp_path / "data")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for argv in (unlearn_args(base, data, tmp_path / "out"),
                     ["eval", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "out")],
                     ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "out")]):
            lock_path(tmp_path / "out").write_text(f"{holder.pid}\n{socket.gethostname()}\n")
            assert main(argv) == 2
            assert f"in use by process {holder.pid}" in last_error(capsys)
            assert not (tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the next run takes it over (and removes it when done).
    assert run_cli(*unlearn_args(base, data, tmp_path / "out")) == 0
    assert not lock_path(tmp_path / "out").exists()


def test_a_cache_entry_being_filled_by_another_process_is_waited_for(base, tmp_path, monkeypatch):
    import soul.pipeline as pipeline
    import soul.pipeline.stages as stages
    from soul.errors import LockedError
    from soul.safety import lock_path

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("soul.safety.CACHE_WAIT_S", 1.0)
    preset = pipeline.load_preset("tiny")
    data = {"full": FACTS, "retain90": FACTS[2:], "forget10": FACTS[:2]}
    progress = pipeline.Progress(None, 4)
    seen = []
    monkeypatch.setattr(stages, "_cached_finetune", lambda role, out, *a, **k: seen.append(out) or (str(out), "", 0.0))
    stages._reference_model("target", preset, str(base), "fp", data, progress)
    entry = seen[0]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(entry).write_text(f"{holder.pid}\n")
        with pytest.raises(LockedError, match=f"in use by process {holder.pid}"):  # after waiting 1 s
            stages._reference_model("target", preset, str(base), "fp", data, progress)
    finally:
        holder.kill()
        holder.wait()
    # A holder that finishes while we wait: the entry is used once it is free.
    import threading

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    lock_path(entry).write_text(f"{holder.pid}\n")
    reaper = threading.Thread(target=holder.wait)  # reaped as soon as it exits (a zombie's PID looks alive)
    reaper.start()
    try:
        assert stages._reference_model("target", preset, str(base), "fp", data, progress)[0] == str(entry)
    finally:
        reaper.join()
    assert not lock_path(entry).exists()


def test_a_kill_between_the_two_renames_of_the_final_swap_still_resumes(base, tmp_path):
    out = tmp_path / "run"
    killed_run(base, out)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    # What the swap leaves when killed after `out -> .out.old-PID` and before `staging -> out`.
    os.replace(out, tmp_path / f".run.old-{proc.pid}")
    staging = tmp_path / f".run.final-{proc.pid}"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    _, record = unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3,
                        hessian_interval=2, checkpoint_every=2, progress=False, out_dir=out, resume=True)
    assert record["resumed_from_step"] == 2 and record["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------------------------------- signals (issue 20)
# Runs `soul.cli.main` with AdamW's step wrapped to send this process a real signal after its AT-th step.
INTERRUPTER = """
import os, signal, sys
import torch
import soul.cli
sig, at, calls = getattr(signal, sys.argv[1]), int(sys.argv[2]), [0]
# As in a terminal: a shell's background job (nohup, `cmd &`) starts with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler — rightly so for soul, which must not override an ignored SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
real = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    result = real(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    return result
torch.optim.AdamW.step = step
raise SystemExit(soul.cli.main(sys.argv[3:]))
"""


def interrupted(signal_name: str, at_step: int, argv: list[str]) -> tuple[int, list[str]]:
    """Exit status and stderr lines, less transformers' own "Loading weights" bars (not soul's to silence)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERRUPTER, signal_name, str(at_step), *argv],
                          capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("Loading weights")]


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_says_how_to_resume_in_one_line_and_resumes(base, tmp_path, signal_name, status):
    out = tmp_path / "out"
    argv = [*unlearn_args(base, write_data(tmp_path / "data"), out), "--max-steps", "4", "--checkpoint-every", "1",
            "--no-progress"]
    code, lines = interrupted(signal_name, 3, argv)  # after the checkpoints of steps 1 and 2
    assert code == status, lines
    assert lines == [
        f"soul unlearn: interrupted by {signal_name}; its checkpoints are in {out}: rerun the same command with "
        "--resume to continue"]
    # Lock released, no temporary sibling left; the checkpoint is there and resumes.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 2


def test_a_run_interrupted_before_its_first_checkpoint_leaves_nothing_and_reruns(base, tmp_path):
    out = tmp_path / "out"
    argv = [*unlearn_args(base, write_data(tmp_path / "data"), out), "--no-progress"]
    code, lines = interrupted("SIGINT", 1, argv)
    assert code == 130, lines
    assert lines == [
        "soul unlearn: interrupted by SIGINT; no checkpoint was kept; rerun the same command to start again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the output it created is removed
    assert main(argv) == 0 and (out / "run.json").is_file()


# ------------------------------------------------------------------------------- issue 20: data loss, 1-4, 8
def every_file_hash(*roots: Path) -> dict[str, str]:
    return {f"{root}:{k}": v for root in roots for k, v in tree_hash(root).items()}


def test_a_lock_named_entry_makes_out_non_empty(base, tmp_path, capsys):
    """Item 1: ``poetry.lock`` or an ``x.lock/`` directory is the user's: the run is refused, nothing changes."""
    data = write_data(tmp_path / "data")
    for name in ("poetry.lock", "x.lock"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        if name == "x.lock":
            (out / name).mkdir()
            (out / name / "a.txt").write_text("keep")
        else:
            (out / name).write_text("[[package]]\nname = 'torch'\n")
        before = every_file_hash(out)
        assert run_cli(*unlearn_args(base, data, out)) == 2
        assert "not a soul output" in last_error(capsys)
        assert every_file_hash(out) == before
        assert sorted(p.name for p in out.iterdir()) == [name]


def test_overwrite_refuses_a_look_alike_run_json(base, tmp_path, capsys):
    """Item 2: a run.json soul did not write is no licence to replace the directory."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"name": "my experiment", "steps": 3}))
    (out / "notes.txt").write_text("keep")
    before = every_file_hash(out)
    assert run_cli(*unlearn_args(base, data, out, "--overwrite")) == 2
    error = last_error(capsys)
    assert "run.json was not written by soul" in error and "choose a new directory" in error
    assert every_file_hash(out) == before


def test_a_report_and_a_model_output_are_not_interchangeable(base, tmp_path, capsys):
    """Item 3: --overwrite never replaces a reproduce/report directory, and a report never goes into a model
    output."""
    from soul.report.cli import _guarded_report_dir

    data = write_data(tmp_path / "data")
    report = tmp_path / "report"
    with _guarded_report_dir(str(report)):
        (report / "results.json").write_text(json.dumps({"runs": []}))
        (report / "report.html").write_text("<html>my report</html>")
    model = tmp_path / "model"
    assert run_cli(*unlearn_args(base, data, model)) == 0
    before = every_file_hash(report, model)
    for command in ("unlearn", "finetune"):
        args = unlearn_args(base, data, report, "--overwrite") if command == "unlearn" else \
            ["finetune", "--model", str(base), "--data", str(data), "--out", str(report), "--max-steps", "1",
             "--overwrite"]
        assert run_cli(*args) == 2
        assert "holds a soul report" in last_error(capsys)
    for argv in (["reproduce", "--preset", "tiny", "--out", str(model)],
                 ["report", str(report / "results.json"), "--out", str(model)]):
        assert main(argv) == 2
        assert "holds a soul model output" in last_error(capsys)
    assert every_file_hash(report, model) == before


def test_resume_never_deletes_through_a_checkpoints_link(base, tmp_path):
    """Item 4: a previous output whose ``checkpoints`` is a link: --resume is refused, nothing in the link's
    target (its ``.tmp-*`` and ``step-*``) is touched."""
    from soul.errors import OutputError

    out = tmp_path / "run"
    killed_run(base, out)
    elsewhere = tmp_path / "elsewhere"
    os.replace(out / "checkpoints", elsewhere)
    (elsewhere / ".tmp-mine").mkdir()
    (elsewhere / ".tmp-mine" / "notes.txt").write_text("keep")
    (out / "checkpoints").symlink_to(elsewhere)
    before = every_file_hash(elsewhere, out)
    with pytest.raises(OutputError, match=r"checkpoints is a symbolic link .*never writes or deletes through a link"):
        unlearn(str(base), data=DATA, optimizer="sophia", max_steps=4, batch_size=1, lr=1e-3, hessian_interval=2,
                checkpoint_every=2, progress=False, out_dir=out, resume=True)
    assert every_file_hash(elsewhere, out) == before


def test_overwrite_removes_links_of_the_previous_output_as_links_only(base, tmp_path, capsys):
    """Item 4: --overwrite of an output whose ``checkpoints`` and log are links: the links go, what they point
    to is untouched, and the run says so."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    assert run_cli(*unlearn_args(base, data, out)) == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-00000001").mkdir(parents=True)
    (elsewhere / "step-00000001" / "model.safetensors").write_bytes(b"mine")
    (elsewhere / ".tmp-step-00000002").mkdir()
    (elsewhere / ".tmp-step-00000002" / "notes.txt").write_text("keep")
    (out / "checkpoints").symlink_to(elsewhere)
    (tmp_path / "my.log").write_text("my log\n")
    (out / "train_log.jsonl").unlink()
    (out / "train_log.jsonl").symlink_to(tmp_path / "my.log")
    before = every_file_hash(elsewhere) | {"log": (tmp_path / "my.log").read_text()}
    capsys.readouterr()
    assert run_cli(*unlearn_args(base, data, out, "--overwrite", "--checkpoint-every", "1",
                                 "--keep-checkpoints")) == 0
    assert "removes the link(s)" in capsys.readouterr().err
    assert every_file_hash(elsewhere) | {"log": (tmp_path / "my.log").read_text()} == before
    assert not (out / "checkpoints").is_symlink() and not (out / "train_log.jsonl").is_symlink()
    # This run's own checkpoint (the last step is not checkpointed), not a copy of what the link pointed to.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert load_file(str(out / "checkpoints" / "step-00000001" / "model.safetensors"))


def test_an_interrupted_overwrite_leaves_the_previous_output_intact(base, tmp_path):
    """Item 8: the new run works in a sibling; the previous output (log, checkpoints, model, run.json) is the
    same, byte for byte, at every step and after the run stops, until the final swap replaces it."""
    out = tmp_path / "run"
    options = dict(data=DATA, optimizer="adamw", batch_size=1, checkpoint_every=1, progress=False, out_dir=out)
    unlearn(str(base), max_steps=2, keep_checkpoints=True, **options)
    assert (out / "checkpoints" / "step-00000001").is_dir() and (out / "train_log.jsonl").is_file()
    before = every_file_hash(out)
    work = tmp_path / f".run.work-{os.getpid()}"
    seen = []

    def hook(step, record):
        seen.append((every_file_hash(out), (work / "checkpoints" / f"step-{step:08d}").is_dir()))
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        unlearn(str(base), max_steps=3, lr=2e-5, overwrite=True, on_step_end=hook, **options)
    assert seen == [(before, True), (before, True)]
    assert every_file_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the stopped run's sibling is gone
    # A killed run's sibling is removed at the next start (its PID is dead); the next --overwrite replaces.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / f".run.work-{proc.pid}" / "checkpoints").mkdir(parents=True)
    unlearn(str(base), max_steps=3, lr=2e-5, overwrite=True, **options)
    assert json.loads((out / "run.json").read_text())["config"]["lr"] == 2e-5
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
