"""soul.safety: the output guard, locks and leftover cleanup, on plain directories (no models)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soul.errors import LockedError, OutputError
from soul.safety import (
    OUTPUT_MARKER,
    acquire_lock,
    check_output_dir,
    check_output_file,
    check_report_dir,
    clean_leftovers,
    clean_tiny_tempdirs,
    dir_lock,
    lock_path,
    mark_output,
    output_kind,
    process_start,
    release_lock,
)

HOST = socket.gethostname()

# What every run.json that soul writes holds (soul.train.loop), with the values of a tiny run.
SOUL_RUN = {"kind": "unlearn", "config": {"lr": 1e-5}, "objective": {"name": "graddiff"}, "input_model": "m",
            "data": {}, "versions": {"torch": "2"}, "steps": 2, "out_dir": "x"}


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (links not followed), by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_lock_is_refused_naming_its_owner(tmp_path, live_pid):
    target = tmp_path / "out"
    lock_path(target).write_text(f"{live_pid}\n{HOST}\n")
    with pytest.raises(LockedError, match=rf"in use by process {live_pid}"):
        acquire_lock(target)
    assert lock_path(target).read_text().startswith(str(live_pid))  # not taken over


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    target = tmp_path / "out"
    lock_path(target).write_text(f"{dead_pid()}\n{HOST}\n")
    with dir_lock(target) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
        with dir_lock(target):  # re-entrant in the owning process
            pass
        assert lock.exists()
    assert not lock_path(target).exists()


def test_two_processes_cannot_hold_one_lock(tmp_path):
    target = tmp_path / "out"
    lock = acquire_lock(target)
    try:
        code = ("import sys; from soul.safety import acquire_lock; from soul.errors import LockedError\n"
                f"try:\n    acquire_lock({str(target)!r})\nexcept LockedError as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
        assert proc.returncode == 3 and f"process {os.getpid()}" in proc.stdout
    finally:
        release_lock(lock)


def _race_for_a_stale_lock(target: str, rank: int, trials: int, barrier, dead: int, results) -> None:
    """One of the racers of `test_racing_for_a_stale_lock_never_makes_two_owners` (a forked process)."""
    sentinel = Path(target).parent / "owner"  # created with O_EXCL by each owner: existing = two owners at once
    owned = overlaps = 0
    for _trial in range(trials):
        barrier.wait(timeout=60)
        if rank == 0:  # every trial starts from a lock left by a dead process
            lock_path(target).write_text(f"{dead}\n{HOST}\n")
        barrier.wait(timeout=60)
        try:
            lock = acquire_lock(target)
        except LockedError:
            pass
        else:
            owned += 1
            try:
                fd = os.open(sentinel, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps += 1
            else:
                time.sleep(0.005)  # hold it long enough for a wrong second owner to show up
                os.close(fd)
                os.unlink(sentinel)
            release_lock(lock)
        barrier.wait(timeout=60)
    results.put((rank, owned, overlaps))


def test_racing_for_a_stale_lock_never_makes_two_owners(tmp_path):
    """8 processes race for one stale lock, 50 times: at most one owner at any moment, and someone wins."""
    racers, trials = 8, 50
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    target, dead = str(tmp_path / "out"), dead_pid()
    procs = [ctx.Process(target=_race_for_a_stale_lock, args=(target, r, trials, barrier, dead, results))
             for r in range(racers)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(overlaps for _, _, overlaps in outcome) == 0, outcome
    assert sum(owned for _, owned, _ in outcome) >= trials, outcome
    assert not lock_path(target).exists()


def test_a_lock_of_an_earlier_process_with_our_pid_or_a_reused_pid_is_taken_over(tmp_path, live_pid):
    target = tmp_path / "out"
    # After a container restart this process can have the PID the lock's dead writer had.
    lock_path(target).write_text(f"{os.getpid()}\n{HOST}\n")
    with dir_lock(target) as lock:
        assert lock.read_text().split()[:3] == [str(os.getpid()), HOST, process_start(os.getpid())]
    # A live process that is not the one that wrote the lock (its start time differs): stale too.
    lock_path(target).write_text(f"{live_pid}\n{HOST}\n1\n")
    with dir_lock(target):
        pass
    # The writer itself (same PID and start time) still holds it.
    lock_path(target).write_text(f"{live_pid}\n{HOST}\n{process_start(live_pid)}\n")
    with pytest.raises(LockedError, match=rf"in use by process {live_pid}"):
        acquire_lock(target)


def test_a_lock_from_another_host_is_never_taken_over_by_pid(tmp_path):
    target = tmp_path / "out"
    lock = lock_path(target)
    lock.write_text(f"{dead_pid()}\nother-host.example\n")
    with pytest.raises(LockedError, match=rf"held by other-host.example pid \d+; if that host is gone remove "
                                          rf"{lock}$"):
        acquire_lock(target)
    assert lock.read_text().split()[1] == "other-host.example"


def test_clean_leftovers_removes_only_dead_processes_files(tmp_path, live_pid):
    out = tmp_path / "model"
    dead = dead_pid()
    stale = [tmp_path / f".model.final-{dead}", tmp_path / f"..model.final-{dead}.tmp-abc", tmp_path / f".model.old-{dead}",
             tmp_path / f".model.tmp-{dead}-xyz", tmp_path / f".model.work-{dead}"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "weights").write_bytes(b"x" * 100)
    (tmp_path / f".model.{dead}.abc.tmp").write_text("half")
    alive = tmp_path / f".model.final-{live_pid}"
    alive.mkdir()
    (tmp_path / f".model.work-{live_pid}").mkdir()  # a running --overwrite's working directory is kept
    unrelated = [tmp_path / ".model.final-notapid", tmp_path / "model2", tmp_path / f".other.final-{dead}"]
    for d in unrelated:
        d.mkdir()
    removed = clean_leftovers(out)
    assert sorted(removed) == sorted([*stale, tmp_path / f".model.{dead}.abc.tmp"])
    assert alive.exists() and all(d.exists() for d in unrelated)
    assert (tmp_path / f".model.work-{live_pid}").exists()


def test_clean_tiny_tempdirs(tmp_path, live_pid):
    dead = dead_pid()
    (tmp_path / f"soul-tiny-{dead}-abc" / "model").mkdir(parents=True)
    (tmp_path / f"soul-tiny-{live_pid}-abc").mkdir()
    assert clean_tiny_tempdirs(tmp_path) == [tmp_path / f"soul-tiny-{dead}-abc"]
    assert (tmp_path / f"soul-tiny-{live_pid}-abc").exists()


def test_output_dir_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "src.py").write_text("print(1)")
    model, data = tmp_path / "models" / "m", tmp_path / "data"
    model.mkdir(parents=True)
    data.mkdir()
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    (data / "forget10.json").write_text("[]")
    cases = {tmp_path / "project": "not a soul output", tmp_path: "would replace the input", data: "would replace the input", tmp_path / "models": "would replace",
             model / "sub": "inside the input", tmp_path / "project" / "src.py": "is a file",
             tmp_path / "cache" / "models" / "smollm2-135m-1": "model cache"}
    for out, message in cases.items():
        with pytest.raises(OutputError, match=message):
            check_output_dir(out, inputs=[str(model), str(data)], overwrite=True)
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "run.json").write_text(json.dumps(SOUL_RUN))
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(previous)
    assert check_output_dir(previous, overwrite=True) == previous.resolve()
    working = tmp_path / "killed"
    working.mkdir()
    mark_output(working, "model")
    assert check_output_dir(working, resume=True) == working.resolve()
    assert check_output_dir(tmp_path / "new" / "dir") == (tmp_path / "new" / "dir").resolve()
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_output_file_rules(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match="would replace a file of the input"):
        check_output_file(tmp_path / "model" / "model.safetensors", inputs=[str(tmp_path / "model")])
    assert check_output_file(tmp_path / "model" / "results.json", inputs=[str(tmp_path / "model")])
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file, so nothing can be created under it"):
        check_output_file(tmp_path / "f" / "results.json")
    monkeypatch.setattr("soul.safety.os.access", lambda path, mode: False)  # as a read-only file system says
    with pytest.raises(OutputError, match="not writable"):
        check_output_file(tmp_path / "results.json")


# ----------------------------------------------------------------------------------- issue 20, items 1-4, 7
def test_only_soul_lock_records_count_as_empty(tmp_path, monkeypatch):
    """Item 1: ``poetry.lock``, an ``x.lock/`` directory, or a ``.x.lock`` that is not a lock record make a
    directory non-empty for every output check; only soul's ``.NAME.lock`` holding PID and host is ignored."""
    from soul.data.cli import check_data_dir

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    cases = {"poetry.lock": "[[package]]\nname = 'x'\n", "x.lock": None, ".notes.lock": "my notes\n",
             ".linked.lock": "link"}
    for name, content in cases.items():
        out = tmp_path / name.strip(".").replace(".", "_")
        out.mkdir()
        if name == ".linked.lock":  # a link to a lock record is not a lock record
            (tmp_path / "record").write_text("123\nhost\n")
            (out / name).symlink_to(tmp_path / "record")
        elif content is None:
            (out / name).mkdir()
            (out / name / "keep.txt").write_text("keep")
        else:
            (out / name).write_text(content)
        before = tree_hash(out)
        for check, message in ((lambda o: check_output_dir(o, overwrite=True), "not a soul output"),
                               (check_report_dir, "not a soul report"), (check_data_dir, "not a soul benchmark")):
            with pytest.raises(OutputError, match=message):
                check(out)
        assert tree_hash(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".child.lock").write_text(f"{os.getpid()}\nhost\n")  # soul's lock record: the directory is empty
    assert check_output_dir(empty) == empty.resolve()
    assert check_report_dir(empty) == empty.resolve()
    assert check_data_dir(str(empty)) == empty.resolve()


@pytest.mark.parametrize("record", [{}, {"kind": "unlearn"}, {**SOUL_RUN, "kind": "train"},
                                    {**SOUL_RUN, "config": "lr=1"}, [SOUL_RUN], "not json"])
def test_a_look_alike_run_json_is_not_a_soul_output(tmp_path, record):
    """Item 2: only a run.json with soul's keys (and kinds) makes a directory replaceable by --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    (out / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"run.json was not written by soul .*choose a new directory"):
        check_output_dir(out, overwrite=True)
    assert output_kind(out) is None
    (out / "run.json").write_text(json.dumps(SOUL_RUN))
    assert check_output_dir(out, overwrite=True) == out.resolve()
    (out / OUTPUT_MARKER).write_text("I made this\n")  # a marker file soul did not write is not proof either
    (out / "run.json").unlink()
    with pytest.raises(OutputError, match="not a soul output"):
        check_output_dir(out, overwrite=True)


def test_a_report_and_a_model_output_never_replace_each_other(tmp_path):
    """Item 3: the marker names the kind of output; --overwrite (a model) refuses a report directory, and a
    report refuses a model output; legacy markers keep their kind."""
    report, model = tmp_path / "report", tmp_path / "model"
    mark_output(report, "report")
    (report / "results.json").write_text(json.dumps({"runs": []}))
    (report / "report.html").write_text("<html></html>")
    model.mkdir()
    (model / "run.json").write_text(json.dumps(SOUL_RUN))
    (model / "model.safetensors").write_bytes(b"w")
    assert (output_kind(report), output_kind(model)) == ("report", "model")
    with pytest.raises(OutputError, match="holds a soul report"):
        check_output_dir(report, overwrite=True)
    with pytest.raises(OutputError, match="holds a soul model output"):
        check_report_dir(model)
    assert check_report_dir(report) == report.resolve()
    # A killed training run's directory (marker only) is a model output too.
    killed = tmp_path / "killed"
    mark_output(killed, "model")
    with pytest.raises(OutputError, match="holds a soul model output"):
        check_report_dir(killed)
    # Markers of earlier soul versions.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / OUTPUT_MARKER).write_text("soul output; pid 12\n")
    (legacy / "report.html").write_text("<html></html>")
    with pytest.raises(OutputError, match="holds a soul report"):
        check_output_dir(legacy, overwrite=True)
    (legacy / OUTPUT_MARKER).write_text("soul run output; pid 12\n")
    assert check_output_dir(legacy, overwrite=True) == legacy.resolve()


def test_an_output_named_through_a_symbolic_link_is_refused(tmp_path):
    """Item 4: a link as --out (to a soul output, a report, a results file) is refused, never followed."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "run.json").write_text(json.dumps(SOUL_RUN))
    (tmp_path / "to_model").symlink_to(model)
    (tmp_path / "res.json").write_text("{}")
    (tmp_path / "to_res.json").symlink_to(tmp_path / "res.json")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output_dir(tmp_path / "to_model", overwrite=True)
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output_dir(tmp_path / "dangling")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_report_dir(tmp_path / "dangling")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output_file(tmp_path / "to_res.json")
    assert not (tmp_path / "nowhere").exists()


def test_a_marker_link_is_replaced_not_written_through(tmp_path):
    """Item 4: marking a directory whose marker name is a link replaces the link, the target is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    (out / OUTPUT_MARKER).symlink_to(tmp_path / "victim.txt")
    mark_output(out, "model")
    assert (tmp_path / "victim.txt").read_text() == "keep"
    assert not (out / OUTPUT_MARKER).is_symlink() and output_kind(out) == "model"


def test_no_output_inside_the_model_cache(tmp_path, monkeypatch):
    """Item 7: results files, report and benchmark directories inside $SOUL_CACHE/models are refused."""
    from soul.data.cli import check_data_dir

    monkeypatch.setenv("SOUL_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "smollm2-135m-1"
    cached.mkdir(parents=True)
    for check in (check_output_file, check_report_dir, check_data_dir):
        with pytest.raises(OutputError, match="model cache"):
            check(cached / "results")
    with pytest.raises(OutputError, match="model cache"):
        check_output_file(cached / "config.json")
    assert sorted(p.name for p in cached.iterdir()) == []
