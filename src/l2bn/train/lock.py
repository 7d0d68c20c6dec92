"""One writer per run directory.

Training writes ``last.pt``, ``metrics.jsonl`` and ``result.json`` into its run directory; two
processes training the same directory (two ``l2bn compare`` calls whose grids overlap, a
``l2bn train --resume`` started while a sweep trains that run) would interleave epochs and
overwrite each other's checkpoints. :func:`run_lock` makes the directory's owner explicit: it
creates ``OUT/.lock`` atomically (``O_EXCL``) with the owner's pid, host and start time, and
removes it when the work ends. A lock left by a process that no longer exists (killed with
SIGKILL, a machine reboot) on this host is taken over with a warning; a lock from another host
cannot be checked and is reported with the command that clears it.

The lock is re-entrant within a process (``compare`` holds it while it checks a run's state and
trains it; training takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

__all__ = ["RunDirBusy", "run_lock", "lock_owner", "LOCK_NAME"]

LOCK_NAME = ".lock"
_held: Set[str] = set()  # run directories this process holds (re-entrancy)


class RunDirBusy(RuntimeError):
    """Another live process is training this run directory."""

    def __init__(self, out: Path, owner: Dict[str, Any]):
        self.out, self.owner = out, owner
        since = owner.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        super().__init__(f"{out} is being trained by another process (pid {owner.get('pid')} on {owner.get('host')}, "
                         f"since {when}): wait for it to finish, or stop it first. If that process no longer exists, "
                         f"delete {out / LOCK_NAME}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def lock_owner(out: str | os.PathLike[str]) -> Optional[Dict[str, Any]]:
    """The live owner of ``out``'s lock (pid, host, started), or None when the directory is free
    (no lock, or a stale one left by a dead process on this host)."""
    path = Path(out) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
        if not isinstance(owner, dict):
            raise ValueError
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"pid": None, "host": "?", "started": None, "unreadable": True}
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
        return None
    return owner


@contextmanager
def run_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``out``'s lock for the duration of the block (creating ``out`` if needed).

    Raises:
        RunDirBusy: a live process (this host), or a process on another host, holds it.
    """
    out = Path(out)
    key = str(out.resolve())
    if key in _held:  # nested: this process already owns the directory
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock_owner(out)
            if owner is not None or attempt:
                raise RunDirBusy(out, owner or {}) from None
            warnings.warn(f"{path}: removing the lock of a process that no longer exists (pid "
                          f"{_read_pid(path)}); its run is resumed from its last checkpoint", stacklevel=3)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
            if created and not any(out.iterdir()):  # the work failed before writing anything
                out.rmdir()
        except (OSError, ValueError, AttributeError):
            pass


def _read_pid(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
