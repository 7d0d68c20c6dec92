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
itself stays (an unlocked ``.lock`` means a free directory). On Linux, ``flock`` on NFS (mounted
with locking, the default) is forwarded to the server's byte-range locks, so processes on
different machines sharing a file system exclude each other too. Where a file system refuses
``flock`` (e.g. Lustre without ``-o flock``), or on a platform without ``fcntl`` (Windows), the
work runs unlocked after a warning.

The lock is re-entrant within a process (``compare`` holds it while it checks a run's state and
trains it; training takes it again).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from ..io import UsageError
from .config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDirBusy", "run_lock", "lock_owner", "LOCK_NAME"]

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
# this process's locks: directory identity (st_dev, st_ino) -> (owner record, locked descriptor)
_held: Dict[Tuple[int, int], Tuple[Dict[str, Any], int]] = {}


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's locked file description; closing
    its copy (never unlocking it: that would unlock the parent's) lets the lock go with the
    parent, instead of outliving a killed parent for as long as its workers linger."""
    for _, fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class RunDirBusy(UsageError, RuntimeError):
    """Another process holds this run directory's lock."""

    def __init__(self, out: Path, owner: Dict[str, Any]):
        self.out, self.owner = out, owner
        since = owner.get("started")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            if isinstance(since, (int, float))
            else "?"
        )
        super().__init__(
            f"{out} is being trained by another process (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {when}): wait for it to finish, or stop that process"
        )


def _key(out: Path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(out)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_owner(path: Path) -> Dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _flock(fd: int, wait: bool) -> Optional[bool]:
    """True: locked; False: another holder; None: this file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    return True


def lock_owner(out: str | os.PathLike[str]) -> Optional[Dict[str, Any]]:
    """Who holds ``out``'s lock (``pid``, ``host``, ``started``; empty if the owner has not
    written them yet), or None when the directory is free."""
    out = Path(out)
    key = _key(out)
    if key in _held:
        return dict(_held[key][0])  # type: ignore[index]
    path = out / LOCK_NAME
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        got = _flock(fd, wait=False)
        if got is None:
            return None
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    return _read_owner(path)


def _acquire(out: Path, path: Path, wait: bool) -> Optional[int]:
    """The locked fd of ``path`` (the file that is ``path`` now, not one unlinked meanwhile), or
    None where locking is unavailable."""
    deadline = time.monotonic() + 0.5  # ride over another process's brief lock_owner() probe
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got = _flock(fd, wait)
            if got is None:
                os.close(fd)
                warnings.warn(
                    f"{path}: this file system does not support flock; {out} is not protected "
                    f"against a second process training it",
                    stacklevel=4,
                )
                return None
            if got:
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
                os.close(
                    fd
                )  # locked a lock file its owner removed (with its empty directory): again
                out.mkdir(parents=True, exist_ok=True)
                continue
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() > deadline:
            raise RunDirBusy(out, _read_owner(path))
        time.sleep(0.05)


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
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(
            f"no fcntl on this platform: {out} is not protected against a second process training "
            f"it",
            stacklevel=3,
        )
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = _acquire(out, path, wait)
    if fd is None:
        yield
        return
    key = _key(out)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    _held[key] = (me, fd)  # type: ignore[index]
    try:
        try:  # the record only serves messages: a full disk must not fail the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError:
            pass
        yield
    finally:
        _held.pop(key, None)  # type: ignore[arg-type]
        try:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
                # the work failed before writing anything: leave no empty run directory behind
                path.unlink()
                out.rmdir()
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, an ``out`` that is a file or cannot be created/written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out}: is a file; expected a run directory (new, or holding a run)"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(parent) else "no write permission"
        raise ConfigError(f"--out {out}: cannot write there ({why} at {parent})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
