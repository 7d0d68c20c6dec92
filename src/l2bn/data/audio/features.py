"""Log-mel front-end of the Hu et al. DCASE 2020 Task 1A system, plus audio I/O.

Defaults (the DCASE recipe): 44.1 kHz mono, the first 10 s, 2048-point FFT, hop 1024, centred
frames with **reflect** edge padding, power spectrum, 128 HTK mel bands over 0 .. sr/2 without
filter normalisation, ``log(mel + 1e-8)``, per-clip min–max scaling to [0, 1]; 431 frames per
clip. Deltas and delta-deltas (Hu et al.'s 5-frame regression) are stacked as 3 channels and
trimmed to a common length by :func:`stack_deltas` (423 frames).

Edge padding: Hu et al.'s ``extr_feat_2020_nodelta_scaled.py`` calls
``librosa.feature.melspectrogram`` with librosa's defaults, and in the librosa of their
environment (0.6/0.7) that is ``center=True, pad_mode="reflect"`` (librosa 0.10 changed the
default to ``"constant"``). ``FrontEnd.pad_mode`` makes the choice explicit. It changes the first
and the last frame directly (zero padding halves their energy), the delta-deltas of the first and
last output frames through the regression, and every value of a clip whose minimum sits in an
edge frame through the per-clip min–max scaling.

Their features are stored as float32, and so are ours (``FrontEnd.cache_dtype``): float16 rounds
the [0, 1] log-mel to steps of up to 2^-11 ≈ 5e-4, errors that the delta and delta-delta
regressions carry over (max error 7e-5 against a delta-delta spread of 9e-3 on white noise;
relatively larger on stationary scenes, whose delta-deltas are smaller).

Audio I/O uses soundfile and the mel filterbank librosa (``librosa.filters.mel``); the STFT
and the filterbank product run in torch, batched, on any device. :func:`logmel_librosa` is the
direct librosa computation the batched one is tested against.

Conversions (documented, never silent): a stereo file where mono is expected is averaged to
mono (``stereo="mean"``) or refused (``stereo="error"``); a wrong sample rate is refused unless
``resample=True`` (then librosa resamples). Shorter clips are zero-padded to ``seconds``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ...io import BadInput, UsageError


class AudioError(UsageError, ValueError):
    """An audio file is missing, unreadable, truncated or not in the expected format."""


@dataclass(frozen=True)
class FrontEnd:
    """Feature parameters; any change gives a different cache key."""

    sample_rate: int = 44100
    seconds: float = 10.0
    n_fft: int = 2048
    hop_length: int = 1024
    n_mels: int = 128
    fmin: float = 0.0
    fmax: Optional[float] = None  # None: sample_rate / 2
    log_offset: float = 1e-8
    pad_mode: str = (
        "reflect"  # STFT edge padding with center=True: reflect (librosa < 0.10) | constant
    )
    cache_dtype: str = (
        "float32"  # dtype of cached features: float32 | float16 (quantizes the deltas)
    )
    stereo: str = "mean"  # mean | error
    resample: bool = False

    def __post_init__(self) -> None:
        if self.pad_mode not in ("reflect", "constant"):
            raise BadInput(
                f"FrontEnd.pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}"
            )
        if self.cache_dtype not in ("float32", "float16"):
            raise BadInput(
                f"FrontEnd.cache_dtype must be 'float32' or 'float16', got {self.cache_dtype!r}"
            )

    @property
    def n_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))

    @property
    def n_frames(self) -> int:
        return 1 + self.n_samples // self.hop_length

    def key(self) -> dict:
        return asdict(self)


def _check_wav_complete(path: Path) -> None:
    """libsndfile silently reads what is there of a truncated WAV; compare the RIFF ``data``
    chunk size in the header with the bytes actually on disk."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return  # not a RIFF WAV (soundfile decides whether it can read it)
        end = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, csize = struct.unpack(end + "4sI", f.read(8))
            if cid == b"data":
                if pos + 8 + csize > size:
                    raise AudioError(
                        f"{path}: truncated WAV (data chunk says {csize} bytes, file has "
                        f"{size - pos - 8})"
                    )
                return
            pos += 8 + csize + (csize & 1)


def load_audio(path: Path, fe: FrontEnd) -> np.ndarray:
    """Read ``path`` as float32 mono at ``fe.sample_rate``, cut or zero-padded to ``fe.seconds``."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    if path.suffix.lower() == ".wav":
        _check_wav_complete(path)
    try:
        info = sf.info(str(path))
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio file ({type(e).__name__}: {e})") from e
    if info.frames > 0 and len(data) < info.frames:
        raise AudioError(
            f"{path}: truncated audio file (header says {info.frames} frames, read {len(data)})"
        )
    if len(data) == 0:
        raise AudioError(f"{path}: empty audio file")
    if data.shape[1] > 1:
        if fe.stereo == "error":
            raise AudioError(
                f"{path}: {data.shape[1]} channels, expected mono (use stereo='mean' to average "
                f"them)"
            )
        data = data.mean(axis=1, keepdims=True)
    y = data[:, 0]
    if sr != fe.sample_rate:
        if not fe.resample:
            raise AudioError(
                f"{path}: sample rate {sr} Hz, expected {fe.sample_rate} Hz (convert the file, or "
                f"enable resampling)"
            )
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=fe.sample_rate)
    n = fe.n_samples
    y = y[:n]
    if len(y) < n:
        y = np.pad(y, (0, n - len(y)))
    return np.ascontiguousarray(y, dtype=np.float32)


_FB_CACHE: dict = {}


def mel_filterbank(fe: FrontEnd, device: torch.device) -> Tensor:
    """HTK mel filterbank without normalisation, from librosa: (n_mels, n_fft // 2 + 1)."""
    key = (fe.sample_rate, fe.n_fft, fe.n_mels, fe.fmin, fe.fmax, str(device))
    if key not in _FB_CACHE:
        import librosa

        fb = librosa.filters.mel(
            sr=fe.sample_rate,
            n_fft=fe.n_fft,
            n_mels=fe.n_mels,
            fmin=fe.fmin,
            fmax=fe.fmax if fe.fmax is not None else fe.sample_rate / 2,
            htk=True,
            norm=None,
        )
        _FB_CACHE[key] = torch.from_numpy(fb).float().to(device)
    return _FB_CACHE[key]


def logmel(wave: Tensor, fe: FrontEnd) -> Tensor:
    """Batched log-mel: (B, samples) -> (B, n_mels, frames), min–max scaled per clip.

    Matches ``librosa.feature.melspectrogram(center=True, pad_mode=fe.pad_mode, power=2)`` with
    the same filterbank (see :func:`logmel_librosa`).
    """
    if wave.dim() == 1:
        wave = wave[None]
    window = torch.hann_window(fe.n_fft, periodic=True, device=wave.device, dtype=torch.float32)
    spec = torch.stft(
        wave.float(),
        fe.n_fft,
        fe.hop_length,
        window=window,
        center=True,
        pad_mode=fe.pad_mode,
        return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()  # (B, F, T)
    mel = torch.matmul(mel_filterbank(fe, wave.device), power)
    lm = torch.log(mel + fe.log_offset)
    lo = lm.amin(dim=(1, 2), keepdim=True)
    hi = lm.amax(dim=(1, 2), keepdim=True)
    return (lm - lo) / (hi - lo).clamp_min(1e-12)


def logmel_librosa(y: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """The same features computed directly by librosa (reference for tests)."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=y,
        sr=fe.sample_rate,
        n_fft=fe.n_fft,
        hop_length=fe.hop_length,
        n_mels=fe.n_mels,
        fmin=fe.fmin,
        fmax=fe.fmax if fe.fmax is not None else fe.sample_rate / 2,
        htk=True,
        norm=None,
        center=True,
        pad_mode=fe.pad_mode,
        power=2.0,
    )
    lm = np.log(mel + fe.log_offset)
    return (lm - lm.min()) / max(lm.max() - lm.min(), 1e-12)


def deltas(x: Tensor) -> Tensor:
    """Hu et al.'s delta along the last (time) axis: a 5-frame regression, trimming 2 frames
    each side: ``d[t] = (x[t+1] - x[t-1]) / 10 + (x[t+2] - x[t-2]) / 5``."""
    d1 = (x[..., 2:] - x[..., :-2]) / 10.0
    return d1[..., 1:-1] + (x[..., 4:] - x[..., :-4]) / 5.0


def stack_deltas(lm: Tensor) -> Tensor:
    """(B, 1 or n_mels.., T) log-mel -> (B, 3, n_mels, T - 8): [static, delta, delta-delta]."""
    if lm.dim() == 3:
        lm = lm[:, None]
    d = deltas(lm)
    dd = deltas(d)
    return torch.cat([lm[..., 4:-4], d[..., 2:-2], dd], dim=1)
