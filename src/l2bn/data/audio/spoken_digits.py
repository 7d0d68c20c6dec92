"""A synthetic spoken-digits set (offline demo): espeak-ng says "zero" .. "nine" with many
voices, pitches and speeds, mixed with white or pink-ish noise at a chosen SNR (default
0 dB ± 3 dB, so that accuracy is not at its ceiling), written as 16 kHz mono 1-second WAVs
plus ``labels.csv`` (the ``audio-folder`` layout).

Deterministic: clip ``i`` depends only on ``(seed, i)``. It is synthetic speech, not a public
corpus — good for exercising the pipeline and for a BN-vs-L2BN comparison, not for claims about
real acoustic scenes.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ...io import UsageError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = [
    "en",
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-us-nyc",
    "en+f2",
    "en+f3",
    "en+m3",
    "en+m7",
    "en-us+f4",
    "en-gb+m2",
    "en+klatt",
    "en-us+croak",
]
SR = 16000


class GeneratorError(UsageError, RuntimeError):
    pass


def _say(word: str, voice: str, pitch: int, speed: int, gap: int, tmp: Path) -> np.ndarray:
    import soundfile as sf

    wav = tmp / f"{abs(hash((word, voice, pitch, speed, gap)))}.wav"
    cmd = [
        "espeak-ng",
        "-v",
        voice,
        "-p",
        str(pitch),
        "-s",
        str(speed),
        "-g",
        str(gap),
        "-w",
        str(wav),
        word,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not wav.is_file():
        raise GeneratorError(f"espeak-ng failed for {cmd}: {r.stderr.strip()}")
    y, sr = sf.read(str(wav), dtype="float32")
    wav.unlink()
    if y.ndim > 1:
        y = y.mean(1)
    if sr != SR:
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=SR)
    return y


def _clip(i: int, seed: int, snr_db: float, tmp: Path) -> tuple:
    rng = np.random.default_rng([seed, i])
    label = i % 10
    voice = VOICES[rng.integers(len(VOICES))]
    y = _say(
        WORDS[label],
        voice,
        int(rng.integers(15, 86)),
        int(rng.integers(110, 230)),
        int(rng.integers(0, 8)),
        tmp,
    )
    y = y[np.abs(y) > 1e-4].copy() if np.any(np.abs(y) > 1e-4) else y
    y = y[:SR]
    out = np.zeros(SR, dtype=np.float32)
    start = int(rng.integers(0, SR - len(y) + 1))
    out[start : start + len(y)] = y * float(rng.uniform(0.3, 1.0))
    sig_p = float(np.mean(out[start : start + len(y)] ** 2)) + 1e-12
    snr = snr_db + float(rng.uniform(-3, 3))
    noise = rng.standard_normal(SR).astype(np.float32)
    if rng.random() < 0.5:  # pink-ish: integrate white noise a little
        noise = np.cumsum(noise) * 0.05 + noise
        noise -= noise.mean()
    noise *= np.sqrt(sig_p / (10 ** (snr / 10)) / (np.mean(noise**2) + 1e-12))
    return label, voice, np.clip(out + noise, -1, 1).astype(np.float32)


def generate(
    out_dir: str,
    clips: int = 3000,
    snr_db: float = 0.0,
    seed: int = 0,
    test_fraction: float = 0.2,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write ``clips`` WAVs and ``labels.csv`` (filename,label,split) into ``out_dir``.

    Every ``1/test_fraction``-th group of ten consecutive clips (one per digit) is test, so both
    splits hold every class; voices are drawn per clip, so they are shared, clips never.
    """
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise GeneratorError(
            "espeak-ng not found: install it (Debian/Ubuntu: sudo apt-get install espeak-ng)"
        )
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=clips, desc="spoken-digits (espeak-ng)", file=sys.stderr, leave=False)
        except ImportError:
            pass
    every = max(2, int(round(1 / test_fraction)))
    with tempfile.TemporaryDirectory() as td, ThreadPoolExecutor(workers) as pool:
        for i, (label, _voice, y) in enumerate(
            pool.map(lambda k: _clip(k, seed, snr_db, Path(td)), range(clips))
        ):
            name = f"audio/{i:05d}-{WORDS[label]}.wav"
            sf.write(str(out / name), y, SR, subtype="PCM_16")
            # clip i has label i % 10: take whole groups of ten so every class is in both splits
            rows.append((name, WORDS[label], "test" if (i // 10) % every == every - 1 else "train"))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    tmp = out / "labels.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "split"])
        w.writerows(rows)
    tmp.replace(out / "labels.csv")  # written last: its presence marks a complete set
    return out


def default_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2bn" / "spoken-digits"


def ensure(data_dir: Optional[str], clips: int = 3000) -> Path:
    d = Path(data_dir) if data_dir else default_dir()
    if not (d / "labels.csv").is_file():
        print(
            f"generating the synthetic spoken-digits set ({clips} clips) in {d} ...",
            file=sys.stderr,
            flush=True,
        )
        generate(str(d), clips=clips)
    return d
