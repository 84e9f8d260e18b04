from __future__ import annotations

import pytest
import torch

from soul.cli_ask import answer
from soul.models import ModelNotFoundError, load_model, save_model
from soul.testing import tiny_model


def test_missing_model_path_error_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)
    assert "smollm2-135m" in str(err.value)  # says what else was tried


def test_directory_without_config_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"without config\.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_tiny_models_save_and_reload_identically(tmp_path, family):
    model, tokenizer = tiny_model(family)
    out = save_model(model, tokenizer, tmp_path / family)
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"
    reloaded, tok2 = load_model(str(out))
    ids = tokenizer("Where was the author born?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reloaded(**ids).logits)
    assert tok2.pad_token is not None and tok2.chat_template


def test_save_refuses_to_overwrite_input_model(tmp_path):
    model, tokenizer = tiny_model("llama")
    src = save_model(model, tokenizer, tmp_path / "m")
    loaded, tok = load_model(str(src))
    with pytest.raises(ValueError, match="refusing to overwrite the input model"):
        save_model(loaded, tok, src)


@pytest.mark.slow
@pytest.mark.smoke
def test_smollm2_answers_saves_and_reloads_bit_identically(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert "Paris" in answer(model, tokenizer, "What is the capital of France?")
    out = save_model(model, tokenizer, tmp_path / "smol")
    reloaded, _ = load_model(str(out))
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reloaded(**ids).logits)
