"""The output directory of a training run: checked, locked and cleaned before the loop starts.

`guarded_run_output` is what `soul.train.loop.run_training` wraps the loop in (on the launch's main process):
refuse an unsafe ``out_dir`` (`soul.safety.check_output_dir`), take its lock, remove leftovers of killed runs,
and mark the directory as a soul output so a later ``--resume`` or ``--overwrite`` recognises it.

A run that does not resume from a checkpoint in ``out_dir`` while ``out_dir`` holds a previous output keeps its
log and checkpoints in `work_dir` (a sibling) and leaves the previous output untouched until the final swap;
so an interrupted ``--overwrite`` leaves the previous output as it was (and a ``.<out>.work-PID`` directory
that the next start removes once PID is dead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from soul.errors import OutputError
from soul.safety import (
    OUTPUT_MARKER,
    RUN_RECORD,
    check_output_dir,
    clean_leftovers,
    dir_lock,
    fsync_path,
    fsync_tree,
    is_lock_record,
    links_inside,
    mark_output,
    output_kind,
    pid_alive,
    remove_path,
)


def launch_is_main() -> bool:
    """Whether this is the main process of a launch (``accelerate launch``/torchrun set ``RANK``)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def input_paths(input_model: str | None, data_info: dict[str, Any] | None) -> list[str]:
    paths = [input_model] if input_model else []
    for entry in (data_info or {}).values():
        if isinstance(entry, dict) and entry.get("source") not in (None, "in-memory", "bundled"):
            paths.append(str(entry["source"]))
    return paths


def work_dir(out: Path, pid: int | None = None) -> Path:
    """The sibling where a run that replaces a previous output keeps its log and checkpoints (module doc)."""
    return out.parent / f".{out.name}.work-{os.getpid() if pid is None else pid}"


def holds_previous_output(out: Path) -> bool:
    """Whether `out` holds anything but soul's marker and lock records (a previous run's files)."""
    return out.is_dir() and any(p.name != OUTPUT_MARKER and not is_lock_record(p) for p in out.iterdir())


def _links_a_run_touches(out: Path) -> list[Path]:
    """Links among what a resumed run writes or deletes in `out`: its entries and its checkpoints' entries."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_symlink()]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        found += [p for p in checkpoints.iterdir() if p.is_symlink()]
    return found


def recover_interrupted_swap(out: Path) -> Path | None:
    """A run killed between the two renames of its final swap left no `out`, only ``.<out>.old-PID`` (its
    working directory, with the checkpoints): put it back, so the run can resume instead of starting over."""
    if out.exists():
        return None
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and old.is_dir():
            os.replace(old, out)
            return out
    return None


@contextlib.contextmanager
def guarded_run_output(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool, input_model: str | None,
                       data_info: dict[str, Any] | None) -> Iterator[Path]:
    inputs = input_paths(input_model, data_info)
    out = check_output_dir(out_dir, inputs=inputs, overwrite=overwrite, resume=resume)
    with dir_lock(out):
        check_output_dir(out, inputs=inputs, overwrite=overwrite, resume=resume)  # again, now that we own it
        recover_interrupted_swap(out)
        clean_leftovers(out)
        for name in ("train_log.jsonl", OUTPUT_MARKER):  # temp files of atomic writes inside the directory
            clean_leftovers(out / name)
        checkpoints = out / "checkpoints"
        if resume:  # a resumed run writes and deletes in `out`: never through a link (into what it points to)
            links = _links_a_run_touches(out)
            if links:
                raise OutputError(f"--resume: {links[0]} is a symbolic link (to {os.readlink(links[0])}); soul "
                                  "never writes or deletes through a link in an output: replace the link by the "
                                  "real file or directory, or start over with --overwrite")
        elif out.is_dir():
            links = links_inside(out)
            if links:  # the swap removes the old directory with rmtree, which unlinks links and never follows them
                print(f"soul: note: --overwrite removes the link(s) {', '.join(map(str, links))} of the previous "
                      "output as links; nothing they point to is touched", file=sys.stderr)
        has_steps = checkpoints.is_dir() and not checkpoints.is_symlink() and any(checkpoints.glob("step-*"))
        if resume and not overwrite and (out / RUN_RECORD).is_file() and not has_steps:
            raise OutputError(f"--resume: {out} holds a finished run and no checkpoint to continue from; "
                              "pass --overwrite to train it again")
        if resume and checkpoints.is_dir() and not checkpoints.is_symlink():
            for tmp in checkpoints.glob(".tmp-*"):  # half-written checkpoints of a killed run
                remove_path(tmp)
        created = not out.exists()
        if output_kind(out) != "model":  # a new (or empty) directory; a previous output is left untouched
            mark_output(out, "model", sync=True)
        try:
            yield out
        except BaseException:
            # This run's working sibling (when it replaces a previous output) holds nothing to resume.
            remove_path(work_dir(out))
            # A run that failed before its first checkpoint leaves nothing to resume: remove what it created.
            if created and not any(checkpoints.glob("step-*")):
                remove_path(out)
            raise


def publish_output(out: Path, fill: Callable[[Path], None]) -> None:
    """Write a run's final output: `fill` writes it into a staging sibling (``.<out>.final-PID``), which is
    fsynced and renamed into place; a previous `out` (a soul output, checked by `guarded_run_output`) is
    renamed aside and removed only after the new one is in place. A failure in `fill` leaves `out` as it was
    and no staging directory."""
    staging = out.parent / f".{out.name}.final-{os.getpid()}"
    remove_path(staging)
    try:
        fill(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():  # swap in place: the old directory (this run's working files) goes only after
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        fsync_path(out.parent)
        remove_path(old)  # links in it are unlinked, never followed
    else:
        os.replace(staging, out)
        fsync_path(out.parent)
