"""soul.safety: the output guard, locks and leftover cleanup, on plain directories (no models)."""

from __future__ import annotations

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
    clean_leftovers,
    clean_tiny_tempdirs,
    dir_lock,
    lock_path,
    process_start,
    release_lock,
)

HOST = socket.gethostname()


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
             tmp_path / f".model.tmp-{dead}-xyz"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "weights").write_bytes(b"x" * 100)
    (tmp_path / f".model.{dead}.abc.tmp").write_text("half")
    alive = tmp_path / f".model.final-{live_pid}"
    alive.mkdir()
    unrelated = [tmp_path / ".model.final-notapid", tmp_path / "model2", tmp_path / f".other.final-{dead}"]
    for d in unrelated:
        d.mkdir()
    removed = clean_leftovers(out)
    assert sorted(removed) == sorted([*stale, tmp_path / f".model.{dead}.abc.tmp"])
    assert alive.exists() and all(d.exists() for d in unrelated)


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
    (previous / "run.json").write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(previous)
    assert check_output_dir(previous, overwrite=True) == previous.resolve()
    working = tmp_path / "killed"
    working.mkdir()
    (working / OUTPUT_MARKER).write_text("")
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
