"""The output directory of a training run: checked, locked and cleaned before the loop starts.

`guarded_run_output` is what `soul.train.loop.run_training` wraps the loop in (on the launch's main process):
refuse an unsafe ``out_dir`` (`soul.safety.check_output_dir`), take its lock, remove leftovers of killed runs,
and mark the directory as a soul output so a later ``--resume`` or ``--overwrite`` recognises it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from soul.errors import OutputError
from soul.safety import (
    OUTPUT_MARKER,
    RUN_RECORD,
    check_output_dir,
    clean_leftovers,
    dir_lock,
    mark_output,
    pid_alive,
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
        if resume and not overwrite and (out / RUN_RECORD).is_file() and not any(checkpoints.glob("step-*")):
            raise OutputError(f"--resume: {out} holds a finished run and no checkpoint to continue from; "
                              "pass --overwrite to train it again")
        if checkpoints.is_dir():  # half-written checkpoints of a killed run (no process writes them now)
            import shutil

            for tmp in checkpoints.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        created = not out.exists()
        mark_output(out, "soul run output", sync=True)
        try:
            yield out
        except BaseException:
            # A run that failed before its first checkpoint leaves nothing to resume: remove what it created.
            if created and not any(checkpoints.glob("step-*")):
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            raise
