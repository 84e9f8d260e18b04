"""The training loop under `accelerate launch` with 2 CPU processes (gloo): DDP and FSDP2 equal one process.

The launches (DDP, FSDP) start at once, in the background, and the single-process reference runs happen in
this process meanwhile; the tests then compare what they wrote. The oracle: a run on 2 processes × 2
sequences per step must give the weights of a run on 1 process × 4 sequences (the same global batch: the
loop deals record ``perm[r::world]`` to rank ``r``) — which holds only if gradients are averaged over
processes, GNB's token count B is the global one, and the gradient norm is clipped globally. The per-step
clip fraction logged by rank 0 must equal the single-process one, which under FSDP (each rank holds half of
every tensor) holds only if it is all-reduced.

Exact by construction, on any CPU: both sides train in **float64**. Splitting the batch over processes changes
the order of every sum (and CPUs of other generations sum in other orders again); in float32 that alone moved
the weights by 1.2e-5 on one CPU and by 1e-5 on another, so no float32 constant separates "same run" from "a
subtly wrong run" on every machine. In float64 the same reordering costs ~1e-14 (the float32 error ×
eps64/eps32 ≈ 1e-5 × 2e-9), so `TOL` = 1e-10 leaves a margin of ~10⁴ above rounding on any CPU while a
missing all-reduce or a wrong token count moves the weights by ~lr = 3e-3, 10⁷ × `TOL`.

The float32 smoke run (DDP, the precision users train in) is compared with the float64 truth, with a
tolerance derived from float32's own rounding on this machine and this run: `_float32_tolerance`.

GNB samples labels from the model; for an exact comparison both sides use `dist_worker.deterministic_multinomial`
(each token's draw depends on its own row only, not on how the batch is split over processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from . import dist_worker

REPO = Path(__file__).resolve().parents[2]
ACCEL_DIR = REPO / "configs" / "accelerate"
WORKER = Path(dist_worker.__file__).resolve()
WORLD, PER_PROCESS_BATCH = 2, 2
TOL = 1e-10  # float64 runs (module docstring)
EPS32 = float(torch.finfo(torch.float32).eps)
LAUNCH_TIMEOUT_S = 240
# The error SophiaG gave under FSDP2 before its statistics used the local shards of DTensor state.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_data() -> dict[str, list[dict]]:
    """8 forget and 8 retain records: 2 steps per epoch at a global batch of 4, no cyclic padding."""
    names = ["Ava", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz", "Pia"]
    records = [{"question": f"Where was {n} born?", "answer": f"{n} was born in town number {i} by the sea."}
               for i, n in enumerate(names)]
    return {"forget": records[:8], "retain": records[8:]}


def _launch(config: str, model_dir: Path, data_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL_DIR / config),
           "--main_process_port", str(_free_port()), str(WORKER), "--model", str(model_dir), "--data",
           str(data_path), "--out", str(out), "--batch-size", str(PER_PROCESS_BATCH), *extra]
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "launch.log").open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the DDP and FSDP launches, run the reference here, wait; returns the output folders."""
    from soul.models import save_model
    from soul.testing import tiny_model

    root = tmp_path_factory.mktemp("dist")
    model, tokenizer = tiny_model("llama")
    save_model(model, tokenizer, root / "init")
    data = _toy_data()
    (root / "data.json").write_text(json.dumps(data))
    procs = {"ddp": _launch("cpu_2proc_ddp.yaml", root / "init", root / "data.json", root / "ddp",
                            "--also-float32"),
             "fsdp": _launch("cpu_2proc_fsdp.yaml", root / "init", root / "data.json", root / "fsdp",
                             "--check-hutchinson", "--check-resume")}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "multinomial", dist_worker.deterministic_multinomial)
            _, ref_record = dist_worker.run(str(root / "init"), data, root / "ref",
                                            WORLD * PER_PROCESS_BATCH)
            dist_worker.run(str(root / "init"), data, root / "ref32", WORLD * PER_PROCESS_BATCH,
                            dtype=torch.float32)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"root": root, "ref": root / "ref", "ref32": root / "ref32", "ref_record": ref_record,
            **{name: (root / name, proc.returncode) for name, proc in procs.items()}}


def _finished(runs, name: str) -> Path:
    """The output folder of launch `name`, or a failure that shows the end of its log."""
    out, code = runs[name]
    if code != 0:
        log = (out / "launch.log").read_text(errors="replace")
        pytest.fail(f"{name} launch exited with {code}; end of its log:\n{log[-6000:]}")
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


def _float32_tolerance(ref32: dict[str, torch.Tensor], ref64: dict[str, torch.Tensor]) -> float:
    """How far a correct float32 run may end from the float64 truth, from float32's own rounding here.

    `ref32` is the single-process run in float32: its distance e₁ to the float64 run is what float32
    rounding does to this very computation on this CPU (Sophia divides by small curvature entries, so it is
    ~10³ × eps32 of the displacement, not eps32). A 2-process float32 run rounds as much in another order, so
    its distance to the truth is of the same size; 10·e₁ allows for the max over ~10⁵ coordinates of two
    independent roundings, and 4·eps32·max|θ| for the rounding of the weights themselves in 4 steps. A
    missing all-reduce is off by ~lr (10³–10⁴ × e₁), which this cannot hide.
    """
    e1 = _max_diff(ref32, ref64)
    weight_scale = max(t.double().abs().max().item() for t in ref64.values())
    return 10 * e1 + 4 * EPS32 * weight_scale


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()
            if line and json.loads(line)["kind"] == "train"]


def _assert_same_run(out: Path, runs) -> None:
    ref_w, init_w = _weights(runs["ref"]), _weights(runs["root"] / "init")
    # The comparison is not vacuous: training moved the weights far more than the tolerance.
    assert _max_diff(ref_w, init_w) > 1e6 * TOL
    got = _weights(out / "model")
    assert set(ref_w) <= set(got)
    assert _max_diff(got, ref_w) <= TOL
    ref_log, got_log = _log(runs["ref"]), _log(out / "model")
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log] == [1, 2, 3, 4]
    for mine, theirs in zip(got_log, ref_log):
        assert mine["hessian_updated"] == theirs["hessian_updated"]
        for key in ("loss", "forget_nll", "retain_nll", "grad_norm", "h_mean", "h_max"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), (mine["step"], key)
        # In float64 no coordinate sits within rounding of the clipping threshold: the same coordinates clip
        # (a missing all-reduce under FSDP would be off by ~×2).
        assert mine["clip_fraction"] == pytest.approx(theirs["clip_fraction"], abs=1e-9), mine["step"]


@pytest.mark.dist
def test_ddp_two_processes_match_one_process(runs):
    out = _finished(runs, "ddp")
    report = json.loads((out / "worker.json").read_text())
    assert report["world_size"] == WORLD and report["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["param_types"] == ["Parameter"]
    _assert_same_run(out, runs)


@pytest.mark.dist
def test_ddp_float32_smoke_run_is_within_float32_rounding_of_the_truth(runs):
    """The precision users train in: 2 processes in float32 end within float32's own rounding of the float64
    single-process run (`_float32_tolerance`), and both float32 runs really are float32."""
    out = _finished(runs, "ddp")
    ref64, ref32, got32 = _weights(runs["ref"]), _weights(runs["ref32"]), _weights(out / "model32")
    assert {t.dtype for t in ref64.values()} == {torch.float64}
    assert {t.dtype for t in ref32.values()} == {t.dtype for t in got32.values()} == {torch.float32}
    tol = _float32_tolerance(ref32, ref64)
    displacement = _max_diff(ref64, _weights(runs["root"] / "init"))
    assert tol < 0.05 * displacement  # the check still separates "the same run" from a different one
    assert _max_diff(got32, ref64) <= tol


@pytest.mark.dist
def test_fsdp_two_processes_match_one_process(runs):
    out = _finished(runs, "fsdp")
    report = json.loads((out / "worker.json").read_text())
    assert report["world_size"] == WORLD and report["distributed_type"] == "DistributedType.FSDP"
    # Really sharded: DTensor parameters, the root and each of the 2 decoder layers an FSDP unit.
    assert report["param_types"] == ["DTensor"]
    assert report["root_sharded"] and report["layers_sharded"] == [True, True]
    _assert_same_run(out, runs)


@pytest.mark.dist
def test_fsdp_checkpoint_and_final_model_load_in_one_process(runs):
    from soul.models import load_model

    out = _finished(runs, "fsdp")
    # The mid-run checkpoint (step 2 of 4) is a full state dict equal to the reference's weights at step 2.
    ckpt = out / "model" / "checkpoints" / "step-00000002"
    from safetensors.torch import load_file

    # Only safetensors and JSON: the weights gathered full, each process's optimizer shards and RNG.
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    assert {"rank-0.safetensors", "rank-1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    sharded_run = load_file(str(ckpt / "model.safetensors"))
    single = load_file(str(runs["ref"] / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert set(single) <= set(sharded_run)
    assert _max_diff(sharded_run, single) <= TOL
    assert _max_diff(single, _weights(runs["root"] / "init")) > 1e6 * TOL
    # The final model directory loads as a plain model in this (single) process.
    model, _ = load_model(out / "model", dtype=torch.float64)
    ref_model, _ = load_model(runs["ref"], dtype=torch.float64)
    ref_params = dict(ref_model.named_parameters())
    for name, param in model.named_parameters():
        assert type(param).__name__ == "Parameter"
        assert (param - ref_params[name]).abs().max().item() <= TOL, name
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.dist
def test_fsdp_kill_and_resume_gives_the_same_weights(runs):
    """A sharded run stopped after step 3 and resumed from its step-2 checkpoint (each process restoring its
    own optimizer shards) ends with exactly the weights of the uninterrupted sharded run."""
    out = _finished(runs, "fsdp")
    report = json.loads((out / "worker.json").read_text())
    assert report["resumed_from_step"] == 2
    straight, resumed = _weights(out / "model"), _weights(out / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.dist
def test_hutchinson_refuses_sharded_parameters(runs):
    out = _finished(runs, "fsdp")
    message = json.loads((out / "worker.json").read_text())["hutchinson_error"]
    assert message.startswith("NotImplementedError"), message
    assert "hutchinson" in message and "double backward" in message and "gnb" in message


# ------------------------------------------------------------------------- the shipped accelerate configs
CONFIGS = sorted(ACCEL_DIR.glob("*.yaml"))


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def test_every_config_is_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc_ddp",
            "cpu_2proc_fsdp"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_accelerate(path):
    """accelerate's own loader (unknown top-level keys are an error), and every nested key is a launch option."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    dests = _launch_dests()
    for key in raw.get("fsdp_config", {}):
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in dests, f"{path.name}: unknown FSDP key {key}"
    for key in raw.get("deepspeed_config", {}):
        assert key in dests, f"{path.name}: unknown DeepSpeed key {key}"
    if config.distributed_type == DistributedType.FSDP:
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if config.distributed_type == DistributedType.DEEPSPEED:
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        # No DataLoader is prepared, so the micro batch must be a number; the loop needs accumulation 1.
        assert isinstance(ds["train_micro_batch_size_per_gpu"], int)
        assert ds["gradient_accumulation_steps"] == 1
        assert "mixed_precision" not in raw  # accelerate refuses it next to a deepspeed_config_file
    if path.stem.startswith("cpu_"):
        assert config.use_cpu and config.num_processes == 2


@pytest.mark.parametrize("path", [p for p in CONFIGS if "fsdp" in p.stem], ids=lambda p: p.name)
def test_fsdp_config_builds_the_plugin(path, monkeypatch):
    """The values are ones accelerate's FSDP plugin accepts (it reads them from the launcher's variables)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = yaml.safe_load(path.read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"]),
           "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
           "FSDP_STATE_DICT_TYPE": fsdp["fsdp_state_dict_type"],
           "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]).lower(),
           "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.reshard_after_forward is True
