"""Datasets and tasks (primary label y, secondary label z)."""

from veil.data.readers import DatasetMissingError
from veil.data.tasks import Split, Task, list_tasks, load_task

__all__ = ["DatasetMissingError", "Split", "Task", "list_tasks", "load_task"]
