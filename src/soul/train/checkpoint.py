"""Checkpoints that hold only safetensors and JSON (nothing is unpickled on resume).

A checkpoint directory holds:

* ``model.safetensors`` — the trainable weights, full tensors (written by the main process; under FSDP
  gathered first), so a checkpoint of a sharded run loads in one process;
* ``optimizer.safetensors`` + ``optimizer.json`` — the optimizer's tensor state (``optim.<index>.<key>``)
  and its non-tensor parts (param groups with Sophia's counters, scalar state), when every process holds
  the same optimizer state (one process, DDP);
* ``rank-<r>.safetensors`` + ``rank-<r>.json`` — per process: its RNG states (torch CPU / CUDA as uint8
  tensors, Python's and NumPy's as JSON) and, under FSDP, its local shards of the parameters and of the
  optimizer state;
* ``checkpoint.json`` — step, configuration, world size, data and model fingerprints, the scheduler's and
  the loop's progress state.

`load_checkpoint` first refuses any file whose name does not end in ``.safetensors`` or ``.json``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from soul.io import write_json_atomic
from soul.safety import fsync_path

ALLOWED_SUFFIXES = (".safetensors", ".json")
META_NAME = "checkpoint.json"
MODEL_NAME = "model.safetensors"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (foreign files, missing parts, unreadable tensors)."""


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return _local(t).detach().to("cpu").contiguous().clone()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    fsync_path(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err})") from None


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data)
    fsync_path(path)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    version, internal, gauss = random.getstate()
    values: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        values["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    for key, state in tensors.items():
        if key.startswith("rng.cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(state, int(key.rsplit(".", 1)[1]))
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in values:
        import numpy as np

        name, keys, pos, has_gauss, cached = values["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ optimizer
def split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors ``optim.<index>.<key>``, JSON-able rest) of ``optimizer.state_dict()`` (local shards)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = _cpu_copy(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                            rest: dict[str, Any], where: Path) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, index, key = name.split(".", 2)
        i = int(index)
        if i >= len(params):
            raise CheckpointError(f"{where}: optimizer state for parameter {i}, but the optimizer has {len(params)}")
        param = params[i]
        if _is_dtensor(param) and value.dim() > 0 and tuple(value.shape) == tuple(param.to_local().shape):
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value.to(param.device), device_mesh=param.device_mesh,
                                       placements=param.placements, run_check=False, shape=param.shape,
                                       stride=param.stride())
        state.setdefault(i, {})[key] = value
    for index, values in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    # Parameter order, as a run that never stopped created it (safetensors lists keys alphabetically, and
    # diagnostics summed over the state in dict order would differ in the last bits).
    state = dict(sorted(state.items()))
    groups = rest["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{where}: {len(groups)} optimizer param groups, this run has "
                              f"{len(optimizer.param_groups)}")
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------- save
def save_checkpoint(directory: Path, *, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any]) -> None:
    """Write a checkpoint of the prepared `model`, the raw `optimizer` and `meta` (JSON) into `directory`.

    Every process must call it (gathering FSDP weights is collective). `directory` must exist.
    """
    main, rank = accelerator.is_main_process, accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    names = set(trainable_names(unwrapped))
    sharded = is_sharded(unwrapped)
    if sharded:
        full = accelerator.get_state_dict(model)  # collective: gathers full tensors on the main process
    else:
        full = dict(unwrapped.named_parameters()) if main else {}
    if main:
        _save_tensors({n: _cpu_copy(t) for n, t in (full or {}).items() if n in names}, directory / MODEL_NAME)
    del full
    rank_tensors, rank_values = rng_state()
    if sharded:
        rank_tensors.update({f"param.{n}": _cpu_copy(p) for n, p in unwrapped.named_parameters() if n in names})
        opt_tensors, opt_rest = split_optimizer_state(optimizer)
        rank_tensors.update(opt_tensors)
        rank_values["optimizer"] = opt_rest
    elif main:
        opt_tensors, opt_rest = split_optimizer_state(optimizer)
        _save_tensors(opt_tensors, directory / "optimizer.safetensors")
        _write_json(directory / "optimizer.json", opt_rest)
    _save_tensors(rank_tensors, directory / f"rank-{rank}.safetensors")
    _write_json(directory / f"rank-{rank}.json", rank_values)
    if main:
        _write_json(directory / META_NAME, {"format": FORMAT, "sharded": sharded, **meta})


# ----------------------------------------------------------------------------------------------- load
def check_files(directory: Path) -> None:
    """Refuse a checkpoint holding anything but safetensors and JSON files (nothing else is ever loaded)."""
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() or not entry.name.endswith(ALLOWED_SUFFIXES):
            raise CheckpointError(f"refusing to resume from {directory}: {entry.name} is not a .safetensors or "
                                  ".json file (soul checkpoints hold nothing else, and never load pickles)")


def read_meta(directory: Path) -> dict[str, Any]:
    check_files(directory)
    path = directory / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a soul checkpoint (no {META_NAME})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this soul reads {FORMAT}")
    return meta


def load_checkpoint(directory: Path, *, accelerator, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer state and this process's RNG from `directory`; returns its meta JSON."""
    meta = read_meta(directory)
    rank = accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    names = trainable_names(unwrapped)
    rank_path = directory / f"rank-{rank}.safetensors"
    rank_tensors = _load_tensors(rank_path)
    try:
        rank_values = json.loads((directory / f"rank-{rank}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory / f'rank-{rank}.json'}: cannot be read ({err})") from None
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        if meta["sharded"]:
            source, prefix = rank_tensors, "param."
        else:
            source, prefix = _load_tensors(directory / MODEL_NAME), ""
        for name in names:
            if prefix + name not in source:
                raise CheckpointError(f"{directory}: no weights for trainable parameter {name!r}")
            _local(params[name]).copy_(source[prefix + name])
    if meta["sharded"]:
        restore_optimizer_state(optimizer, rank_tensors, rank_values["optimizer"], rank_path)
    else:
        opt_rest = json.loads((directory / "optimizer.json").read_text(encoding="utf-8"))
        restore_optimizer_state(optimizer, _load_tensors(directory / "optimizer.safetensors"), opt_rest,
                                directory / "optimizer.safetensors")
    set_rng_state(rank_tensors, rank_values)
    return meta


def save_trainable(state: dict[str, torch.Tensor], path: Path) -> None:
    """keep_best's weights: safetensors (full tensors)."""
    _save_tensors({n: t.detach().cpu().contiguous().clone() for n, t in state.items()}, path)


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(path)


def fingerprint_model(model: torch.nn.Module, source: str | os.PathLike | None) -> str:
    """What the run started from: a content hash of the local model directory `source`, else of the weights."""
    import hashlib

    from soul.safety import fingerprint_files

    if source is not None and Path(str(source)).expanduser().is_dir():
        return "files:" + fingerprint_files(Path(str(source)).expanduser())
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = _local(tensor).detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "weights:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------- resume
# Options that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = frozenset({"resume", "progress", "checkpoint_every", "keep_checkpoints", "extra"})


def resume_differences(meta: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run (its `meta`) and this run (`identity`: config, world_size,
    data and model fingerprints), one phrase per difference; empty when the run may continue."""
    from soul.io import json_safe

    diffs = []
    # As JSON holds them: tuples are lists (betas=(0.9, 0.99) from Python equals [0.9, 0.99] read back).
    saved_cfg, cfg = meta.get("config") or {}, json_safe(identity["config"])
    for key in sorted(set(saved_cfg) | set(cfg)):
        if key not in RESUMABLE_CHANGES and saved_cfg.get(key) != cfg.get(key):
            diffs.append(f"option {key!r} was {saved_cfg.get(key)!r}, now {cfg.get(key)!r}")
    if meta.get("world_size") != identity["world_size"]:
        diffs.append(f"it was written by {meta.get('world_size')} processes, this run has {identity['world_size']}")
    saved_data, data = meta.get("data") or {}, identity["data"]
    for role in sorted(set(saved_data) | set(data)):
        if saved_data.get(role) != data.get(role):
            diffs.append(f"the {role} data differ (sha256 {str(saved_data.get(role))[:12]}…, now "
                         f"{str(data.get(role))[:12]}…)")
    if meta.get("model") != identity["model"]:
        diffs.append(f"the input model differs (fingerprint {str(meta.get('model'))[:20]}…, now "
                     f"{str(identity['model'])[:20]}…)")
    return diffs


def read_log_lines(path: Path, up_to_step: int) -> list[str]:
    """The lines of a ``train_log.jsonl`` for steps ≤ `up_to_step`. A partial last line (a kill while it was
    written) is dropped; a malformed line elsewhere is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                continue
            raise CheckpointError(f"{path}: line {number} is not a log record ({line[:60]!r}); remove it or "
                                  "start again without --resume") from None
        if step <= up_to_step:
            keep.append(line)
    return keep
