"""Every benchmark is one `Task` subclass in its own module, with the same interface."""

from __future__ import annotations

import importlib

from soul.pipeline.preset import load_preset
from soul.pipeline.tasks import TASKS, Task


def test_one_class_per_task_in_its_own_module_with_the_shared_interface():
    for name, cls in TASKS.items():
        assert issubclass(cls, Task) and cls.name == name
        assert cls.__module__ == f"soul.pipeline.tasks.{name}"
        assert getattr(importlib.import_module(cls.__module__), cls.__name__) is cls
        for method in ("load_data", "evaluate"):  # what a task must provide itself
            assert getattr(cls, method) is not getattr(Task, method), (name, method)
        assert "source" in cls.data_keys and "batch_size" in cls.eval_keys and cls.report_group
    assert TASKS["tofu"].reference_roles == ("target", "retain") and TASKS["tofu"].supports_sweep
    assert all(TASKS[t].reference_roles == ("target",) for t in ("copyright", "detox", "wmdp"))


def test_task_defaults_reach_the_preset():
    assert load_preset("tiny-copyright").prompt_format == "raw"  # text corpora: the prompt is the text
    assert load_preset("tiny").prompt_format == "auto"
    tofu = load_preset("tiny")
    assert tofu.task_impl.splits(tofu) == ("forget10", "retain90")
    assert tofu.utility_splits == list(TASKS["tofu"].default_utility_splits)
