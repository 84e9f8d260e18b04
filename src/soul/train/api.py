"""`soul.unlearn` and `soul.finetune`: resolve the model, the data and the objective, then run the loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from soul.train.config import TrainConfig, derive_retain_split, make_config
from soul.train.loop import FineTuneObjective, hash_records, run_training

DataSource = str | os.PathLike | Mapping[str, list[dict]]
COEFFICIENTS = ("gamma", "alpha", "beta", "delta")


def resolve_model(model, tokenizer, dtype=None) -> tuple[torch.nn.Module, Any, str | None]:
    """``(model, tokenizer, input path or name)``; a string is loaded with `soul.models.load_model`."""
    if isinstance(model, str | os.PathLike):
        from soul.models import load_model

        name = str(model)
        loaded, loaded_tok = load_model(name, dtype=dtype)
        path = Path(name).expanduser()
        return loaded, tokenizer or loaded_tok, str(path.resolve()) if path.exists() else name
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a loaded model: unlearn(model, tokenizer, ...)")
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return model, tokenizer, source


def load_records(data: DataSource, split: str) -> list[dict]:
    """Records of `split` from a dict of split name → records, or a source for `soul.data.load_split`."""
    if isinstance(data, Mapping):
        if split not in data:
            raise ValueError(f"data has no split {split!r}; it has {sorted(data)}")
        return list(data[split])
    from soul.data import load_split

    return load_split(str(data), split)


def data_entry(data: DataSource, split: str, records: list[dict]) -> dict[str, Any]:
    source = "in-memory" if isinstance(data, Mapping) else str(data)
    return {"source": source, "split": split, "n": len(records), "sha256": hash_records(records)}


def check_before_loading(config: TrainConfig) -> None:
    """Options checked against their registries before a model is loaded: the optimizer (name and options,
    by building it on a dummy parameter) and the prompt format."""
    from soul.data.format import PROMPT_FORMATS
    from soul.optim import build_optimizer
    from soul.train.loop import optimizer_kwargs

    if config.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"option 'prompt_format' must be one of {PROMPT_FORMATS}, got {config.prompt_format!r}")
    build_optimizer(config.optimizer, [torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs(config))


def _norm(text: Any) -> str:
    return " ".join(str(text).casefold().split())


def check_no_overlap(forget: list[dict], retain: list[dict], data: DataSource, forget_name: str,
                     retain_name: str) -> None:
    """Refuse a forget record (question and answer, case- and space-normalised) that the retain split also
    holds: unlearning it while training on it makes the two objectives fight over the same text."""
    seen = {(_norm(r.get("question")), _norm(r.get("answer"))): j for j, r in enumerate(retain)}
    where = "data" if isinstance(data, Mapping) else str(data)
    for i, r in enumerate(forget):
        j = seen.get((_norm(r.get("question")), _norm(r.get("answer"))))
        if j is not None:
            raise ValueError(f"{where}: forget split {forget_name!r} record {i} is also retain split "
                             f"{retain_name!r} record {j} ({str(r.get('question'))[:60]!r}); forget and retain "
                             "must not overlap")


def build_unlearning_objective(cfg: TrainConfig):
    """The registered objective named by ``cfg.objective`` with the coefficients that were set."""
    from soul.objectives import build_objective

    coeffs = {k: getattr(cfg, k) for k in COEFFICIENTS if getattr(cfg, k) is not None}
    return build_objective(cfg.objective, **coeffs)


def unlearn(
    model,
    tokenizer=None,
    data: DataSource = "bundled",
    forget_split: str | None = None,
    retain_split: str | None = None,
    objective: str | Callable | None = None,
    optimizer: str | None = None,
    estimator: str | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[int, dict], None] | None = None,
    overwrite: bool = False,
    **cfg: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Unlearn `forget_split` from `model` while keeping `retain_split`; returns ``(model, run_record)``.

    `model` is a loaded model (give `tokenizer`) or a name/path for `soul.models.load_model`. `data` is a
    source for `soul.data.load_split` (a directory, ``"bundled"``, ``"locuslab/TOFU"``) or a dict of split
    name → records. `objective` is a registered name (`soul.objectives`) or an objective object. Other
    keyword arguments are `TrainConfig` options (``lr``, ``epochs``, ``batch_size``, ``gamma``, ``alpha``,
    ``lora_r``, ``preset`` …). With `out_dir`, the unlearned model is saved there (safetensors + run.json);
    an existing `out_dir` must be empty, or a previous soul output and `overwrite` (`soul.safety`).

    Arguments left as None take the preset's value, else `TrainConfig`'s default (``forget10``,
    ``graddiff``, ``sophia``, ``gnb``); the retain split defaults to the forget split's complement.
    """
    name = objective if objective is None or isinstance(objective, str) else getattr(
        objective, "name", type(objective).__name__)
    config = make_config(cfg, forget_split=forget_split, retain_split=retain_split, objective=name,
                         optimizer=optimizer, estimator=estimator)
    obj = build_unlearning_objective(config) if objective is None or isinstance(objective, str) else objective
    check_before_loading(config)
    forget = load_records(data, config.forget_split)
    info = {"forget": data_entry(data, config.forget_split, forget)}
    retain = None
    if getattr(obj, "needs_retain", False) or config.retain_split or config.probe_every or config.probe_each_epoch:
        try:
            retain_name = config.retain_split or derive_retain_split(config.forget_split)
        except ValueError:
            if getattr(obj, "needs_retain", False):
                raise
            retain_name = None
        if retain_name is not None:
            retain = load_records(data, retain_name)
            info["retain"] = data_entry(data, retain_name, retain)
            config.retain_split = retain_name
            check_no_overlap(forget, retain, data, config.forget_split, retain_name)
    model, tokenizer, source = resolve_model(model, tokenizer)  # after the data: bad data fails fast
    return run_training(model, tokenizer, cfg=config, objective=obj, train_records=forget, retain_records=retain,
                        kind="unlearn", out_dir=out_dir, input_model=source, data_info=info,
                        on_step_end=on_step_end, overwrite=overwrite)


def finetune(
    model,
    tokenizer=None,
    data: DataSource = "bundled",
    split: str | None = None,
    optimizer: str | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    on_step_end: Callable[[int, dict], None] | None = None,
    overwrite: bool = False,
    **cfg: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune `model` on the answers of `split` (mean answer-token NLL); returns ``(model, run_record)``.

    Makes TOFU's "target" model (``split="full"``) and "retain" model (``split="retain90"`` …). Options
    and `data`/`model` conventions are those of `unlearn`; here the defaults are ``split="full"`` and
    ``optimizer="adamw"``.
    """
    config = make_config(cfg, defaults={"split": "full", "optimizer": "adamw"}, split=split, optimizer=optimizer,
                         objective="finetune")
    check_before_loading(config)
    records = load_records(data, config.split)
    model, tokenizer, source = resolve_model(model, tokenizer)
    info = {"train": data_entry(data, config.split, records)}
    return run_training(model, tokenizer, cfg=config, objective=FineTuneObjective(), train_records=records,
                        kind="finetune", out_dir=out_dir, input_model=source, data_info=info,
                        on_step_end=on_step_end, overwrite=overwrite)
