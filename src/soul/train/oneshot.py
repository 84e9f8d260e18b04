"""`soul unlearn --optimizer influence`: one damped Newton ascent step (`soul.optim.influence_unlearn`) instead
of a training loop, with the model and data loaded as `soul.unlearn` loads them and the output written as a
training run's (safetensors + ``run.json``, through `soul.train.output`'s guard: never into a directory soul
did not write, staged and renamed into place).

Options (`unlearn_oneshot`; the command line's ``--estimator``, ``--hessian-batch``, ``--step-size`` …):

* ``estimator`` — the curvature: ``gnb`` (diagonal Gauss-Newton, default), ``fisher`` (diagonal empirical
  Fisher), ``kfac`` / ``ekfac`` (Kronecker-factored, `soul.optim.kfac`);
* ``hessian_batch`` — the data it is estimated on: ``retain`` (default here, unlike Sophia's ``forget``),
  ``forget`` or ``both``;
* ``damping_relative`` (default 0.1: λ = r × the mean curvature, per block for K-FAC) or an absolute
  ``damping``;
* ``step_size`` — α of Δ = α (C + λI)⁻¹ ∇L_forget (default 1, the full damped Newton step). Not ``alpha``,
  which is GradDiff's retain weight in `TrainConfig`; the pipeline preset's ``influence.alpha`` is this α;
* ``max_forget_batches`` / ``max_retain_batches`` — use only the first N batches of ``batch_size`` records
  (default: all) for the gradient, the curvature and the diagnostics;
* ``kfac_fisher`` (``mc`` default, ``empirical``, ``exact``) and ``hessian_samples`` (label draws, K-FAC's
  ``mc`` only) for ``kfac`` / ``ekfac``;
* ``forget_split``, ``retain_split``, ``prompt_format``, ``max_length``, ``batch_size``, ``seed`` (the label
  draws) as for training. Every other training option (lr, steps, objective …) has no meaning for one
  Newton step and is refused.

``run.json`` holds ``kind: unlearn``, ``optimizer: influence``, the resolved ``config``, the data hashes,
``steps: 1`` and ``stats``: every diagnostic of `influence_unlearn` (cosines with ascent and with the GNB step,
‖Δθ‖, the quadratic model's predicted forget/retain loss change next to the measured one).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Options of the one-shot step that are not `TrainConfig` fields (the command line registers them itself).
ONESHOT_OPTIONS = ("step_size", "damping", "damping_relative", "max_forget_batches", "max_retain_batches",
                   "kfac_fisher")
# `TrainConfig` fields that mean the same thing for the one-shot step; every other one is refused.
SHARED_OPTIONS = ("forget_split", "retain_split", "prompt_format", "max_length", "batch_size", "seed",
                  "estimator", "hessian_batch", "hessian_samples", "progress")
ESTIMATORS = ("gnb", "fisher", "kfac", "ekfac")
ONESHOT_ONLY_ESTIMATORS = ("fisher",)  # no other optimizer takes it (sophia also takes kfac / ekfac)
DEFAULTS: dict[str, Any] = {"estimator": "gnb", "hessian_batch": "retain", "step_size": 1.0, "damping": None,
                            "damping_relative": None, "max_forget_batches": None, "max_retain_batches": None,
                            "kfac_fisher": "mc", "hessian_samples": 1}


def _number(name: str, value: Any, *, integer: bool = False, nullable: bool = True) -> Any:
    if value is None and nullable:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not value > 0:
        want = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"option {name!r} must be {want}{' or null' if nullable else ''}, got {value!r}")
    return value


def check_oneshot_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved options of a one-shot run (`DEFAULTS` filled in), or a one-line `ValueError` naming the
    first bad or inapplicable option. Needs no model and no data: called before anything is loaded."""
    from soul.data.format import PROMPT_FORMATS
    from soul.optim.influence import KFAC_FISHERS

    unknown = [k for k in options if k not in SHARED_OPTIONS and k not in ONESHOT_OPTIONS]
    if unknown:
        raise ValueError(f"option {unknown[0]!r} does not apply to optimizer 'influence' (one Newton step: no "
                         "learning rate, schedule, objective or training loop); its options are "
                         f"{sorted(SHARED_OPTIONS + ONESHOT_OPTIONS)}")
    resolved = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if resolved["estimator"] not in ESTIMATORS:
        raise ValueError(f"option 'estimator' with optimizer 'influence' must be one of {list(ESTIMATORS)}, got "
                         f"{resolved['estimator']!r}")
    if resolved["hessian_batch"] not in ("retain", "forget", "both"):
        raise ValueError("option 'hessian_batch' must be one of ('retain', 'forget', 'both'), got "
                         f"{resolved['hessian_batch']!r}")
    if resolved["kfac_fisher"] not in KFAC_FISHERS:
        raise ValueError(f"option 'kfac_fisher' must be one of {list(KFAC_FISHERS)}, got {resolved['kfac_fisher']!r}")
    if resolved.get("prompt_format", "auto") not in PROMPT_FORMATS:
        raise ValueError(f"option 'prompt_format' must be one of {PROMPT_FORMATS}, got {resolved['prompt_format']!r}")
    _number("step_size", resolved["step_size"], nullable=False)
    _number("damping", resolved["damping"])
    _number("damping_relative", resolved["damping_relative"])
    if resolved["damping"] is not None and resolved["damping_relative"] is not None:
        raise ValueError("options 'damping' (absolute) and 'damping_relative' (a fraction of the mean curvature) "
                         f"exclude each other; got damping={resolved['damping']}, "
                         f"damping_relative={resolved['damping_relative']}")
    for name in ("max_forget_batches", "max_retain_batches"):
        _number(name, resolved[name], integer=True)
    _number("hessian_samples", resolved["hessian_samples"], integer=True, nullable=False)
    if resolved["hessian_samples"] != 1 and not (resolved["estimator"] in ("kfac", "ekfac")
                                                 and resolved["kfac_fisher"] == "mc"):
        raise ValueError("option 'hessian_samples' (label draws) applies to estimator kfac/ekfac with kfac_fisher "
                         f"'mc' only; got estimator {resolved['estimator']!r}, kfac_fisher {resolved['kfac_fisher']!r}")
    return resolved


def _device() -> torch.device:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available") and accelerator.is_available():
        return torch.device(accelerator.current_accelerator())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unlearn_oneshot(model: Any, tokenizer: Any = None, data: Any = "bundled", out_dir: str | os.PathLike | None = None,
                    *, overwrite: bool = False, **options: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One damped Newton ascent step on the forget split (module docstring); returns ``(model, run_record)``.

    `model`, `tokenizer` and `data` follow `soul.train.unlearn`. Every option is checked, and the data read,
    before the model is loaded; with `out_dir` the model and ``run.json`` are written there (`overwrite`
    replaces a previous soul output only)."""
    from soul.data.format import QACollator
    from soul.optim import influence_unlearn
    from soul.train.api import check_no_overlap, data_entry, load_records, resolve_model
    from soul.train.config import derive_retain_split, make_config
    from soul.train.lengths import data_label, encode_within_context, model_context
    from soul.train.loop import RUN_NAME, to_device, versions
    from soul.train.output import guarded_run_output, publish_output

    opts = check_oneshot_options(options)
    shared = {k: opts[k] for k in ("forget_split", "retain_split", "prompt_format", "max_length", "batch_size",
                                   "seed") if k in opts}
    cfg = make_config(shared, optimizer="influence", progress=False)  # types and ranges of the shared options
    forget = load_records(data, cfg.forget_split)
    retain_name = cfg.retain_split or derive_retain_split(cfg.forget_split)
    retain = load_records(data, retain_name)
    cfg.retain_split = retain_name
    check_no_overlap(forget, retain, data, cfg.forget_split, retain_name)
    info = {"forget": data_entry(data, cfg.forget_split, forget), "retain": data_entry(data, retain_name, retain)}
    model, tokenizer, source = resolve_model(model, tokenizer)  # after the options and the data: they fail fast
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    if out is not None and source and Path(source).expanduser().exists() and Path(source).resolve() == out:
        raise ValueError(f"refusing to write into the input model directory {out}; choose another --out")
    device = _device()
    model.to(device)
    context = model_context(model, tokenizer)
    collate = QACollator(tokenizer)

    def batches(records: list[dict], role: str, limit: int | None) -> list[dict]:
        feats = encode_within_context(records, tokenizer, cfg, None, context=context, where=data_label(info, role))
        chunks = [feats[i:i + cfg.batch_size] for i in range(0, len(feats), cfg.batch_size)][:limit]
        return [to_device(collate(chunk), device) for chunk in chunks]

    forget_batches = batches(forget, "forget", opts["max_forget_batches"])
    retain_batches = batches(retain, "retain", opts["max_retain_batches"])
    config = {**{k: getattr(cfg, k) for k in ("forget_split", "retain_split", "prompt_format", "max_length",
                                              "batch_size", "seed")},
              "optimizer": "influence", **{k: opts[k] for k in DEFAULTS}}
    kronecker = opts["estimator"] in ("kfac", "ekfac")

    def run() -> tuple[torch.nn.Module, dict[str, Any]]:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        t0 = time.time()
        trained, stats = influence_unlearn(
            model, forget_batches, retain_batches, alpha=opts["step_size"], damping=opts["damping"],
            damping_relative=opts["damping_relative"], hessian=opts["estimator"], hessian_data=opts["hessian_batch"],
            generator=generator, kfac_fisher=opts["kfac_fisher"] if kronecker else "mc",
            kfac_samples=opts["hessian_samples"] if kronecker else 1)
        trained.eval()
        record = {"kind": "unlearn", "optimizer": "influence", "config": config,
                  "objective": {"name": "influence", "repr": "one damped Newton ascent step on the forget loss",
                                "coefficients": {}},
                  "input_model": source, "data": info, "versions": versions(), "device": str(device), "steps": 1,
                  "batches": {"forget": len(forget_batches), "retain": len(retain_batches)},
                  "wall_time_s": time.time() - t0, "stats": stats}
        return trained, record

    if out is None:
        return run()
    from soul.io import write_json_atomic
    from soul.models import save_model

    with guarded_run_output(out, resume=False, overwrite=overwrite, input_model=source, data_info=info) as target:
        trained, record = run()
        record["out_dir"] = str(target)

        def fill(staging: Path) -> None:
            save_model(trained, tokenizer, staging)
            write_json_atomic(staging / RUN_NAME, record)

        publish_output(target, fill)
    return trained, record
