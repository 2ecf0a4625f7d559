"""One writer per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock``.

``mixq train`` (new or ``--resume``) holds the lock for the whole run. A second process on
the same folder is refused at once, with the holder's pid, host and start time (read from the
lock file). The kernel releases a ``flock`` when its holder dies, however it dies, so a lock
left by a crashed run is simply taken over: there is no stale-lock guesswork from pids. The
file is never deleted (deleting it would let two processes lock two different inodes); it is
emptied on release.

Note: ``flock`` is per host on most network file systems; two hosts writing one shared run
folder are not detected there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run folder is held by another live process."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no holder recorded)"
    start = holder.get("start")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if start else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """Context manager: ``with RunLock(run_dir): ...`` holds ``run_dir/.lock`` exclusively.

    Raises:
        RunLockedError: another live process holds it (the message names it).
        OSError: the folder cannot be created or written (a file, read-only, ...).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict[str, Any] = {}  # the holder recorded by a crashed run, if any

    def acquire(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, "the run directory is an existing file; choose another --run-dir",
                str(self.run_dir),
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run directory {str(self.run_dir)!r} is in use by {_describe(holder)}: "
                "one process writes a run folder at a time; wait for it to finish (or stop "
                "it), or choose another --run-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Locked. Whatever the file holds was written by a holder that has died (the kernel
        # released its lock): take over, recording ourselves.
        self.previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # read-only or full: the lock goes with the fd anyway
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
