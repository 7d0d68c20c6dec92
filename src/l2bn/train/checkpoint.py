"""Atomic checkpoints: write to a temporary file, fsync, rename — a crash never leaves a
half-written ``last.pt``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or belongs to another model; the message names the file."""


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an l2bn checkpoint (no 'model'/'config' entries)")
    return state


def load_model_state(model: torch.nn.Module, state: Dict[str, Any], path: Path) -> None:
    """Load ``state['model']`` strictly; a mismatch names the file and the offending keys."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise CheckpointError(f"{path}: checkpoint does not match the model ({' '.join(first)})") from e
