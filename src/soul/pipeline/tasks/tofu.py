"""TOFU (and the bundled fictitious-author benchmark): forget quality against a retain model, model utility,
MIA. The target is fine-tuned on ``full`` and the retain model on the retain split, unless named.

With ``data.subset: {n_retain_authors: N, n_holdout_authors: M}`` the splits come from
`soul.data.tofu_subset` (a CPU-sized TOFU: the forget authors plus N retain authors; ``full`` is what the
target is fine-tuned on, the retain split the retain model's training set, ``holdoutXX`` M never-trained
authors as the MIA non-members). ``data.source`` is expanded (``${SOUL_TOFU_DIR:-../shared/data/tofu}``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from soul.pipeline.common import hash_records, sha
from soul.pipeline.tasks.base import Fail, Task

if TYPE_CHECKING:
    from soul.pipeline.preset_types import Preset

DEFAULT_UTILITY_SPLITS = ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
# data.subset keys: the keyword arguments of soul.data.tofu_subset -> (type, may be null, minimum)
SUBSET_KEYS: dict[str, tuple[type, bool, int]] = {"n_retain_authors": (int, False, 1),
                                                  "n_holdout_authors": (int, True, 0)}


def derived_split(forget_split: str, kind: str) -> str:
    """``forget10`` → ``retain90`` (kind "retain") or ``holdout10`` (kind "holdout")."""
    m = re.fullmatch(r"forget(\d{2})", forget_split)
    if not m:
        raise ValueError(f"cannot derive the {kind} split from forget split {forget_split!r}; set {kind}_split")
    pct = int(m.group(1))
    return f"retain{100 - pct:02d}" if kind == "retain" else f"holdout{pct:02d}"


class TofuTask(Task):
    name = "tofu"
    data_keys = ("source", "bundled", "subset")
    eval_keys = ("batch_size", "generation_batch_size", "max_new_tokens", "min_k", "prompt_format", "mixed_precision",
                 "max_length")
    reference_roles = ("target", "retain")
    supports_sweep = True
    supports_attacks = True
    report_group = "tofu"
    default_utility_splits: ClassVar[tuple[str, ...]] = DEFAULT_UTILITY_SPLITS

    def check(self, preset: Preset, fail: Fail) -> None:
        bundled = preset.data.get("bundled")
        if bundled is not None and not isinstance(bundled, dict):
            raise fail("data.bundled", f"expected a mapping of soul.data.bundled_dir options, got {bundled!r}")
        for kind in ("retain", "holdout"):
            if getattr(preset, f"{kind}_split") is None:
                try:
                    derived_split(preset.forget_split, kind)
                except ValueError as err:
                    raise fail("forget_split", str(err)) from None
        if preset.data.get("subset") is not None:
            self.check_subset(preset, fail)
        from soul.eval.scoring import EVAL_PRECISIONS

        if preset.eval.get("mixed_precision", "no") not in EVAL_PRECISIONS:
            raise fail("eval.mixed_precision", f"expected one of {list(EVAL_PRECISIONS)}, "
                                               f"got {preset.eval['mixed_precision']!r}")

    def check_subset(self, preset: Preset, fail: Fail) -> None:
        """``data.subset``: `tofu_subset`'s options, and splits it builds (it names them after TOFU's)."""
        subset = preset.data["subset"]
        if not isinstance(subset, dict):
            raise fail("data.subset", f"expected a mapping of soul.data.tofu_subset options "
                                      f"({', '.join(SUBSET_KEYS)}), got {subset!r}")
        for key, value in subset.items():
            if key not in SUBSET_KEYS:
                raise fail(f"data.subset.{key}", f"unknown key; known: {sorted(SUBSET_KEYS)}")
            kind, nullable, minimum = SUBSET_KEYS[key]
            if value is None and nullable:
                continue
            if not isinstance(value, kind) or isinstance(value, bool) or value < minimum:
                raise fail(f"data.subset.{key}", f"must be an integer >= {minimum}, got {value!r}")
        if "n_retain_authors" not in subset:
            raise fail("data.subset", "needs n_retain_authors (how many retain authors to fine-tune on)")
        if str(preset.data.get("source", "bundled")) == "bundled":
            raise fail("data.subset", "needs data.source: a directory of TOFU's files "
                                      "(e.g. ${SOUL_TOFU_DIR:-../shared/data/tofu})")
        try:
            derived_split(preset.forget_split, "retain")
        except ValueError as err:
            raise fail("forget_split", f"data.subset needs TOFU's forgetXX split: {err}") from None
        for kind in ("retain", "holdout"):
            given = getattr(preset, f"{kind}_split")
            built = derived_split(preset.forget_split, kind)
            if given is not None and given != built:
                raise fail(f"{kind}_split", f"data.subset builds the {kind} split {built!r} for "
                                            f"{preset.forget_split}; got {given!r} (leave it out or set {built!r})")
        unknown = [u for u in preset.utility_splits if u not in DEFAULT_UTILITY_SPLITS]
        if unknown:
            raise fail("utility_splits", f"data.subset provides {list(DEFAULT_UTILITY_SPLITS)}; got {unknown}")

    def splits(self, preset: Preset) -> tuple[str, str]:
        return preset.forget_split, preset.retain_split or derived_split(preset.forget_split, "retain")

    def holdout(self, preset: Preset) -> str:
        return preset.holdout_split or derived_split(preset.forget_split, "holdout")

    def source(self, preset: Preset) -> str:
        """The data source: ``bundled`` (or a generated bundled directory), a hub id, or a directory with
        ``${VAR:-default}`` and ``~`` expanded."""
        from soul.data import expand_source

        source = str(preset.data.get("source", "bundled"))
        if source == "bundled" and preset.data.get("bundled"):
            from soul.data import bundled_dir

            return str(bundled_dir(**preset.data["bundled"]))
        return expand_source(source)

    def data_dir(self, preset: Preset) -> str:
        """`source` for a preset whose data must be a local directory of TOFU's files (``data.subset``):
        a clear error naming the path (and SOUL_TOFU_DIR) when it is absent."""
        raw = str(preset.data.get("source"))
        path = self.source(preset)
        if not (Path(path) / "full.json").is_file():
            state = "has no full.json" if Path(path).is_dir() else "does not exist"
            raise FileNotFoundError(
                f"preset {preset.where}: data.source {raw!r} -> {Path(path).resolve()} {state}; TOFU's published "
                "JSON files (full.json, forget01.json, ...) are needed there: set SOUL_TOFU_DIR to the directory "
                "holding them, or run from the repository root so that ../shared/data/tofu is found")
        return path

    def finetunes(self, role: str, preset: Preset) -> bool:
        return not getattr(preset, role).model  # TOFU always has both reference models

    def reference_split(self, role: str, preset: Preset) -> str:
        return "full" if role == "target" else self.splits(preset)[1]

    def load_data(self, preset: Preset) -> dict[str, Any]:
        """Every split the pipeline needs, by name, evaluation sets capped at ``max_questions`` (first N)."""
        from soul.data import load_split, tofu_subset

        forget, retain = self.splits(preset)
        holdout = self.holdout(preset)
        names = {"full", forget, retain, holdout, *preset.utility_splits}
        subset = preset.data.get("subset")
        if subset is not None:  # forget authors + N retain authors, M holdout authors (tofu_subset's docstring)
            built = tofu_subset(self.data_dir(preset), forget, **subset)
            missing = sorted(names - set(built))
            if missing:
                raise FileNotFoundError(f"preset {preset.where}: data.subset of {self.source(preset)} has no "
                                        f"split(s) {missing} (its files: {sorted(built)})")
            splits: dict[str, Any] = {name: built[name] for name in sorted(names)}
        else:
            built = {}
            source = self.source(preset)
            splits = {name: load_split(source, name) for name in sorted(names)}
        for name in (holdout, *preset.utility_splits):
            splits[name] = self.cap(splits[name], preset)
        splits["_forget_eval"] = self.cap(self.forget_eval(preset, splits[forget], built), preset)
        return splits

    def attack_records(self, preset: Preset, data: dict[str, Any]) -> list[dict]:
        """The forget records the attacks score (`forget_eval`: they need the paraphrases too)."""
        return self.forget_eval(preset, data[preset.forget_split], data)

    def forget_eval(self, preset: Preset, forget: list[dict], built: dict[str, Any]) -> list[dict]:
        """The forget split as evaluated: TOFU's published ``forgetXX`` has no paraphrases or perturbations
        (the truth ratio and the paraphrase probe need them); its ``forgetXX_perturbed`` has, for the same
        questions. The bundled benchmark's forget split carries them itself."""
        if all(r.get("paraphrased_question") and r.get("paraphrased_answer") and r.get("perturbed_answer")
               for r in forget):
            return forget
        name = f"{preset.forget_split}_perturbed"
        perturbed = built.get(name)
        if perturbed is None:
            from soul.data import load_split

            try:
                perturbed = load_split(self.source(preset), name)
            except (FileNotFoundError, ValueError):  # no such split: the evaluation names what is missing
                return forget
        same = [r["question"] for r in perturbed] == [r["question"] for r in forget]
        return perturbed if same else forget

    def eval_splits(self, preset: Preset, data: dict[str, Any]) -> tuple[dict[str, list[dict]], list[dict]]:
        splits = {preset.forget_split: data["_forget_eval"]}
        for name in preset.utility_splits:
            splits[name] = data[name]
        return splits, data[self.holdout(preset)]

    def eval_kwargs(self, preset: Preset) -> dict[str, Any]:
        ev = preset.eval
        return {"batch_size": ev.get("batch_size", 16), "generation_batch_size": ev.get("generation_batch_size"),
                "max_new_tokens": ev.get("max_new_tokens", 200), "min_k": ev.get("min_k", 0.4),
                "prompt_format": ev.get("prompt_format", preset.prompt_format_option or "auto"),
                "mixed_precision": ev.get("mixed_precision", "no")}

    def evaluate(self, model: Any, tokenizer: Any, preset: Preset, data: dict[str, Any],
                 reference: dict[str, Any] | None) -> dict[str, Any]:
        from soul.eval import evaluate

        splits, holdout = self.eval_splits(preset, data)
        return evaluate(model, tokenizer, splits, forget_split_name=preset.forget_split,
                        retain_reference=reference, holdout=holdout, max_length=preset.eval.get("max_length"),
                        **self.eval_kwargs(preset))

    def eval_cache_key(self, preset: Preset, data: dict[str, Any], reference: dict[str, Any] | None) -> Any:
        splits, holdout = self.eval_splits(preset, data)
        return {"eval": self.eval_kwargs(preset), "data": {k: hash_records(v) for k, v in splits.items()},
                "holdout": hash_records(holdout),
                "reference": None if reference is None else sha(reference.get("forget_truth_ratio"))}

    def prepare_reference(self, role: str, results: dict[str, Any]) -> None:
        """The retain model's own row: forget quality of its truth ratios against themselves (KS p = 1)."""
        if role != "retain":
            return
        from soul.eval.metrics import ks_forget_quality

        trs = [v["score"] for v in results["forget_truth_ratio"]["value_by_index"].values()]
        p, d = ks_forget_quality(trs, trs)
        results["forget_quality"] = {"agg_value": p, "value_by_index": {}, "ks_statistic": d, "n": len(trs),
                                     "note": "the retain model is the reference: compared with itself"}
