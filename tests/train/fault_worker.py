"""Worker for tests/train/test_fault_injection.py: a tiny `soul.unlearn` run killed with SIGKILL at its
`--kill-at`-th event. Events are what the run makes durable: every file it writes (safetensors, atomic JSON
and text writes, the log copy), every rename (checkpoint and model swaps) and every step end — so a kill can
land inside a checkpoint write, between the renames of the final swap, or between steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

RUN_OPTIONS = dict(forget_split="forget10", objective="graddiff", optimizer="sophia", max_steps=6, batch_size=1,
                   grad_accum=2, lr=1e-3, hessian_interval=2, checkpoint_every=2, progress=False)


class EventCounter:
    """Wraps the functions that make a run's files durable; calls `on_event(n)` before the n-th one."""

    def __init__(self, on_event) -> None:
        self.n, self.on_event = 0, on_event
        self.kinds: list[str] = []  # kind of each event, e.g. "save_file:rank-0.safetensors", "step"

    def _event(self, kind: str) -> None:
        self.n += 1
        self.kinds.append(kind)
        self.on_event(self.n)

    def wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            target = (args[0] if name == "write_bytes_atomic" else args[-1]) if args else ""
            self._event(f"{name}:{Path(str(target)).parent.name}/{Path(str(target)).name}")
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    def install(self) -> None:
        import soul.io
        import soul.train.checkpoint as checkpoint

        self.wrap(checkpoint, "save_file")
        self.wrap(soul.io, "write_bytes_atomic")
        self.wrap(os, "replace")
        self.wrap(os, "rename")
        self.wrap(shutil, "copy2")

    def step_hook(self, step: int, record: dict) -> None:
        self._event(f"step:{step}")


def run(model: str, data: dict, out: Path, counter: EventCounter | None = None, **extra):
    from soul.train import unlearn

    hook = counter.step_hook if counter is not None else None
    return unlearn(model, data=data, out_dir=out, on_step_end=hook, **{**RUN_OPTIONS, **extra})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", type=int, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)

    def maybe_kill(n: int) -> None:
        if n == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    counter = EventCounter(maybe_kill)
    counter.install()
    run(args.model, json.loads(Path(args.data).read_text()), Path(args.out), counter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
