"""Training configuration: one dataclass shared by the Python API, the command line and the YAML presets.

Every field is a plain value (str, int, float, bool, list) so a config round-trips through YAML and
`run.json`. Precedence when a run is assembled: field defaults < preset (``preset: NAME``) < ``--config``
file < command-line options / keyword arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from soul.precision import PRECISIONS

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"

HESSIAN_BATCHES = ("forget", "retain", "both")
MIXED_PRECISION = PRECISIONS  # soul.precision: "auto" = bf16 only where the hardware has it natively
# Probe metrics and whether a larger value is better (for keep_best).
KEEP_BEST_METRICS = {"forget_prob": "min", "retain_prob": "max", "train_prob": "max", "gap": "max"}


@dataclass
class TrainConfig:
    """All knobs of a `finetune` / `unlearn` run (see docs in `soul.train.loop` for what each does)."""

    # --- data
    forget_split: str = "forget10"
    retain_split: str | None = None  # derived from forget_split (forgetXX -> retain(100-XX)) when None
    split: str = "full"  # the single split of a fine-tuning run
    prompt_format: str = "auto"
    max_length: int | None = None
    # --- objective (None: the objective's own default)
    objective: str = "graddiff"
    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None
    delta: float | None = None
    # --- optimizer
    optimizer: str = "sophia"  # adamw | sgd | sophia | signum | lion | LIBRARY:Class (soul.optim.factory)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] | None = None
    rho: float | str | None = None  # Sophia's clipping scale, or "auto" (calibrated on the first step)
    target_unclipped: float = 0.5  # rho: auto — fraction of coordinates left unclipped on the first step
    hessian_interval: int = 10
    estimator: str = "gnb"
    hessian_batch: str = "forget"
    hessian_samples: int = 1  # label draws (GNB) / probe vectors (Hutchinson) averaged per estimate
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # extra constructor options
    # --- schedule
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    seed: int = 0
    # --- LoRA (lora_r = 0: train all weights)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    # --- logging, probes, checkpoints
    probe_every: int = 0
    probe_each_epoch: bool = False
    probe_size: int = 32
    keep_best: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: bool = False
    resume: bool = False
    progress: bool = True
    report_to: list[str] | None = None  # experiment trackers (soul.train.trackers): tensorboard, wandb, …
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes copied into run.json

    def validate(self) -> TrainConfig:
        """Raise a `ValueError` naming the first bad option (its type, then its range; see `RANGES`)."""
        check_types(self)
        for name, (low, high, closed_low) in RANGES.items():
            value = getattr(self, name)
            if value is None or isinstance(value, str):  # rho: "auto" is checked below
                continue
            if not math.isfinite(value) or value < low or (value == low and not closed_low) or value > high:
                lo = f"[{low}" if closed_low else f"({low}"
                raise ValueError(f"option {name!r} must be in {lo}, {high}], got {value!r}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
                    "hessian_interval": self.hessian_interval, "probe_size": self.probe_size,
                    "hessian_samples": self.hessian_samples}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"option {name!r} must be a positive integer, got {value!r}")
        for name in ("max_steps", "warmup_steps", "max_length"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"option {name!r} must be a positive integer or null, got {value!r}")
        for name in ("probe_every", "checkpoint_every", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name!r} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.hessian_batch not in HESSIAN_BATCHES:
            raise ValueError(f"option 'hessian_batch' must be one of {HESSIAN_BATCHES}, got {self.hessian_batch!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"option 'mixed_precision' must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.keep_best is not None and self.keep_best not in KEEP_BEST_METRICS:
            raise ValueError(f"option 'keep_best' must be one of {sorted(KEEP_BEST_METRICS)}, got {self.keep_best!r}")
        if self.keep_best is not None and not (self.probe_every or self.probe_each_epoch):
            raise ValueError("option 'keep_best' needs probes: set probe_every > 0 or probe_each_epoch")
        if self.rho is not None and self.rho != "auto" and not (
                isinstance(self.rho, int | float) and not isinstance(self.rho, bool) and self.rho > 0):
            raise ValueError(f"option 'rho' must be a number > 0 or 'auto', got {self.rho!r}")
        if not (isinstance(self.target_unclipped, int | float) and 0 < self.target_unclipped < 1):
            raise ValueError(f"option 'target_unclipped' must be in (0, 1), got {self.target_unclipped!r}")
        if not isinstance(self.optimizer_options, dict):
            raise ValueError("option 'optimizer_options' must be a mapping of constructor option: value, got "
                             f"{self.optimizer_options!r}")
        if self.betas is not None:
            if len(self.betas) != 2:
                raise ValueError(f"option 'betas' must be two numbers, got {self.betas!r}")
            if not all(0 <= b < 1 for b in self.betas):
                raise ValueError(f"option 'betas' must be two numbers in [0, 1), got {self.betas!r}")
        if self.report_to:
            from soul.train.trackers import check_report_to

            check_report_to(self.report_to)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Numeric ranges (low, high, low included?) checked by `TrainConfig.validate` after the types. The upper bounds
# are far beyond any sensible value; they catch typos such as lr 1e300 that would only produce NaNs later.
RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, 10.0, False),
    "weight_decay": (0.0, 10.0, True),
    "rho": (0.0, 1e6, False),
    "warmup_ratio": (0.0, 1.0 - 1e-12, True),
    "max_grad_norm": (0.0, 1e12, True),  # 0 or null: no clipping; negative would flip the gradient
    "gamma": (0.0, 1e6, True),
    "alpha": (0.0, 1e6, True),
    "beta": (0.0, 1e6, False),
    "delta": (-1e6, 1e6, True),
    "lora_alpha": (0.0, 1e6, False),
    "lora_dropout": (0.0, 1.0 - 1e-12, True),
}


_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "list[float]": (list, tuple), "list[str]": (list, tuple),
                                       "dict[str, Any]": (dict,)}


def _expected(annotation: str) -> tuple[type, ...]:
    """The Python types a field annotation admits (a union such as ``float | str`` admits both)."""
    base = annotation.replace(" | None", "")
    return tuple(t for part in base.split(" | ") for t in _KINDS[part])


def check_types(cfg: TrainConfig) -> None:
    """Every option has its declared type (a YAML ``max_steps: true`` or ``resume: "no"`` is an error)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        annotation = str(f.type)
        if value is None:
            if "None" in annotation:
                continue
            raise ValueError(f"option {f.name!r} must not be null")
        kinds = _expected(annotation)
        is_bool = isinstance(value, bool)
        ok = isinstance(value, kinds) and (bool in kinds or not is_bool)
        if ok and annotation.startswith("list[float]"):
            ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if ok and annotation.startswith("list[str]"):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            want = annotation.replace(" | None", "").replace("dict[str, Any]", "mapping")
            want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "float | str": "a number or a string"}.get(want, want)
            raise ValueError(f"option {f.name!r} must be {want}, got {type(value).__name__} {value!r:.60}")


CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
# Keys a preset may hold besides TrainConfig options: what to train and where (used by the command line).
RUN_KEYS = ("model", "data", "out")


def make_config(values: dict[str, Any] | None = None, *, defaults: dict[str, Any] | None = None,
                **overrides: Any) -> TrainConfig:
    """A validated `TrainConfig`: `defaults` < preset < `values` < keyword overrides; unknown keys are an error.

    A ``preset`` key (in `values` or the overrides) loads that preset; a None value never hides a lower layer.
    """
    merged = {**(values or {}), **overrides}
    merged = {str(k).replace("-", "_"): v for k, v in merged.items() if v is not None}
    preset = merged.pop("preset", None)
    preset_values = load_preset(preset) if preset else {}
    for key in RUN_KEYS:  # the caller passes model/data/out itself
        preset_values.pop(key, None)
    base = {**(defaults or {}), **preset_values}
    merged = {**base, **merged}
    unknown = sorted(set(merged) - CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known options: {sorted(CONFIG_FIELDS)}")
    if isinstance(merged.get("rho"), str) and merged["rho"].strip().lower() == "auto":
        merged["rho"] = "auto"
    for key in ("lr", "weight_decay", "warmup_ratio", "gamma", "alpha", "beta", "delta", "rho",
                "lora_alpha", "lora_dropout", "max_grad_norm", "target_unclipped"):
        # YAML reads "1e-5" as a string; accept numeric strings for float options.
        if isinstance(merged.get(key), str) and not (key == "rho" and merged[key] == "auto"):
            try:
                merged[key] = float(merged[key])
            except ValueError:
                raise ValueError(f"option {key!r} must be a number, got {merged[key]!r}") from None
    return TrainConfig(**merged).validate()


def list_presets() -> list[str]:
    """Training presets: the YAML files in src/soul/presets/ whose keys are all training options.

    (The directory also holds other commands' presets, e.g. ``soul reproduce``'s, which are skipped.)
    """
    import yaml

    names = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        with contextlib.suppress(yaml.YAMLError, OSError):
            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict) and {str(k) for k in data} <= CONFIG_FIELDS | set(RUN_KEYS):
                names.append(path.stem)
    return names


def load_preset(name: str) -> dict[str, Any]:
    """The option mapping of preset `name` (a file in src/soul/presets/, or a path to a YAML file)."""
    from soul.io import read_yaml_mapping

    path = Path(name)
    if not path.is_file():
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets()) or 'none'}")
    data = read_yaml_mapping(path, f"preset {path}", "a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def derive_retain_split(forget_split: str) -> str:
    """TOFU's complement of a forget split: ``forget01 -> retain99``, ``forget05 -> retain95``, ``forget10 -> retain90``."""
    m = re.fullmatch(r"forget(\d{2})", forget_split)
    if not m:
        raise ValueError(
            f"cannot derive the retain split from forget split {forget_split!r} (expected forgetNN); "
            "give retain_split explicitly"
        )
    return f"retain{100 - int(m.group(1)):02d}"
