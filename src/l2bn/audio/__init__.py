"""Acoustic scene classification: log-mel front-end, audio datasets, the spoken-digits generator."""

from .features import AudioError, FrontEnd, deltas, load_audio, logmel, logmel_librosa, stack_deltas

__all__ = ["AudioError", "FrontEnd", "deltas", "load_audio", "logmel", "logmel_librosa", "stack_deltas"]
