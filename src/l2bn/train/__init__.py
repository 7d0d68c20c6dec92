"""Training: :func:`train` (or :func:`fit`) one run from a :class:`TrainConfig`; comparisons over
grids live one stage up, in :mod:`l2bn.experiment`."""

from .config import TrainConfig, load_config
from .lock import RunDirBusy
from .trainer import TrainingDiverged, fit, train

__all__ = ["TrainConfig", "load_config", "train", "fit", "TrainingDiverged", "RunDirBusy"]
