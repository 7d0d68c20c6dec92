"""Extract log-mel features for a list of files once and cache them on disk.

The cache file name is a hash of the front-end parameters and of every file's path, size and
modification time, so changing a parameter or a file invalidates it. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from torch import Tensor

from .features import FrontEnd, load_audio, logmel


def cache_key(files: Sequence[Path], fe: FrontEnd) -> str:
    h = hashlib.sha1(json.dumps(fe.key(), sort_keys=True).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def extract(
    files: Sequence[Path],
    fe: FrontEnd,
    cache_dir: Path,
    batch: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> Tensor:
    """(N, 1, n_mels, frames) log-mel of ``files`` in ``fe.cache_dtype`` (float32 by default:
    float16
    would quantize the delta-deltas), from the cache when it is valid."""
    from ...io import atomic_write_bytes

    files = [Path(f) for f in files]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"logmel-{cache_key(files, fe)}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, weights_only=True)
            if feats.shape[0] == len(files):
                return feats
        except Exception:
            pass  # corrupt cache: recompute
    out: List[Tensor] = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(files),
                desc=f"log-mel features -> {path.name}",
                file=sys.stderr,
                leave=False,
                disable=None,
            )  # a bar on a terminal only
        except ImportError:
            pass
    dev = torch.device(device)
    for i in range(0, len(files), batch):
        waves = np.stack([load_audio(f, fe) for f in files[i : i + batch]])
        out.append(
            logmel(torch.from_numpy(waves).to(dev), fe)[:, None]
            .to(getattr(torch, fe.cache_dtype))
            .cpu()
        )
        if bar is not None:
            bar.update(len(waves))
    if bar is not None:
        bar.close()
    feats = (
        torch.cat(out)
        if out
        else torch.empty(0, 1, fe.n_mels, fe.n_frames, dtype=getattr(torch, fe.cache_dtype))
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: torch.save(feats, f))
    return feats
