"""The benchmarks `soul reproduce` runs, one `Task` subclass per file (interface: `base.Task`)."""

from __future__ import annotations

from soul.pipeline.tasks.base import Task
from soul.pipeline.tasks.copyright import CopyrightTask
from soul.pipeline.tasks.detox import DetoxTask
from soul.pipeline.tasks.tofu import TofuTask
from soul.pipeline.tasks.wmdp import WmdpTask

TASKS: dict[str, type[Task]] = {"tofu": TofuTask, "copyright": CopyrightTask, "detox": DetoxTask, "wmdp": WmdpTask}

__all__ = ["TASKS", "CopyrightTask", "DetoxTask", "Task", "TofuTask", "WmdpTask"]
