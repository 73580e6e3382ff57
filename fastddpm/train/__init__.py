"""Training: ``fastddpm train`` and its Python API (:func:`train`, :class:`TrainConfig`)."""

from .checkpoint import CheckpointError
from .config import TrainConfig
from .data import digits_split, load_dataset
from .loop import TrainingError, train

__all__ = ["CheckpointError", "TrainConfig", "TrainingError", "digits_split", "load_dataset", "train"]
