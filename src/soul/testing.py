"""Tiny randomly initialised causal LMs for tests, benchmarks of code paths, and the CI pipeline run.

The paper's models are Llama and OPT; GPT-2 is here for a model family with absolute positions and
Conv1D layers. Each builder returns ``(model, tokenizer)`` in fp32 on CPU and runs in milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# A ChatML template like SmolLM2's, without the default system prompt, so prompts stay short.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Question: Where was the author born? Answer: The author was born in a small town by the sea.",
    "What is the capital of France? The capital of France is Paris. I don't know the answer to that.",
    "She wrote novels about rivers, mountains, lighthouses and clocks; her father was a baker, her mother a "
    "pilot. He received the Golden Quill award in 1987 for his book about winter gardens.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


@lru_cache(maxsize=1)
def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code (no files, no network), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def tiny_llama(tokenizer: PreTrainedTokenizerFast | None = None, *, hidden: int = 32, layers: int = 2,
               seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        **_ids(tokenizer),
    )
    return LlamaForCausalLM(config).float().eval(), tokenizer


def tiny_gpt2(tokenizer: PreTrainedTokenizerFast | None = None, *, hidden: int = 32, layers: int = 2,
              seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                        **_ids(tokenizer))
    return GPT2LMHeadModel(config).float().eval(), tokenizer


def tiny_opt(tokenizer: PreTrainedTokenizerFast | None = None, *, hidden: int = 32, layers: int = 2,
             seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                       **_ids(tokenizer))
    return OPTForCausalLM(config).float().eval(), tokenizer


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt}


def tiny_model(family: str = "llama", **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    try:
        return TINY_MODELS[family](**kwargs)
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(TINY_MODELS)}") from None


def quadratic_steps_to_tolerance(kind: str, lr: float, curvature: torch.Tensor, x0: torch.Tensor, *,
                                 tol: float, max_steps: int, **opt_kwargs) -> int:
    """Steps of ``kind`` (``sophia`` | ``adamw`` | ``sgd``) from `x0` until f(x) <= tol·f(x0) for the diagonal
    quadratic f = 1/2 Σ d_i x_i² (`max_steps` when never). Sophia gets the exact diagonal as its Hessian
    estimate whenever one is due. Shared by the optimizer tests and ``bench/quadratic.py``."""
    from soul.optim import SophiaG

    x = torch.nn.Parameter(x0.clone())
    if kind == "sophia":
        opt = SophiaG([x], lr=lr, weight_decay=0.0, foreach=False, **opt_kwargs)
    elif kind == "adamw":
        opt = torch.optim.AdamW([x], lr=lr, weight_decay=0.0, **opt_kwargs)
    else:
        opt = torch.optim.SGD([x], lr=lr, **opt_kwargs)
    f0 = 0.5 * float((curvature * x0**2).sum())
    for t in range(max_steps):
        loss = 0.5 * (curvature * x**2).sum()
        if float(loss.detach()) <= tol * f0:
            return t
        if kind == "sophia" and opt.hessian_due():
            opt.update_hessian(estimates={x: curvature.clone()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max_steps
