"""One writer per run folder: an exclusive advisory lock on ``<out_dir>/.lock``.

The trainer (rank 0) takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file before it reads
or writes anything in the folder and holds it for the run's life. The kernel releases a flock
when its process exits or is killed, so a stale lock file of a dead process never blocks: the
file stays, the lock does not. The holder writes its pid into the file so that a second
trainer can say who holds the folder. (flock is advisory, per open file description, and
works on local filesystems; on NFS it is emulated with fcntl locks by Linux.)
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import LostLMError

LOCK_FILE = ".lock"


class RunInUse(LostLMError):
    """The run folder is locked by another live trainer."""


def prepare_run_dir(path: Path) -> Path:
    """Create the run folder (one-line errors for a file in the way or no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LostLMError(f"train.out_dir={path} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LostLMError(f"train.out_dir={path} cannot be created ({exc.strerror or exc}); "
                          "pass a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LostLMError(f"train.out_dir={path} is not writable; pass a folder you can write to")
    return path


class RunLock:
    """Context manager / explicit acquire+release around the exclusive lock of a run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        prepare_run_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LostLMError(f"cannot open the lock file {self.path} ({exc.strerror or exc}); "
                              "pass a train.out_dir you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUse(f"train.out_dir={self.path.parent} is in use by another trainer (pid {holder}); "
                                  "wait for it to finish or stop it, or use another train.out_dir") from None
            raise LostLMError(f"cannot lock {self.path} ({exc.strerror or exc})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
