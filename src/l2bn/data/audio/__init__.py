"""Everything audio, in one place: the log-mel front-end (:mod:`.features`), the feature cache
(:mod:`.cache`), the spoken-digits generator (:mod:`.spoken_digits`) and the datasets
``dcase2020-1a``, ``audio-folder`` and ``spoken-digits`` (:mod:`.datasets`). The audio models
are in :mod:`l2bn.models.dcase` and :mod:`l2bn.models.audio_cnn`.
"""

from .datasets import AUDIO_DATASETS
from .features import AudioError, FrontEnd, deltas, load_audio, logmel, logmel_librosa, stack_deltas

__all__ = [
    "AUDIO_DATASETS",
    "AudioError",
    "FrontEnd",
    "deltas",
    "load_audio",
    "logmel",
    "logmel_librosa",
    "stack_deltas",
]
