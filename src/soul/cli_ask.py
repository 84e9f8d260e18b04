"""`soul ask`: greedy answer from a model to one question (a quick check that a model loads and talks)."""

from __future__ import annotations

import argparse


def answer(model, tokenizer, question: str, max_new_tokens: int = 64) -> str:
    """Greedy answer to one question, prompted with the tokenizer's chat template when it has one."""
    import torch

    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tokenizer(f"Question: {question}\nAnswer:", return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _run(args: argparse.Namespace) -> int:
    from soul.models import load_model
    from soul.safety import require_number

    require_number(args.max_new_tokens, "--max-new-tokens", low=1, integer=True)
    if not isinstance(args.question, str) or not args.question.strip():
        from soul.errors import CLIError

        raise CLIError("the question must be a non-empty string")
    model, tokenizer = load_model(args.model)
    print(answer(model, tokenizer, args.question, args.max_new_tokens))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="answer one question with a model (greedy)")
    p.add_argument("question")
    p.add_argument("--model", default="smollm2-135m", help="alias, local HF directory or hub id")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--config", help="YAML file of option values")
    p.set_defaults(func=_run)
