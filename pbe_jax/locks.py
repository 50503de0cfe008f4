"""One writer per folder: an advisory lock that a training workdir, a `sample` / `evaluate`
`--out` folder and a `convert --dst` take for the whole run.

The lock is the file `DIR/.pbe_jax.lock`, holding who took it (pid, host, process start time, the
command, when). On a local file system it is also held with `fcntl.flock` on that file for as
long as the run lives, so the kernel frees it when the process dies however it dies (SIGKILL
included): a lock left behind by a dead process is stale by construction and is taken over, with
a log line naming the old holder. On a file system without `flock` (``gs://`` and other object
stores through `etils.epath`) the file's contents decide: a holder on this host whose pid is gone
(or was reused by another process: the start time differs) is stale and taken over; a holder on
another host cannot be checked from here, so the run refuses and says how to take the lock over
(`reclaim=True`, the command lines' `--reclaim_lock`) once that host is known to be gone.

Multi-process runs take the lock on process 0 only (`enabled=jax.process_index() == 0`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from etils import epath

log = logging.getLogger("pbe_jax")

LOCK_NAME = ".pbe_jax.lock"


class LockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid reused by
    another process from the holder; None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _proc_start(pid)
    return start is None or now is None or now == start


def holder_info(what: str) -> dict[str, Any]:
    """What this process writes into a lock it takes."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _proc_start(pid),
            "what": what, "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} "
            f"({info.get('command') or info.get('what')})")


def read_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Who the lock file in `directory` names (None: no lock file, or unreadable)."""
    try:
        return json.loads((epath.Path(directory) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class FolderLock:
    """The lock on one folder; `release()` (or leaving `hold`) gives it back."""

    def __init__(self, directory: str | os.PathLike, what: str, *, reclaim: bool = False):
        self.directory = epath.Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.reclaim = reclaim
        self._fd: int | None = None
        self.held = False

    def _refuse(self, info: dict[str, Any] | None, why: str = "") -> LockedError:
        return LockedError(
            f"{self.what} {self.directory} is in use by {describe(info)}{why}. One run writes a "
            f"folder at a time: wait for that run to finish, stop it, or choose another folder. "
            f"If that process is gone (e.g. its host died), take the lock over with "
            f"--reclaim_lock=true or delete {self.path}.")

    def acquire(self) -> "FolderLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        if _is_local(self.path):
            self._acquire_flock()
        else:
            self._acquire_by_contents()
        self.held = True
        return self

    def _acquire_flock(self) -> None:
        import fcntl  # POSIX only; the object-store path above needs none

        path = os.fspath(self.path)
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if self.reclaim:
                    raise self._refuse(read_holder(self.directory),
                                       " and is alive on this host (--reclaim_lock cannot take a "
                                       "lock its live holder keeps)") from None
                raise self._refuse(read_holder(self.directory)) from None
            # The holder before us may have unlinked the file between our open and our flock:
            # then we hold a lock on a file nobody else sees; start again on the current one.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = read_holder(self.directory)
            if old and old.get("pid") != os.getpid():
                log.warning("%s %s: taking over the lock left by %s (that process is gone)",
                            self.what, self.directory, describe(old))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder_info(self.what)).encode())
            self._fd = fd
            return
        raise LockedError(f"{self.what} {self.directory}: could not take {self.path} "
                          "(it kept being replaced)")

    def _acquire_by_contents(self) -> None:
        old = read_holder(self.directory) if self.path.exists() else None
        if old is not None or self.path.exists():
            stale = (old is not None and old.get("host") == socket.gethostname()
                     and not _pid_alive(int(old.get("pid", -1)), old.get("start")))
            if not (stale or self.reclaim):
                raise self._refuse(old)
            log.warning("%s %s: taking over the lock left by %s (%s)", self.what, self.directory,
                        describe(old), "that process is gone" if stale else "--reclaim_lock")
        mine = holder_info(self.what)
        self.path.write_text(json.dumps(mine))
        if read_holder(self.directory) != mine:  # another run wrote it at the same moment
            raise self._refuse(read_holder(self.directory))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if (read_holder(self.directory) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        if self._fd is not None:
            os.close(self._fd)  # frees the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(directory: str | os.PathLike, what: str, *, enabled: bool = True,
         reclaim: bool = False) -> Iterator[FolderLock | None]:
    """Hold `directory`'s lock for the block; raise `LockedError` naming the holder if another
    live run has it. `what` names the folder in messages (e.g. '--workdir', '--out').
    `enabled=False` (processes other than 0 of a multi-process run) takes nothing."""
    if not enabled:
        yield None
        return
    lock = FolderLock(directory, what, reclaim=reclaim).acquire()
    try:
        yield lock
    finally:
        lock.release()
