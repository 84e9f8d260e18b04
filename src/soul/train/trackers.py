"""Experiment trackers (``report_to`` / ``--report-to``): TensorBoard, Weights & Biases, MLflow, Trackio.

The training loop's `train_log.jsonl` stays the record of a run; a tracker gets a copy of every line as it
is written (`TrackerLog.log`): each numeric field of a ``"kind": "train"`` line under ``train/<field>``, of a
``"kind": "probe"`` line under ``probe/<field>``, at the line's ``step``. Booleans are logged as 0/1; null and
text fields are skipped. `log_eval_metrics` logs the ``agg_value`` of every metric of an evaluation
(``eval/<metric>``) — ``soul eval --report-to``.

The trackers are accelerate's (`accelerate.tracking`), all of which can run offline: TensorBoard writes event
files; W&B runs with ``WANDB_MODE=offline`` unless that variable is set; MLflow writes to a local file store
under the logging directory unless ``MLFLOW_TRACKING_URI`` is set; Trackio keeps its local database. Only the
main process logs. A requested tracker whose package is missing is an error before training starts, naming
the package (``pip install 'soul[trackers]'`` installs TensorBoard).

Where files go: a training run writes into ``.<out name>.trackers`` next to its output directory while it
runs and moves it to ``<out>/trackers`` when the final model is in place (the output directory is replaced
as a whole at the end, so nothing written inside it during the run would survive).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# tracker name -> (module that must be importable, pip package that provides it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
TRACKER_DIR = "trackers"
RUN_NAME = "soul"


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """Tracker names from a list or a comma-separated string; ``none`` / empty -> []. Unknown names are an error."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"option 'report_to': unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def check_report_to(value: str | Iterable[str] | None) -> list[str]:
    """`parse_report_to`, and every requested tracker's package must be installed."""
    names = parse_report_to(value)
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            extra = " (or pip install 'soul[trackers]')" if name == "tensorboard" else ""
            raise ValueError(f"option 'report_to': tracker {name!r} needs the {package!r} package, which is not "
                             f"installed: pip install {package}{extra}")
    return names


def _make_tracker(name: str, logging_dir: Path, run_name: str):
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, logging_dir)
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        return tracking.WandBTracker(run_name, dir=str(logging_dir))
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (logging_dir / "mlruns").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name=run_name, logging_dir=str(logging_dir))
    return tracking.TrackioTracker(run_name)


def numeric_fields(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The loggable fields of a log line: numbers (bools as 0/1), finite, under ``prefix/name``."""
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[f"{prefix}/{key}"] = value
    return out


class TrackerLog:
    """The trackers of one run. ``TrackerLog([])`` does nothing, so the loop can call it unconditionally."""

    def __init__(self, names: Iterable[str], logging_dir: str | os.PathLike | None, *, run_name: str = RUN_NAME,
                 config: Mapping[str, Any] | None = None, active: bool = True) -> None:
        self.names = list(names) if active else []
        self.logging_dir = Path(logging_dir) if logging_dir is not None else None
        self.trackers = []
        if not self.names:
            return
        if self.logging_dir is None:
            raise ValueError("option 'report_to' needs an output directory for the tracker files")
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            tracker = _make_tracker(name, self.logging_dir, run_name)
            tracker.start()
            if config:
                params = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}
                tracker.store_init_configuration(params)
            self.trackers.append(tracker)

    def log(self, record: Mapping[str, Any]) -> None:
        """One `train_log.jsonl` line (see the module docstring)."""
        if not self.trackers:
            return
        values = numeric_fields(record, str(record.get("kind", "train")))
        step = int(record["step"]) if isinstance(record.get("step"), int | float) else None
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log(dict(values), step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_for_run(cfg, out: Path | None, main: bool) -> TrackerLog:
    """The trackers of a training run (``cfg.report_to``), logging into ``.<out name>.trackers`` next to `out`."""
    names = check_report_to(getattr(cfg, "report_to", None))
    if not names or not main:
        return TrackerLog([], None)
    if out is None:
        raise ValueError("option 'report_to' needs an output directory (out_dir / --out) for the tracker files")
    working = out.parent / f".{out.name}.{TRACKER_DIR}"
    if (working.exists() or working.is_symlink()) and not cfg.resume:  # a previous run's copy: start clean
        from soul.safety import remove_path

        remove_path(working)  # a link is unlinked, never followed
    return TrackerLog(names, working, config=cfg.to_dict())


def close_run(trackers: TrackerLog, out: Path | None) -> Path | None:
    """Flush and close the trackers, then move their files to ``<out>/trackers``; return that path."""
    working = trackers.logging_dir
    trackers.finish()
    if working is None or out is None or not working.exists():
        return None
    target = out / TRACKER_DIR
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(working, target)
    return target


def log_eval_metrics(results: Mapping[str, Any], report_to: str | Iterable[str] | None,
                     logging_dir: str | os.PathLike, *, step: int = 0, run_name: str = RUN_NAME) -> list[str]:
    """Log every metric's ``agg_value`` of an evaluation as ``eval/<metric>``; return the tracker names used."""
    names = check_report_to(report_to)
    if not names:
        return []
    values = {f"eval/{k}": float(v["agg_value"]) for k, v in results.items()
              if isinstance(v, Mapping) and isinstance(v.get("agg_value"), int | float)
              and not isinstance(v.get("agg_value"), bool) and math.isfinite(v["agg_value"])}
    log = TrackerLog(names, logging_dir, run_name=run_name)
    log.log_metrics(values, step=step)
    log.finish()
    return names
