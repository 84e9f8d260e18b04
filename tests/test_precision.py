"""`mixed_precision: auto` picks bf16 only where the hardware has it natively; the choice and its reason are
recorded; an explicit bf16 on a CPU that emulates it is kept but warned about."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from soul.precision import PrecisionWarning, cpu_native_bf16, resolve_precision


def _cpu(monkeypatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "feature"), [(True, False, "AVX512-BF16"), (False, True, "AMX")])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(monkeypatch, avx512_bf16, amx, feature):
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert cpu_native_bf16() == (True, feature)
    choice, reason = resolve_precision("auto", "cpu")
    assert choice == "bf16" and feature in reason


def test_auto_is_float32_on_a_cpu_without_native_bf16_and_explicit_bf16_warns(monkeypatch):
    _cpu(monkeypatch, avx512_bf16=False, amx=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto and "no" must not warn
        assert resolve_precision("auto", "cpu")[0] == "no"
        assert resolve_precision("no", "cpu")[0] == "no"
    with pytest.warns(PrecisionWarning, match="emulates"):
        choice, reason = resolve_precision("bf16", "cpu")
    assert choice == "bf16" and "emulated" in reason


def test_explicit_bf16_on_a_native_cpu_does_not_warn(monkeypatch):
    _cpu(monkeypatch, avx512_bf16=True, amx=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu")[0] == "bf16"


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_training_run_records_the_resolved_precision_and_its_reason(monkeypatch, tmp_path, native):
    """Through the real loop: "auto" trains under bf16 autocast exactly when the (patched) CPU has native bf16,
    and run.json says which and why."""
    from soul.testing import tiny_model
    from soul.train import unlearn

    _cpu(monkeypatch, avx512_bf16=native, amx=False)
    model, tokenizer = tiny_model("llama")
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    records = [{"question": f"Where was person {i} born?", "answer": f"In town {i}."} for i in range(8)]
    unlearn(model, tokenizer, data={"forget": records[:4], "retain": records[4:]}, forget_split="forget",
            retain_split="retain", objective="graddiff", optimizer="adamw", lr=1e-3, max_steps=1, batch_size=2,
            mixed_precision="auto", out_dir=tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["mixed_precision"] == ("bf16" if native else "no")
    assert record["mixed_precision_reason"].startswith("auto: bf16 (cpu: AVX512-BF16" if native else
                                                       "auto: float32 (cpu: no AVX512-BF16")
    assert seen and all(flag == native for flag in seen)


@pytest.mark.parametrize("native", [True, False])
def test_evaluation_auto_scores_under_bf16_only_with_native_bf16(monkeypatch, native):
    from soul.eval.scoring import eval_autocast, resolve_eval_precision
    from soul.testing import tiny_model

    _cpu(monkeypatch, avx512_bf16=False, amx=native)
    model, _ = tiny_model("llama")
    assert resolve_eval_precision(model, "auto")[0] == ("bf16" if native else "no")
    with eval_autocast(model, "auto"):
        assert torch.is_autocast_enabled("cpu") == native
