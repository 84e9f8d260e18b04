"""`soul finetune` and `soul unlearn`.

Every `TrainConfig` field is an option (``--batch-size``, ``--grad-accum`` …). Values come, lowest first,
from the defaults, ``--preset NAME`` (src/soul/presets/NAME.yaml), ``--config FILE.yaml`` and the command
line. Options are registered without argparse defaults so the layers can be told apart.

``soul unlearn --optimizer influence`` takes one damped Newton ascent step instead of training
(`soul.train.oneshot`): ``--estimator gnb|fisher|kfac|ekfac`` (the curvature), ``--hessian-batch`` (default
retain), ``--damping-relative`` / ``--damping``, ``--step-size`` (the step's alpha; ``--alpha`` stays
GradDiff's retain weight), ``--max-forget-batches`` / ``--max-retain-batches``, ``--kfac-fisher``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from soul.train.config import TrainConfig, list_presets, load_preset

# Options that only make sense for one of the two commands.
UNLEARN_ONLY = {"forget_split", "retain_split", "objective", "gamma", "alpha", "beta", "delta", "hessian_batch"}
FINETUNE_ONLY = {"split"}
SKIP = {"extra"}

HELP = {
    "forget_split": "split to forget (default forget10)",
    "retain_split": "split to keep (default: the forget split's complement, e.g. retain90)",
    "split": "split to fine-tune on (default full)",
    "prompt_format": "auto | chat | plain",
    "max_length": "truncate question+answer to this many tokens",
    "objective": "ga | graddiff | ga_kl | po | npo | npo_rt | simnpo | dpo",
    "gamma": "weight of the forget term",
    "alpha": "weight of the retain term",
    "beta": "inverse temperature (npo, simnpo, dpo)",
    "delta": "margin (simnpo)",
    "optimizer": "adamw | sgd | sophia | signum | lion, or LIBRARY:Class (e.g. torch:SGD, "
                 "pytorch_optimizer:SOAP, pytorch_optimizer:AdaHessian); influence: one damped Newton step "
                 "instead of training (see --estimator, --step-size)",
    "optimizer_options": "extra optimizer constructor options as KEY=VALUE (values read as YAML)",
    "lr": "peak learning rate",
    "betas": "the optimizer's two betas",
    "rho": "Sophia's clipping scale (gamma in the Sophia paper), or 'auto': calibrated on the first step",
    "target_unclipped": "with --rho auto: fraction of coordinates left unclipped on the first step (0-1)",
    "hessian_samples": "Sophia: draws averaged per Hessian estimate (GNB labels / Hutchinson vectors); "
                       "influence with kfac/ekfac: label draws of K-FAC's mc Fisher",
    "hessian_interval": "Sophia: estimate the Hessian every k steps",
    "estimator": "Sophia's Hessian estimator: gnb | hutchinson | gradsq, or kfac | ekfac (Kronecker-factored); "
                 "with --optimizer influence the curvature: gnb | fisher | kfac | ekfac",
    "hessian_batch": "data for the Hessian estimate: forget | retain | both (default forget; retain with "
                     "--optimizer influence)",
    "epochs": "passes over the training (forget) split",
    "max_steps": "stop after this many optimizer steps (overrides epochs)",
    "batch_size": "micro-batch size per process",
    "grad_accum": "micro-batches per optimizer step",
    "warmup_ratio": "fraction of steps for linear warm-up",
    "warmup_steps": "warm-up steps (overrides warmup_ratio)",
    "max_grad_norm": "clip the global gradient norm (0: off)",
    "mixed_precision": "auto | no | bf16 | fp16",
    "lora_r": "LoRA rank (0: train all weights)",
    "lora_target_modules": "modules to adapt (default all linear layers)",
    "probe_every": "probe forget/retain answer probability every N steps (0: off)",
    "probe_each_epoch": "probe at the end of every epoch",
    "probe_size": "records per probe set",
    "keep_best": "keep (and save) the weights best by: forget_prob | retain_prob | train_prob | gap",
    "checkpoint_every": "checkpoint every N steps (0: off)",
    "keep_checkpoints": "keep the checkpoints in the output directory",
    "resume": "continue from the last checkpoint in --out",
    "progress": "show a progress bar",
    "report_to": "experiment trackers fed the train_log.jsonl lines: tensorboard | wandb | mlflow | trackio",
}


# `soul unlearn --optimizer influence` only (soul.train.oneshot.ONESHOT_OPTIONS): not TrainConfig fields.
ONESHOT_ARGS: dict[str, dict[str, Any]] = {
    "step_size": {"type": float, "help": "--optimizer influence: the step's alpha in alpha (C + damping)^-1 "
                                         "grad L_forget (default 1: the full damped Newton step)"},
    "damping_relative": {"type": float, "help": "--optimizer influence: damping as a fraction of the mean "
                                                "curvature (per block for kfac/ekfac; default 0.1)"},
    "damping": {"type": float, "help": "--optimizer influence: an absolute damping instead"},
    "max_forget_batches": {"type": int, "help": "--optimizer influence: use the first N forget batches only"},
    "max_retain_batches": {"type": int, "help": "--optimizer influence: use the first N retain batches only"},
    "kfac_fisher": {"help": "--optimizer influence with kfac/ekfac: mc (default) | empirical | exact"},
}


class _KeyValues(argparse.Action):
    """``KEY=VALUE ...`` into a dict; values are read as YAML (numbers, booleans, lists)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import yaml

        out = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: expected KEY=VALUE, got {item!r}")
            out[key.replace("-", "_")] = yaml.safe_load(value)
        setattr(namespace, self.dest, out)


def _number_or_auto(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _argparse_kwargs(annotation: str) -> dict[str, Any]:
    """argparse options for a dataclass field annotation (a string under `from __future__ import annotations`)."""
    base = annotation.replace(" | None", "")
    if base == "float | str":
        return {"type": _number_or_auto}
    if base == "dict[str, Any]":
        return {"nargs": "+", "action": _KeyValues, "metavar": "KEY=VALUE"}
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if base == "list[float]":
        return {"type": float, "nargs": 2, "metavar": ("B1", "B2")}
    if base == "list[str]":
        return {"type": str, "nargs": "+"}
    return {"type": {"int": int, "float": float, "str": str}[base]}


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", default=argparse.SUPPRESS,
                        help="model to train: alias (smollm2-135m), local HF directory or hub id")
    parser.add_argument("--data", default=argparse.SUPPRESS,
                        help="data source: 'bundled' (default), a directory of split files, or locuslab/TOFU")
    parser.add_argument("--out", default=argparse.SUPPRESS, help="new output directory for the trained model")
    parser.add_argument("--preset", default=argparse.SUPPRESS,
                        help=f"preset name ({', '.join(list_presets())}) or YAML path")
    parser.add_argument("--config", help="YAML file of option values (command-line options win)")
    parser.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                        help="replace a previous soul output in --out (recognised by its run.json); a directory "
                             "soul did not write is never replaced")
    skip = SKIP | (FINETUNE_ONLY if command == "unlearn" else UNLEARN_ONLY)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            help=HELP.get(f.name), **_argparse_kwargs(str(f.type)))
    if command == "unlearn":
        for name, kwargs in ONESHOT_ARGS.items():
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, **kwargs)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}


def _run(args: argparse.Namespace, command: str) -> int:
    from soul.errors import CLIError
    from soul.train.api import finetune, unlearn
    from soul.train.loop import NonFiniteLossError

    values = _values(args)
    preset = load_preset(values["preset"]) if "preset" in values else {}
    # model/data/out may come from the preset too; the command line and --config win.
    model = values.pop("model", preset.get("model"))
    data = values.pop("data", preset.get("data", "bundled"))
    out = values.pop("out", preset.get("out"))
    overwrite = values.pop("overwrite", False)
    if not isinstance(overwrite, bool):
        raise CLIError(f"option 'overwrite' must be true or false, got {overwrite!r}")
    if model is None:
        raise CLIError("--model is required (or give it in --config / --preset)")
    if out is None:
        raise CLIError("--out is required: the trained model goes to a new directory")
    from soul.safety import check_output_dir

    oneshot = _oneshot_options(values, preset) if command == "unlearn" else None
    # Refuse an unsafe --out before loading anything (the loop checks again once it holds the lock).
    check_output_dir(out, inputs=[model, data], overwrite=overwrite, resume=bool(values.get("resume")))
    if oneshot is not None:
        return _run_oneshot(model, data, out, overwrite, oneshot)
    try:
        if command == "unlearn":
            _, record = unlearn(model, data=data, out_dir=out, overwrite=overwrite, **values)
        else:
            _, record = finetune(model, data=data, out_dir=out, overwrite=overwrite, **values)
    except NonFiniteLossError as err:
        raise CLIError(str(err)) from None
    final = record.get("final", {})
    parts = ", ".join(f"{k}={v:.4g}" for k, v in final.items()
                      if isinstance(v, float) and k not in ("lr", "time", "epoch"))
    print(f"soul {command}: {record['steps']} steps in {record['wall_time_s']:.1f}s; {parts}; model -> {out}")
    return 0


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _oneshot_options(values: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any] | None:
    """For ``--optimizer influence``: its options (from the preset, --config and the command line, checked by
    `soul.train.oneshot.check_oneshot_options`), popped from `values`. Otherwise None, after refusing the
    influence-only options and estimators. Every error is a one-line CLIError, before anything is loaded."""
    from soul.errors import CLIError
    from soul.train.oneshot import ONESHOT_ONLY_ESTIMATORS, ONESHOT_OPTIONS, check_oneshot_options

    optimizer = values.get("optimizer", preset.get("optimizer"))
    if optimizer != "influence":
        given = [k for k in ONESHOT_OPTIONS if k in values]
        if given:
            raise CLIError(f"{_flag(given[0])} applies to --optimizer influence only (got optimizer {optimizer!r})")
        estimator = values.get("estimator", preset.get("estimator"))
        if estimator in ("kfac", "ekfac") and (optimizer or "sophia") != "sophia":
            raise CLIError(f"--estimator {estimator} is a Kronecker curvature for --optimizer sophia or influence; "
                           f"optimizer {optimizer!r} takes no curvature estimator")
        if estimator in ONESHOT_ONLY_ESTIMATORS:
            raise CLIError(f"--estimator {estimator} is a curvature for --optimizer influence (a one-shot Newton "
                           f"step); optimizer {optimizer or 'sophia'!r} takes gnb | hutchinson | gradsq | kfac | ekfac")
        return None
    from soul.train.config import RUN_KEYS

    merged = {k: v for k, v in preset.items() if k not in RUN_KEYS}
    merged.update({k: v for k, v in values.items() if k != "preset"})
    merged.pop("optimizer", None)
    try:
        options = check_oneshot_options(merged)
    except ValueError as err:
        raise CLIError(f"--optimizer influence: {err}") from None
    return {k: merged[k] for k in merged if k in options}


def _run_oneshot(model: str, data: Any, out: str, overwrite: bool, options: dict[str, Any]) -> int:
    from soul.train.oneshot import unlearn_oneshot

    _, record = unlearn_oneshot(model, data=data, out_dir=out, overwrite=overwrite, **options)
    s = record["stats"]
    print(f"soul unlearn: one {record['config']['estimator']} Newton step, |step|={s['step_norm']:.4g}, "
          f"cosine with ascent {s['cosine_with_ascent']:.4g}, with the GNB step {s['cosine_with_diagonal']:.4g}; "
          f"forget loss change predicted {s['predicted_forget_change']:.4g} / measured "
          f"{s['measured_forget_change']:.4g}, retain {s['predicted_retain_change']:.4g} / "
          f"{s['measured_retain_change']:.4g}; model -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    for command, help_text in (("unlearn", "unlearn a split from a model (objective + optimizer)"),
                               ("finetune", "fine-tune a model on the answers of a split")):
        p = subparsers.add_parser(command, help=help_text, description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, command)
        p.set_defaults(func=lambda args, command=command: _run(args, command))
