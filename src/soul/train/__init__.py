"""The accelerate training loop (`soul.train.loop`), `soul.unlearn` / `soul.finetune`, and their commands."""

from soul.train.api import finetune, unlearn
from soul.train.config import TrainConfig, derive_retain_split, list_presets, load_preset, make_config
from soul.train.loop import NonFiniteLossError, run_training

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "derive_retain_split",
    "finetune",
    "list_presets",
    "load_preset",
    "make_config",
    "run_training",
    "unlearn",
]
