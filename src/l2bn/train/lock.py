"""One writer per run directory.

Training writes ``last.pt``, ``metrics.jsonl`` and ``result.json`` into its run directory; two
processes training the same directory (two ``l2bn compare`` calls whose grids overlap, a
``l2bn train --resume`` started while a sweep trains that run) would interleave epochs and
overwrite each other's checkpoints. :func:`run_lock` makes the directory's owner explicit: it
holds an exclusive ``flock`` on ``OUT/.lock`` for the duration of the work and writes the owner's
pid, host and start time into that file for the message another process gets.

The operating system releases the lock when its process ends, however it ends (SIGKILL, a crash,
a reboot), so there are no stale locks to detect and no pids to trust: a reused pid or a
container's pid namespace cannot make a dead owner look alive or a live one look dead. The file
itself stays (an unlocked ``.lock`` means a free directory). On Linux, ``flock`` on NFS is
forwarded to the server's byte-range locks, so processes on different machines sharing a file
system exclude each other as well.

The lock is re-entrant within a process (``compare`` holds it while it checks a run's state and
trains it; training takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

try:  # POSIX
    import fcntl

    def _try_lock(fd: int, wait: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows (not exercised by this project's CI)
    import msvcrt

    def _try_lock(fd: int, wait: bool) -> bool:
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(0.5)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


__all__ = ["RunDirBusy", "run_lock", "lock_owner", "LOCK_NAME"]

LOCK_NAME = ".lock"
_held: Dict[str, Dict[str, Any]] = {}  # run directory -> this process's owner record (re-entrancy)


class RunDirBusy(RuntimeError):
    """Another process holds this run directory's lock."""

    def __init__(self, out: Path, owner: Dict[str, Any]):
        self.out, self.owner = out, owner
        since = owner.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        super().__init__(f"{out} is being trained by another process (pid {owner.get('pid', '?')} on "
                         f"{owner.get('host', '?')}, since {when}): wait for it to finish, or stop that process")


def _key(out: Path) -> str:
    return str(out.resolve())


def _read_owner(path: Path) -> Dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def lock_owner(out: str | os.PathLike[str]) -> Optional[Dict[str, Any]]:
    """Who holds ``out``'s lock (``pid``, ``host``, ``started``; empty if the owner has not
    written them yet), or None when the directory is free."""
    out = Path(out)
    if _key(out) in _held:
        return dict(_held[_key(out)])
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd, wait=False):
            _unlock(fd)
            return None
    finally:
        os.close(fd)
    return _read_owner(path)


@contextmanager
def run_lock(out: str | os.PathLike[str], wait: bool = False) -> Iterator[None]:
    """Hold ``out``'s lock for the duration of the block (creating ``out`` if needed).

    Args:
        wait: block until the lock is free instead of raising.

    Raises:
        RunDirBusy: another process holds it (and ``wait`` is False).
    """
    out = Path(out)
    if _key(out) in _held:  # nested: this process already owns the directory
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd, wait):
            raise RunDirBusy(out, _read_owner(path))
    except BaseException:
        os.close(fd)
        raise
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    key = _key(out)
    _held[key] = me
    try:
        yield
    finally:
        del _held[key]
        try:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
                # the work failed before writing anything: leave no empty run directory behind
                path.unlink()
                out.rmdir()
        except OSError:
            pass
        _unlock(fd)
        os.close(fd)
