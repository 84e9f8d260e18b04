"""Guards around what soul writes: output-directory checks, locks, leftover cleanup, durable renames.

* `check_output_dir` refuses an ``--out`` that would destroy something soul did not make: a symbolic link, a
  file, a non-empty directory that is not a soul model output, an input (model or data) or a directory holding
  one, the cached base models, an unwritable place. A directory is empty when it holds nothing but soul's lock
  records (`is_lock_record`). A previous soul output is recognised by `output_kind`: a ``run.json`` with the
  keys every soul run record has (`is_run_record`), or the marker `OUTPUT_MARKER` (soul's JSON naming the kind
  of output, ``model`` or ``report``); it is replaced only with ``overwrite``, and only by the same kind.
* `dir_lock` is a lock file ``.<name>.lock`` next to a directory (or file), held with ``flock`` while its owner
  runs and recording the owner (PID, host, start time); a second process is refused, a lock whose owner died
  is taken over (race-free), one recorded by another host never is. It is re-entrant within a process.
* `clean_leftovers` removes the temporary siblings (``.<name>.final-PID``, ``.<name>.old-PID``,
  ``.<name>.tmp-PID-*`` …) that a killed process left behind, only when that PID is no longer alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from soul.errors import LockedError, OutputError
from soul.paths import cache_dir

OUTPUT_MARKER = ".soul-output"
RUN_RECORD = "run.json"
REPORT_RECORD = "results.json"
# Keys every run.json that `soul.train.loop` writes has, and its kinds: a run.json without them is not soul's.
RUN_RECORD_KEYS = ("kind", "config", "objective", "input_model", "data", "versions", "steps")
RUN_KINDS = ("unlearn", "finetune")
OUTPUT_KINDS = ("model", "report")  # what a marker names: a training run's output, a reproduce/sweep/report dir
# Markers written before they carried the kind (`mark_output`'s old text): still recognised, with their kind.
_LEGACY_MARKERS = ((re.compile(r"soul run output; pid \d+\n?"), "model"), (re.compile(r"soul output; pid \d+\n?"), "report"))
_RECORD_LIMIT = 64 << 20  # a run record or results file larger than this is not soul's (and is not read)
LOCK_SUFFIX = ".lock"
_LOCK_NAME = re.compile(rf"^\..+{re.escape(LOCK_SUFFIX)}$")
# What `LockOwner.record` writes: PID, host, start time, boot id (one per line; older soul: PID and host).
_LOCK_RECORD = re.compile(r"\d+\n(?:[^\n]*\n?){0,3}")
LOCK_POLL_S = 0.5
CACHE_WAIT_S = 6 * 3600.0  # how long a cache user waits for another process filling the same entry
_HELD: dict[Path, list[int]] = {}  # lock files this process holds -> [descriptor holding the flock, re-entries]


# ------------------------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------- durable
def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk (best effort where the OS refuses directories)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (before the rename that makes it visible)."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def public_dir_mode(path: str | os.PathLike) -> None:
    """Give a directory made by `tempfile.mkdtemp` (mode 0700) the usual mode: 0777 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777 & ~umask)


# ----------------------------------------------------------------------------------------------- locks
# A lock is the file `.NAME.lock` next to its target, held with an exclusive `fcntl.flock` for as long as the
# owner runs. The kernel drops a flock when its process dies (however it dies), so "is the owner alive?" is
# never guessed from a PID: whoever gets the flock on the file that is still at that path owns the lock.
# The file also records the owner (PID, host, process start time, boot id), read for the error message and as
# a second check for holders that own no flock (a file system without flock, an older soul): a record of
# another host is never stale (its PID means nothing here); one of this host is stale when its process is
# gone, is this very process (a PID reused after a container restart), or has another start time or boot id.
def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).expanduser().resolve()
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from ``/proc/PID/stat``), None if unknown:
    with the PID it tells one process instance from a later one that got the same PID."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5); fields[0] is field 3


@dataclasses.dataclass(frozen=True)
class LockOwner:
    """What a lock file records about its owner (None: not recorded, e.g. a lock written by an older soul)."""

    pid: int | None
    host: str | None = None
    start: str | None = None
    boot: str | None = None

    def record(self) -> str:
        return f"{self.pid}\n{self.host}\n{self.start or '-'}\n{self.boot or '-'}\n"

    @classmethod
    def parse(cls, text: str) -> LockOwner:
        lines = [ln.strip() for ln in text.splitlines()] + ["", "", "", ""]
        pid = int(lines[0]) if lines[0].isdigit() else None
        return cls(pid, *(v if v and v != "-" else None for v in lines[1:4]))

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), process_start(os.getpid()), _boot_id())

    def foreign(self) -> bool:
        """Recorded by a process of another machine (a cache shared over NFS)."""
        return self.host is not None and self.host != socket.gethostname()

    def alive(self) -> bool:
        """Whether the recorded process may still be running (a foreign owner always may)."""
        if self.pid is None:
            return False  # empty or garbled: its writer died before writing (a live one holds the flock)
        if self.foreign():
            return True
        if self.pid == os.getpid():
            return False  # this process does not hold it (`_HELD`), so an earlier instance with our PID wrote it
        if self.boot is not None and _boot_id() not in (None, self.boot):
            return False
        if not pid_alive(self.pid):
            return False
        current = process_start(self.pid)
        return self.start is None or current is None or current == self.start


def _held_message(target: str | os.PathLike, lock: Path, owner: LockOwner) -> str:
    if owner.pid is None:
        return f"{Path(target)} is being locked by another process (lock file {lock})"
    if owner.foreign():
        return (f"{Path(target)} is locked: held by {owner.host} pid {owner.pid}; if that host is gone "
                f"remove {lock}")
    return (f"{Path(target)} is in use by process {owner.pid} (lock file {lock}); wait for it to finish, or "
            "delete the lock file if that process is not soul")


def _read_fd(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 4096, 0).decode()
    return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _take(lock: Path, target: str | os.PathLike) -> int:
    """Open, flock and claim `lock`; the open descriptor (holding the flock) or `LockedError`."""
    for _attempt in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(_held_message(target, lock, LockOwner.parse(_read_fd(fd)))) from None
            except OSError:
                pass  # no flock on this file system: the owner record below is all there is to go by
            if not _same_file(fd, lock):
                # We locked a file its owner removed on release (after we opened it): try the new one.
                os.close(fd)
                continue
            owner = LockOwner.parse(_read_fd(fd))
            if owner.alive():
                raise LockedError(_held_message(target, lock, owner))
            # Free (no owner recorded, or a dead one): we hold the flock, so no other process can be here now.
            os.ftruncate(fd, 0)
            os.pwrite(fd, LockOwner.this_process().record().encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise LockedError(f"{Path(target)}: could not take the lock {lock}")


def acquire_lock(target: str | os.PathLike, wait_s: float = 0.0) -> Path:
    """Take the lock of `target` (see the comment above). While another live process holds it, retry for up
    to `wait_s` seconds, then raise `LockedError` naming the owner."""
    lock = lock_path(target)
    if lock in _HELD:
        _HELD[lock][1] += 1
        return lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _HELD[lock] = [_take(lock, target), 1]
            return lock
        except LockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(LOCK_POLL_S, max(0.0, deadline - time.monotonic())))


def release_lock(lock: Path) -> None:
    held = _HELD.get(lock)
    if held is None:
        return
    if held[1] > 1:
        held[1] -= 1
        return
    del _HELD[lock]
    fd = held[0]
    try:
        # Remove the file while still holding its flock, and only if it is ours: a process that opened it
        # meanwhile finds, once it gets the flock, that the path no longer names it, and starts again.
        if _same_file(fd, lock):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def dir_lock(target: str | os.PathLike, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the lock of `target` (a directory or file path, which need not exist) for the ``with`` block;
    `wait_s` as in `acquire_lock` (outputs: 0, refuse at once; cache entries: `CACHE_WAIT_S`, wait for the
    process filling the entry and then use what it made)."""
    lock = acquire_lock(target, wait_s)
    try:
        yield lock
    finally:
        release_lock(lock)


# -------------------------------------------------------------------------------------------- leftovers
def _leftover_patterns(name: str) -> list[re.Pattern]:
    n = re.escape(name)
    return [re.compile(rf"^\.{n}\.(?:final|old)-(\d+)$"),            # loop staging / swapped-out directory
            re.compile(rf"^\.\.{n}\.final-(\d+)\.tmp-.*$"),           # save_model's temp dir inside the staging
            re.compile(rf"^\.{n}\.work-(\d+)$"),                      # an --overwrite run's log and checkpoints
            re.compile(rf"^\.{n}\.tmp-(\d+)-.*$"),                    # save_model's temp dir
            re.compile(rf"^\.{n}\.(\d+)\..*\.tmp$")]                   # write_bytes_atomic's temp file


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `target` left by dead soul processes; returns what was removed."""
    target = Path(target).expanduser().resolve()
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    patterns = _leftover_patterns(target.name)
    for entry in parent.iterdir():
        for pattern in patterns:
            m = pattern.match(entry.name)
            if m and not pid_alive(int(m.group(1))):
                remove_path(entry)
                removed.append(entry)
                break
    return removed


TINY_PREFIX = "soul-tiny-"


def clean_tiny_tempdirs(tmp_root: str | os.PathLike | None = None) -> list[Path]:
    """Remove ``soul-tiny-<PID>-*`` temporary model directories of dead processes (see `soul.pipeline`)."""
    import tempfile

    root = Path(tmp_root or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = re.match(rf"^{TINY_PREFIX}(\d+)-", entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
                remove_path(entry)
                removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------- out guard
def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of `path` when it is a regular file (not a link) of at most `limit` bytes, else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def is_lock_record(path: str | os.PathLike) -> bool:
    """Whether `path` is a lock soul wrote (`dir_lock`): named ``.NAME.lock``, a regular file, holding a PID
    line and a host name line. Anything else ending in ``.lock`` (``poetry.lock``, a directory) is not."""
    path = Path(path)
    if not _LOCK_NAME.match(path.name):
        return False
    data = _read_regular(path, 4096)
    try:
        return data is not None and _LOCK_RECORD.fullmatch(data.decode()) is not None
    except UnicodeDecodeError:
        return False


def user_entries(directory: str | os.PathLike) -> list[Path]:
    """The entries of `directory` other than soul's lock records: a directory with none of them is empty."""
    return [p for p in Path(directory).iterdir() if not is_lock_record(p)]


def _read_json_object(path: Path) -> dict | None:
    import json

    data = _read_regular(path, _RECORD_LIMIT)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path` when it is a regular file (not a link) of at most 64 MiB holding one, else
    None: how soul reads back a record it wrote inside its own output (e.g. ``reproduce``'s tuning records)."""
    return _read_json_object(Path(path))


def is_run_record(path: str | os.PathLike) -> bool:
    """Whether `path` is a run.json soul wrote: a JSON object (regular file, not a link) with every key of
    `RUN_RECORD_KEYS`, a ``kind`` of `RUN_KINDS` and its ``config``, ``versions`` as objects."""
    record = _read_json_object(Path(path))
    return (record is not None and all(k in record for k in RUN_RECORD_KEYS) and record["kind"] in RUN_KINDS
            and isinstance(record["config"], dict) and isinstance(record["versions"], dict)
            and isinstance(record["steps"], int))


def marker_kind(directory: str | os.PathLike) -> str | None:
    """The kind of output (`OUTPUT_KINDS`) that `directory`'s `OUTPUT_MARKER` names, or None without a soul
    marker (no file, a link, or content soul does not write)."""
    import json

    data = _read_regular(Path(directory) / OUTPUT_MARKER, 4096)
    if data is None:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    for pattern, kind in _LEGACY_MARKERS:
        if pattern.fullmatch(text):
            return kind
    try:
        value = json.loads(text)
    except ValueError:
        return None
    kind = value.get("soul_output") if isinstance(value, dict) else None
    return kind if kind in OUTPUT_KINDS else None


def is_report_results(path: str | os.PathLike) -> bool:
    """Whether `path` is a results.json of `soul reproduce`/`sweep` (a JSON object with its ``runs``)."""
    record = _read_json_object(Path(path))
    return record is not None and isinstance(record.get("runs"), (list, dict))


def output_kind(path: str | os.PathLike) -> str | None:
    """What soul wrote in directory `path`: ``"model"`` (a soul run.json, or a ``model`` marker: a training
    run's output) or ``"report"`` (a ``report`` marker, or a soul results.json: reproduce/sweep/report);
    None when it holds neither, or evidence of both."""
    path = Path(path)
    kinds = set()
    if is_run_record(path / RUN_RECORD):
        kinds.add("model")
    if (marked := marker_kind(path)) is not None:
        kinds.add(marked)
    if is_report_results(path / REPORT_RECORD):
        kinds.add("report")
    return kinds.pop() if len(kinds) == 1 else None


def is_soul_output(path: str | os.PathLike) -> bool:
    """A directory soul wrote (`output_kind` recognises it)."""
    return output_kind(path) is not None


def refuse_link(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse an output named through a symbolic link: soul would write into (or replace) what it points to."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise OutputError(f"{option} {path}: is a symbolic link (to {os.readlink(path)}); soul does not write "
                          "through links: give the real path")


def remove_path(path: str | os.PathLike) -> None:
    """Delete `path` without following links: a link (or file) is unlinked, a real directory removed with its
    contents (`shutil.rmtree` unlinks the links inside it, it never descends into them)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def links_inside(root: str | os.PathLike) -> list[Path]:
    """Symbolic links anywhere under the real directory `root` (links are not descended into)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        found += [Path(dirpath) / n for n in dirs + files if (Path(dirpath) / n).is_symlink()]
    return found


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before any work, an output whose nearest existing ancestor cannot be written."""
    path = Path(path).expanduser().resolve()
    # An existing file is replaced through its directory (its own permission is checked by the caller).
    base = nearest_existing(path if path.is_dir() else path.parent)
    if base.exists() and not base.is_dir():
        raise OutputError(f"{option} {path}: {base} is a file, so nothing can be created under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {base} is not writable (permissions or a read-only file system)")


def _local_path(value: str | os.PathLike | None) -> Path | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path.resolve() if path.exists() else None


def protected_dirs() -> list[Path]:
    """Directories no run may write into: the converted base models that every later load reads."""
    return [(cache_dir() / "models").expanduser().resolve()]


def check_not_protected(out: Path, option: str = "--out") -> None:
    """Refuse an output in, or holding, soul's cached base models (`protected_dirs`)."""
    for guarded in protected_dirs():
        if out == guarded or guarded in out.parents or out in guarded.parents:
            raise OutputError(f"{option} {out}: would write into soul's model cache {guarded}, which every later "
                              "load of a bundled model reads; choose another directory")


def check_output_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False, resume: bool = False, option: str = "--out") -> Path:
    """The resolved `out`, after refusing anything unsafe (module docstring). `inputs` are the run's model
    and data paths (aliases resolved by the caller); names that are not local paths are ignored."""
    refuse_link(out, option)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: is a file; give a directory for the output model")
    for raw in inputs:
        src = _local_path(raw)
        if src is None:
            continue
        if out == src or out in src.parents:
            raise OutputError(f"{option} {out}: would replace the input {src}; choose another directory")
        if src in out.parents and src.is_dir():
            raise OutputError(f"{option} {out}: is inside the input {src}; choose a directory outside it")
    check_not_protected(out, option)
    if out.is_dir() and user_entries(out):
        kind = output_kind(out)
        if kind == "report":
            raise OutputError(f"{option} {out}: holds a soul report (reproduce/sweep/report), not a model output; "
                              "--overwrite replaces only a previous model output: choose another directory")
        if kind is None:
            why = (f"its {RUN_RECORD} was not written by soul (a soul run record is a JSON object with "
                   f"{', '.join(RUN_RECORD_KEYS)})" if (out / RUN_RECORD).exists() or (out / RUN_RECORD).is_symlink()
                   else f"no soul {RUN_RECORD} or {OUTPUT_MARKER} marker")
            raise OutputError(f"{option} {out}: exists, is not empty and is not a soul output ({why}); soul never "
                              "replaces a directory it did not write: choose a new directory, or move the files out")
        if not (overwrite or resume):
            raise OutputError(f"{option} {out}: holds a previous soul output; pass --overwrite to replace it "
                              "(or --resume to continue its checkpoints)")
    check_writable(out, option)
    return out


def check_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      option: str = "--out") -> Path:
    """The resolved output file `out`, refused when it is a link, a directory, an input, in soul's model cache,
    or cannot be written."""
    refuse_link(out, option)
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise OutputError(f"{option} {out}: is a directory; give a file name for the results JSON")
    for raw in inputs:
        src = _local_path(raw)
        # A new file next to an input (results.json in the model directory) is fine; replacing one is not.
        if src is not None and (out == src or (out.exists() and src in out.parents)):
            raise OutputError(f"{option} {out}: would replace a file of the input {src}; choose another file")
    check_not_protected(out, option)
    check_writable(out, option)
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{option} {out}: exists and is not writable")
    return out


# ---------------------------------------------------------------------------------------- fingerprints
_HEAD_TAIL = 1 << 24
_WHOLE_LIMIT = 1 << 30  # files up to 1 GiB are hashed whole (a 135M-parameter fp32 model is 540 MB)


def fingerprint_files(root: str | os.PathLike) -> str:
    """SHA-256 over a directory's files (name, size, bytes; files over 1 GiB by their size and first and last
    16 MiB), skipping soul's bookkeeping (run record, log, checkpoints, hidden files), so a cached model
    hashes the same as its plain copy."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("checkpoints/", ".")) or "/." in rel or rel in (RUN_RECORD, "train_log.jsonl"):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _WHOLE_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(_HEAD_TAIL))
                fh.seek(size - _HEAD_TAIL)
                h.update(fh.read())
    return h.hexdigest()



def check_report_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """A report directory (`soul reproduce`/`sweep`/`report`): refused when it is a link or a file, in soul's
    model cache, a non-empty directory that is not a soul report (`output_kind` is not ``"report"``: a model
    output or a foreign directory), or cannot be written."""
    refuse_link(out, option)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: is a file; give a directory for the report")
    check_not_protected(out, option)
    if out.is_dir() and user_entries(out):
        kind = output_kind(out)
        if kind == "model":
            raise OutputError(f"{option} {out}: holds a soul model output ({RUN_RECORD}), not a report; choose "
                              "a new directory")
        if kind is None:
            raise OutputError(f"{option} {out}: exists, is not empty and is not a soul report (no soul "
                              f"{REPORT_RECORD} or {OUTPUT_MARKER} marker); choose a new directory")
    check_writable(out, option)
    return out


def mark_output(out: Path, kind: str, *, sync: bool = False) -> None:
    """Create `out` (mode 0777 minus umask) with the soul-output marker naming its `kind` (`OUTPUT_KINDS`), so
    later runs recognise it and replace it only by the same kind."""
    import json

    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if created:
        public_dir_mode(out)
    marker = out / OUTPUT_MARKER
    if marker_kind(out) is None:
        if marker.is_symlink():  # a link named like the marker is removed, never written through
            marker.unlink()
        marker.write_text(json.dumps({"soul_output": kind, "pid": os.getpid()}) + "\n")
        if sync:
            fsync_path(out)


def require_number(value: object, option: str, *, low: float | None = None, high: float | None = None,
                   integer: bool = False, allow_none: bool = False) -> None:
    """Refuse an option value of the wrong type or outside [low, high] (values from YAML bypass argparse)."""
    import math

    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise OutputError(f"option {option} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OutputError(f"option {option} must be {bounds}, got {value!r}")
