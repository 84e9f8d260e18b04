"""`soul eval`: TOFU metrics (+ MIA, memorisation, optional lm-eval tasks) of a model, written as JSON."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def _forget_names(forget_split: str) -> tuple[str, str | None]:
    """(perturbed forget split, matching holdout split) for a TOFU forget split name such as forget10."""
    base = forget_split.removesuffix("_perturbed")
    perturbed = f"{base}_perturbed"
    holdout = f"holdout{base.removeprefix('forget')}" if base.startswith("forget") else None
    return perturbed, holdout


def _optional_split(load_split, data: str, name: str | None) -> list[dict] | None:
    if name is None:
        return None
    try:
        return load_split(data, name)
    except FileNotFoundError as err:
        print(f"soul eval: warning: skipping split {name!r} ({err})", file=sys.stderr)
        return None


def _weights_fingerprint(model_path: str) -> str:
    """The content hash of a local model directory (`soul.safety.fingerprint_files`: names, sizes and bytes),
    so weights replaced by others of the same size and modification time are told apart; a hub id's name."""
    from soul.safety import fingerprint_files

    p = Path(model_path)
    if not p.is_dir():
        return f"hub:{model_path}"  # a hub id: its name is all we know
    return fingerprint_files(p)


def cached_reference(retain_model: str, forget: list[dict], holdout: list[dict] | None, *, prompt_format: str,
                     batch_size: int, min_k: float, dtype: str | None, device: str,
                     mixed_precision: str = "no", max_length: int | None = None,
                     sources: dict[str, Any] | None = None) -> tuple[dict, Path]:
    """The retain model's reference statistics, computed once per (model weights, data, settings) and cached
    under ``<soul cache>/eval/`` so every later evaluation against the same retain model reuses them (in the
    evaluated model's precision: truth ratios under bf16 autocast differ from fp32 ones by ~1 %)."""
    from soul.eval.results import load_results
    from soul.eval.tofu import reference_stats
    from soul.models import cache_dir, load_model, resolve_model_path

    path = resolve_model_path(retain_model)
    key = hashlib.sha256(json.dumps(
        {"model": path, "weights": _weights_fingerprint(path), "forget": forget, "holdout": holdout,
         "prompt_format": prompt_format, "min_k": min_k, "dtype": dtype, "mixed_precision": mixed_precision,
         "max_length": max_length}, sort_keys=True).encode()).hexdigest()[:20]
    target = cache_dir() / "eval" / f"reference-{key}.json"
    if target.is_file():
        return load_results(target), target
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    ref = reference_stats(model, tokenizer, forget, holdout, prompt_format=prompt_format, batch_size=batch_size,
                          min_k=min_k, mixed_precision=mixed_precision, max_length=max_length, sources=sources,
                          out=target)
    return ref, target


def check_open_unlearning_dir(directory: str, out: Path, inputs: list[str | None]) -> None:
    """Refuse, before any work, an ``--open-unlearning-dir`` whose files (TOFU_EVAL.json, TOFU_SUMMARY.json)
    would replace an input (a ``--retain-reference`` file, the model's or the data's files) or the ``--out``
    file, or that is a link, a file or inside soul's model cache (`soul.safety.check_output_file`)."""
    from soul.errors import OutputError
    from soul.eval.interop import OU_EVAL_NAME, OU_SUMMARY_NAME
    from soul.safety import check_output_file, refuse_link

    option = "--open-unlearning-dir"
    refuse_link(directory, option)
    path = Path(directory).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: is a file; give a directory for TOFU_EVAL.json and TOFU_SUMMARY.json")
    for name in (OU_EVAL_NAME, OU_SUMMARY_NAME):
        target = check_output_file(path / name, inputs=inputs, option=option)
        if target == out:
            raise OutputError(f"{option} {path}: its {name} is the --out file; choose another directory or --out")


def _run(args: argparse.Namespace) -> int:
    from soul.cli import CLIError

    if not args.out:
        raise CLIError("--out is required (the results JSON to write)")
    from soul.safety import clean_leftovers, dir_lock, require_number

    for option, low, high, integer in (("batch_size", 1, None, True), ("max_new_tokens", 1, None, True),
                                       ("min_k", 0, 1, False), ("lm_eval_limit", 0, None, False),
                                       ("generation_batch_size", 1, None, True), ("max_length", 2, None, True)):
        require_number(getattr(args, option), f"--{option.replace('_', '-')}", low=low, high=high, integer=integer,
                       allow_none=option in ("lm_eval_limit", "generation_batch_size", "max_length"))
    out = _check_outputs(args)
    with dir_lock(out):
        clean_leftovers(out)
        return _evaluate(args, out)


def _check_outputs(args: argparse.Namespace) -> Path:
    """Every file `soul eval` will write — --out, the open-unlearning files, the tracker directory — checked
    before any data or model is loaded (a bad --open-unlearning-dir used to fail after the whole evaluation);
    returns the resolved --out."""
    from soul.errors import OutputError
    from soul.safety import check_not_protected, check_output_file, check_writable

    inputs = [args.model, args.data, args.retain_model, args.retain_results]
    out = check_output_file(args.out, inputs=inputs)
    if args.open_unlearning_dir:
        check_open_unlearning_dir(args.open_unlearning_dir, out, inputs)
    if args.tracker_dir:
        check_not_protected(Path(args.tracker_dir).expanduser().resolve(), "--tracker-dir")
    if args.report_to:
        trackers = Path(args.tracker_dir or out.parent / "trackers").expanduser()
        if trackers.exists() and not trackers.is_dir():
            raise OutputError(f"--tracker-dir {trackers}: exists and is not a directory")
        check_writable(trackers, "--tracker-dir")
    return out


def _source_places(data: str, names: dict[str, str]) -> dict[str, Any]:
    """Split key -> where its records came from (the split's file for a directory of split files)."""
    from soul.train.lengths import data_label

    info = {key: {"source": data, "split": name} for key, name in names.items()}
    return {key: data_label(info, key) for key in names}


def _check_lengths_early(args: argparse.Namespace, splits: dict[str, list[dict]], holdout: list[dict] | None,
                         sources: dict[str, Any]) -> None:
    """The length guard of `soul.eval.tofu.evaluate` with only the model's tokenizer and config, so a record
    longer than the context is refused before any model is loaded (evaluate checks again before scoring)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from soul.eval.tofu import check_lengths
    from soul.models import resolve_model_path
    from soul.train.lengths import model_context

    path = resolve_model_path(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):  # e.g. remote code: loading the model itself will say what is wrong
        return
    context = model_context(SimpleNamespace(config=config), tokenizer)
    check_lengths(tokenizer, splits, holdout=holdout, context=context, prompt_format=args.prompt_format,
                  max_length=args.max_length, sources=sources)


def _evaluate(args: argparse.Namespace, out: Path) -> int:
    from soul.cli import CLIError
    from soul.data import load_split  # the data package's loader (bundled benchmark, directory or hub)
    from soul.eval.tofu import evaluate
    from soul.io import write_json_atomic
    from soul.models import load_model

    if args.retain_model and args.retain_results:
        raise CLIError("give either --retain-model or --retain-reference, not both")
    from soul.models import resolve_model_path

    resolve_model_path(args.model)  # a missing model fails before minutes of data loading and scoring
    if args.lm_eval:
        import importlib.util

        from soul.eval.harness import LM_EVAL_MISSING

        if importlib.util.find_spec("lm_eval") is None:  # fail before minutes of TOFU evaluation
            raise CLIError(LM_EVAL_MISSING)
    if args.report_to:
        from soul.train.trackers import check_report_to

        try:
            check_report_to(args.report_to)
        except ValueError as err:
            raise CLIError(str(err).replace("option 'report_to'", "--report-to")) from None
    forget_name, holdout_name = _forget_names(args.forget_split)
    forget = load_split(args.data, forget_name)
    splits: dict[str, list[dict]] = {"forget": forget}
    for role, name in (("retain", args.retain_split), ("real_authors", "real_authors_perturbed"),
                       ("world_facts", "world_facts_perturbed")):
        records = _optional_split(load_split, args.data, name)
        if records is not None:
            splits[role] = records
    holdout = None if args.no_holdout else _optional_split(load_split, args.data, holdout_name)
    names = {"forget": forget_name, "retain": args.retain_split, "real_authors": "real_authors_perturbed",
             "world_facts": "world_facts_perturbed", "holdout": holdout_name}
    sources = _source_places(args.data, {k: v for k, v in names.items() if v and (k in splits or k == "holdout")})
    _check_lengths_early(args, splits, holdout, sources)

    reference: Any = None
    if args.retain_results:
        from soul.eval.results import load_reference

        try:  # read and check it now, before any model is loaded
            reference = load_reference(args.retain_results)
        except (OSError, ValueError) as err:
            raise CLIError(str(err)) from None
        print(f"soul eval: retain reference {args.retain_results} ({reference['meta']['reference_format']} format)",
              file=sys.stderr)
    if args.retain_model:
        reference, where = cached_reference(args.retain_model, forget, holdout, prompt_format=args.prompt_format,
                                            batch_size=args.batch_size, min_k=args.min_k, dtype=args.dtype,
                                            device=args.device, mixed_precision=args.mixed_precision,
                                            max_length=args.max_length,
                                            sources={k: sources[k] for k in ("forget", "holdout") if k in sources})
        print(f"soul eval: retain reference {where}", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    results = evaluate(model, tokenizer, splits, retain_reference=reference, holdout=holdout,
                       prompt_format=args.prompt_format, batch_size=args.batch_size,
                       generation_batch_size=args.generation_batch_size,
                       max_new_tokens=args.max_new_tokens, min_k=args.min_k, mixed_precision=args.mixed_precision,
                       max_length=args.max_length, sources=sources)
    results["meta"].update({"model": str(args.model), "data": str(args.data), "forget_split": forget_name})
    if args.retain_results:
        results["meta"]["retain_reference"] = str(args.retain_results)
    if args.lm_eval:
        from soul.eval.harness import run_lm_eval

        try:
            results["lm_eval"] = run_lm_eval(args.model, args.lm_eval, batch_size=args.batch_size,
                                             limit=args.lm_eval_limit, device=args.device)
        except ImportError as err:
            raise CLIError(str(err)) from None
    write_json_atomic(out, results)
    if args.open_unlearning_dir:
        from soul.eval.interop import write_open_unlearning

        for path in write_open_unlearning(results, args.open_unlearning_dir):
            print(f"soul eval: wrote {path}", file=sys.stderr)
    if args.report_to:
        from soul.train.trackers import log_eval_metrics

        tracker_dir = Path(args.tracker_dir or Path(args.out).parent / "trackers")
        log_eval_metrics(results, args.report_to, tracker_dir)
        print(f"soul eval: logged the metrics to {args.report_to} ({tracker_dir})", file=sys.stderr)
    summary = {k: v["agg_value"] for k, v in results.items() if isinstance(v, dict) and "agg_value" in v}
    print(json.dumps(summary, indent=1))
    print(f"soul eval: wrote {args.out}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="TOFU metrics, forget quality vs a retain model, MIA, memorisation")
    p.add_argument("--model", default="smollm2-135m", help="alias, local HF directory or hub id")
    p.add_argument("--data", default="bundled", help="'bundled', a directory of split files, or locuslab/TOFU")
    p.add_argument("--forget-split", default="forget10", help="forget01|forget05|forget10 (its _perturbed "
                   "version is scored; holdoutXX gives the MIA non-members)")
    p.add_argument("--retain-split", default="retain_perturbed")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--retain-model", help="retain model (trained without the forget set): its forget-set "
                     "statistics are computed once and cached, for forget quality and PrivLeak")
    ref.add_argument("--retain-reference", "--retain-results", dest="retain_results", metavar="FILE",
                     help="the retain model's results, evaluated elsewhere: a `soul eval` results JSON, "
                     "open-unlearning's TOFU_EVAL.json or TOFU's eval_log_forget.json (format detected)")
    p.add_argument("--out", help="results JSON (written atomically); required")
    p.add_argument("--open-unlearning-dir", metavar="DIR", help="also write the results in open-unlearning's "
                   "layout: DIR/TOFU_EVAL.json and DIR/TOFU_SUMMARY.json (same key names)")
    p.add_argument("--report-to", default=None, metavar="TRACKERS",
                   help="also log every metric's agg_value (eval/<metric>) to tensorboard|wandb|mlflow|trackio "
                   "(comma-separated)")
    p.add_argument("--tracker-dir", default=None, help="tracker files (default: 'trackers' next to --out)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per scoring forward pass")
    p.add_argument("--generation-batch-size", type=int, default=None,
                   help="rows per greedy decoding step (default: 2 × --batch-size)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"])
    p.add_argument("--max-length", type=int, default=None,
                   help="cut answers so question + answer fit this many tokens (at most the model's context), as "
                   "training's --max-length; without it a record longer than the context is an error")
    p.add_argument("--min-k", type=float, default=0.4, help="fraction k of Min-K%% and Min-K%%++")
    p.add_argument("--no-holdout", action="store_true", help="skip MIA (no holdout set)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--mixed-precision", default="no", choices=["auto", "no", "bf16"],
                   help="bf16: score and generate under bfloat16 autocast (weights as loaded; faster only on "
                   "hardware with native bf16, slower where the CPU emulates it); auto: bf16 only where native; "
                   "compare only results evaluated in the same precision")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-eval tasks (e.g. mmlu); needs soul[lm-eval] and hub access")
    p.add_argument("--lm-eval-limit", type=float, default=None, help="lm-eval's per-task example limit")
    p.add_argument("--config", help="YAML file of option values")
    p.set_defaults(func=_run)
