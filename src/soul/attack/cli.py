"""`soul attack relearn|quantize|paraphrase`: attack an unlearned model, write the results JSON atomically."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def check_out(path: str | None) -> Path:
    """The --out path, refused when it is a directory or an existing file `soul attack` did not write."""
    from soul.attack.run import TOOL
    from soul.cli import CLIError

    if not path:
        raise CLIError("--out is required (the results JSON to write)")
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"--out {out}: is a directory; give the path of a JSON file to write")
    if out.exists():
        try:
            meta = json.loads(out.read_text()).get("meta", {})
            ours = isinstance(meta, dict) and meta.get("tool") == TOOL
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise CLIError(f"--out {out}: exists and was not written by `soul attack`; refusing to overwrite it "
                           "(choose another path)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"--out {out}: {parent} is not a directory")
            break
    return out


def _check_model(option: str, name: str | None) -> None:
    from soul.cli import CLIError
    from soul.models import resolve_model_path

    if name is None:
        return
    try:
        resolve_model_path(name)
    except FileNotFoundError as err:
        raise CLIError(f"{option}: {err}") from None


def _load_forget(data: str, forget_split: str) -> list[dict]:
    """The forget split for evaluation: its ``_perturbed`` version (paraphrases, perturbed answers) when the
    source has one, as `soul eval` does, else the split itself."""
    from soul.data import load_split

    base = forget_split.removesuffix("_perturbed")
    try:
        return load_split(data, f"{base}_perturbed")
    except FileNotFoundError:
        return load_split(data, base)


_OPTION_NAMES = {"heldout_fraction": "--heldout-fraction", "questions_per_author": "--questions-per-author",
                 "group_size": "--group-size", "batch_size": "--batch-size", "max_new_tokens": "--max-new-tokens",
                 "max_questions": "--max-questions", "include_embeddings": "--include-embeddings"}


def _cli_message(message: str) -> str:
    """A config error in terms of the command line: ``attacks.relearn.steps`` → ``--steps``."""
    def option(m: re.Match) -> str:
        key = m.group(1)
        return _OPTION_NAMES.get(key, f"--{key.replace('_', '-')}")

    return re.sub(r"attacks\.(?:(?:relearn|quantize|paraphrase)\.)?(\w+)", option, message)


def _run(args: argparse.Namespace) -> int:
    from soul.attack.run import check_inputs, normalize_config
    from soul.cli import CLIError

    out = check_out(args.out)
    options: dict[str, Any] = {}
    if args.attack_command == "relearn":
        options = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                   "optimizer": args.optimizer, "heldout_fraction": args.heldout_fraction,
                   "questions_per_author": args.questions_per_author}
    elif args.attack_command == "quantize":
        options = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric,
                   "include_embeddings": args.include_embeddings}
    cfg = {args.attack_command: options, "generate": not args.no_generate, "max_new_tokens": args.max_new_tokens,
           "max_questions": args.max_questions}
    try:
        cfg = normalize_config(cfg)
    except ValueError as err:
        raise CLIError(_cli_message(str(err))) from None
    if args.eval_batch_size < 1:
        raise CLIError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    if not args.model:
        raise CLIError("--model is required (the unlearned model to attack)")
    for option, name in (("--model", args.model), ("--target", args.target), ("--retain", getattr(args, "retain", None))):
        _check_model(option, name)
    forget = _load_forget(args.data, args.forget_split)
    check_inputs(cfg, {args.forget_split: forget}, args.forget_split)  # e.g. one author only: fail before loading

    from soul.attack.run import run_attacks
    from soul.io import write_json_atomic
    from soul.models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    references = {role: path for role, path in (("target", args.target), ("retain", getattr(args, "retain", None)))
                  if path}
    eval_kwargs = {"batch_size": args.eval_batch_size, "prompt_format": args.prompt_format,
                   "max_new_tokens": args.max_new_tokens or 200, "mixed_precision": args.mixed_precision}
    result = run_attacks(model, tokenizer, attacks_cfg=cfg, data={args.forget_split: forget},
                         forget_split=args.forget_split, eval_kwargs=eval_kwargs, references=references)
    result["meta"].update({"model": str(args.model), "data": str(args.data)})
    write_json_atomic(out, result)
    section = result[args.attack_command]
    summary = ({f"{b}-bit": r["recovery"] for b, r in section["by_bits"].items()} if "by_bits" in section
               else {"recovery": section["recovery"]} | ({"baseline_recovery": section["baseline_recovery"]}
                                                          if "baseline_recovery" in section else {}))
    print(json.dumps(summary, indent=1))
    for note in section.get("notes", []):
        print(f"soul attack: note: {note}", file=sys.stderr)
    print(f"soul attack: wrote {out}", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser, *, retain: bool = True) -> None:
    p.add_argument("--model", help="the unlearned model: alias, local HF directory or hub id (required)")
    p.add_argument("--data", default="bundled", help="'bundled', a directory of split files, or locuslab/TOFU")
    p.add_argument("--forget-split", default="forget10", help="forget01|forget05|forget10 (its _perturbed "
                   "version is used when the data has one)")
    p.add_argument("--target", help="the target model (before unlearning): the recovery figure's 1")
    if retain:
        p.add_argument("--retain", help="the retain model (never trained on the forget set): the baseline")
    p.add_argument("--out", help="results JSON (written atomically); required")
    p.add_argument("--no-generate", action="store_true", help="skip greedy answers (no ROUGE-L; much faster)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per greedy answer (default 200)")
    p.add_argument("--max-questions", type=int, default=None, help="score at most this many questions per set")
    p.add_argument("--eval-batch-size", type=int, default=16, help="sequences per scoring forward pass")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"])
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--mixed-precision", default="no", choices=["auto", "no", "bf16"],
                   help="score and generate under bfloat16 autocast (weights as loaded)")
    p.add_argument("--config", help="YAML file of option values")
    p.set_defaults(func=_run)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attack", help="relearning / quantization / paraphrase attacks on an unlearned model")
    sub = p.add_subparsers(dest="attack_command", metavar="ATTACK", required=True)

    r = sub.add_parser("relearn", help="fine-tune k steps on some forget authors, score the held-out ones",
                       description="Relearning attack: the forget set is split by author; the model is fine-tuned "
                       "on one part and the other part is scored before and after, as are the target and retain "
                       "models under the same attack.")
    _common(r)
    r.add_argument("--steps", type=int, default=10, help="optimizer steps of relearning (default 10)")
    r.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    r.add_argument("--batch-size", type=int, default=4, help="relearning batch size (default 4)")
    r.add_argument("--seed", type=int, default=0, help="seed of the author split and of training")
    r.add_argument("--optimizer", default="adamw", help="adamw (default), sgd or sophia")
    r.add_argument("--heldout-fraction", type=float, default=0.5, help="fraction of authors held out")
    r.add_argument("--questions-per-author", type=int, default=20,
                   help="block size that defines an author when records have no 'author' field (TOFU: 20)")

    q = sub.add_parser("quantize", help="round weights to 2-8 bits group-wise, score the forget set",
                       description="Quantization attack: round-to-nearest group-wise weight quantization of the "
                       "linear layers (embeddings and lm_head kept in float unless --include-embeddings).")
    _common(q, retain=False)
    q.add_argument("--bits", type=int, nargs="+", default=[4], help="bit widths, e.g. --bits 8 4 (2..8)")
    q.add_argument("--group-size", type=int, default=128, help="input weights per quantization group")
    q.add_argument("--symmetric", action="store_true", help="absmax grid instead of min-max with a zero point")
    q.add_argument("--include-embeddings", action="store_true", help="quantize embeddings and lm_head too")

    a = sub.add_parser("paraphrase", help="score the forget set asked with its paraphrased questions",
                       description="Paraphrase probe: forget probability / ROUGE-L with TOFU's "
                       "paraphrased_question instead of the question.")
    _common(a)
