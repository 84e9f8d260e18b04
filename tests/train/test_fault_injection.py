"""Kill a tiny `soul unlearn` with SIGKILL at random points (between steps, inside checkpoint writes, inside
the final model swap), resume it, and check the weights are bit-identical to an uninterrupted run and that no
temporary file or directory is left anywhere."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soul.models import save_model
from soul.testing import tiny_model

from . import fault_worker

REPO = Path(__file__).resolve().parents[2]
FACTS = [{"question": f"Which number did {n} pick?", "answer": f"{n} picked number {i}."}
         for i, n in enumerate(["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal", "Ivy", "Jo"])]
DATA = {"forget10": FACTS[:3], "retain90": FACTS[3:]}
# Where each seeded kill lands: a random event of that kind (so every kind is covered), or any event at all.
KILLS = [(0, "in a checkpoint write"), (1, "in a rename"), (2, "between steps"), (3, "anywhere")]


def kill_point(kinds: list[str], seed: int, where: str) -> int:
    """A 1-based event number, drawn with `seed` among the events of kind `where`."""
    test = {"in a checkpoint write": lambda k: k.startswith(("save_file:", "write_bytes_atomic:.tmp-step")),
            "in a rename": lambda k: k.startswith(("replace:", "rename:")),
            "between steps": lambda k: k.startswith("step:"), "anywhere": lambda k: True}[where]
    candidates = [i + 1 for i, kind in enumerate(kinds) if test(kind)]
    assert candidates, where
    return random.Random(seed).choice(candidates)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, the data file, an uninterrupted run's weights and how many events that run has."""
    root = tmp_path_factory.mktemp("faults")
    model = save_model(*tiny_model("llama"), root / "base")
    (root / "data.json").write_text(json.dumps(DATA))
    counter = fault_worker.EventCounter(lambda n: None)
    with pytest.MonkeyPatch.context() as mp:
        # count in this process with the worker's own wrappers, undone afterwards
        import shutil

        import soul.io
        import soul.train.checkpoint as checkpoint

        for owner, name in ((checkpoint, "save_file"), (soul.io, "write_bytes_atomic"), (os, "replace"),
                            (os, "rename"), (shutil, "copy2")):
            mp.setattr(owner, name, getattr(owner, name))
        counter.install()
        fault_worker.run(str(model), DATA, root / "straight", counter)
    return {"root": root, "model": model, "data": root / "data.json", "events": counter.n, "kinds": counter.kinds,
            "weights": load_file(str(root / "straight" / "model.safetensors"))}


@pytest.mark.parametrize("seed, where", KILLS)
def test_kill_anywhere_then_resume_gives_the_same_weights_and_no_leftovers(setup, tmp_path, seed, where):
    assert setup["events"] > 20  # steps, checkpoint files, renames, the final save: enough places to die
    kill_at = kill_point(setup["kinds"], seed, where)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.train.fault_worker", "--model", str(setup["model"]),
                           "--data", str(setup["data"]), "--out", str(out), "--kill-at", str(kill_at)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]  # it really was killed
    if not (out / "run.json").is_file():  # killed before the finished model was in place: resume
        fault_worker.run(str(setup["model"]), DATA, out, resume=True)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == setup["weights"].keys()
    for key, value in setup["weights"].items():
        assert torch.equal(got[key], value), (kill_at, key)
    # Nothing temporary anywhere: no staging/old/temp siblings, no lock, no half checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], kill_at
    hidden = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.name.startswith(".")]
    assert hidden == [], (kill_at, hidden)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, fault_worker.RUN_OPTIONS["max_steps"] + 1)), kill_at


def test_the_events_cover_checkpoint_writes_and_the_final_swap(setup):
    kinds = setup["kinds"]
    assert sum(k.startswith("step:") for k in kinds) == fault_worker.RUN_OPTIONS["max_steps"]
    assert any(k == "save_file:.tmp-step-00000002/model.safetensors" for k in kinds), kinds
    assert any(k.startswith("replace:") and k.endswith("/step-00000004") for k in kinds), kinds
    assert any(k.startswith("write_bytes_atomic:") and k.endswith("run.json") for k in kinds), kinds
