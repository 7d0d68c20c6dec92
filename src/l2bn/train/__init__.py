"""Experiment engine: :func:`train` one run, :func:`compare` BN vs L2BN over models x seeds."""

from .config import TrainConfig, load_config
from .engine import TrainingDiverged, train

__all__ = ["TrainConfig", "load_config", "train", "TrainingDiverged"]
