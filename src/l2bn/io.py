"""Atomic file writes and JSON reading — the bottom floor every layer of l2bn may use.

A write goes to a temporary file next to its target, is fsynced, then renamed over the target,
so a crash or a kill never leaves a half-written ``last.pt``, ``result.json`` or cache file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

__all__ = [
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "JSONFileError",
    "UsageError",
    "BadInput",
    "MissingFile",
    "MissingDependency",
]

PathLike = Union[str, "os.PathLike[str]"]


class UsageError(Exception):
    """Base of the errors l2bn raises on purpose for bad input (a flag, a file, a recipe, a
    missing dataset or extra): the command line prints their message as one line and exits 2.
    Anything else is a bug and keeps its traceback."""


class BadInput(UsageError, ValueError):
    """A value the user gave is not one l2bn can use; the message says what was expected."""


class MissingFile(UsageError, FileNotFoundError):
    """A file the user named does not exist; the message says what was expected there."""


class MissingDependency(UsageError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class JSONFileError(UsageError, ValueError):
    """A JSON file is missing, unreadable or not valid JSON; the message names the file."""


def atomic_write_bytes(path: PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, rename it over ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
        >>> atomic_write_bytes(p, lambda f: f.write(b"ok"))
        >>> p.read_bytes()
        b'ok'
    """
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


def write_json(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically (non-JSON values are written with ``str``)."""
    atomic_write_bytes(
        Path(path), lambda f: f.write(json.dumps(obj, indent=1, default=str).encode())
    )


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or corrupt file raises :class:`JSONFileError` naming it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> write_json({"a": 1}, p); read_json(p)
        {'a': 1}
    """
    p = Path(path)
    if not p.is_file():
        raise JSONFileError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JSONFileError(f"{p}: corrupt {what} ({type(e).__name__}: {e})") from e
