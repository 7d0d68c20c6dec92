"""Checkpoints: atomic writes, safe reads, and the resume layout.

A checkpoint holds only tensors, dicts, lists, numbers, strings and ``None`` (model, optimizer,
scheduler and scaler state, epoch counters, history, the config, the CPU RNG state as a uint8
tensor). It is read with ``torch.load(weights_only=True)``: a file that needs unpickling of any
other Python object — the way a crafted file runs code — is refused, never executed. Everything
is loaded on the CPU (state dicts are copied to the model's device by ``load_state_dict``; the
RNG state must stay a CPU tensor).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..io import UsageError, atomic_write_bytes

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_state"]


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or of another model; the message names the file."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (temp file, fsync, rename).

    Raises:
        CheckpointError: the file could not be written (a full disk, a read-only or vanished
            directory); the previous checkpoint at ``path``, if any, is intact.
    """
    try:
        atomic_write_bytes(Path(path), lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        if (
            isinstance(e, RuntimeError)
            and "inline_container" not in str(e)
            and "write" not in str(e).lower()
        ):
            raise
        reason = (
            e.strerror
            if isinstance(e, OSError) and e.strerror
            else "the write failed; is the disk full?"
        )
        kept = (
            f"the previous {path.name} is intact"
            if Path(path).is_file()
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"could not write {path} ({reason}); {kept} (checkpoints are written atomically). "
            "Free space and continue with --resume."
        ) from e


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read an l2bn checkpoint safely (``weights_only=True``, on the CPU).

    Raises:
        CheckpointError: missing, truncated/corrupt, not an l2bn checkpoint, or containing
            Python objects whose unpickling could run code (refused, not loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        unsafe = next(
            (ln for ln in lines if "GLOBAL" in ln or "global" in ln.split(":")[0].lower()), None
        )
        if unsafe is not None:
            raise CheckpointError(
                f"{path}: refused — the file contains Python objects that only unsafe unpickling "
                f"could load "
                f"(it could run code); l2bn checkpoints hold only tensors, numbers, strings, "
                f"lists and dicts "
                f"({unsafe[:160]})"
            ) from None
        why = next(
            (ln for ln in lines if ln.startswith(("Unsupported", "Could not", "invalid"))),
            lines[-1] if lines else "",
        )
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({why[:200]})") from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an l2bn checkpoint (no 'model'/'config' entries)")
    return state


def _first(names: Any, k: int = 3) -> str:
    names = list(names)
    more = f", … (+{len(names) - k})" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def load_model_state(
    model: torch.nn.Module, state: Dict[str, Any], path: Path, want: Optional[Dict[str, Any]] = None
) -> None:
    """Load ``state['model']`` strictly. A mismatch raises one short :class:`CheckpointError`:
    the model/norm the checkpoint was saved for, the one asked for (``want``), and counts of
    missing/unexpected/mis-shaped keys with the first few names."""
    sd = state["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [
        k
        for k in own
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape:
        cfg = state.get("config", {})
        saved = f"model {cfg.get('model')!r} norm {cfg.get('norm')!r}"
        asked = (
            f"; this run asks for model {want.get('model')!r} norm {want.get('norm')!r}"
            if want
            else ""
        )
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if shape:
            parts.append(f"{len(shape)} keys of another shape ({_first(shape)})")
        raise CheckpointError(
            f"{path}: checkpoint (saved for {saved}{asked}) does not fit the model: "
            f"{'; '.join(parts)}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: checkpoint does not fit the model ({str(e).splitlines()[0][:200]})"
        ) from None
