"""One run per output dir: a second run started on the same output_dir (a double launch, a
scheduler retry while the first still runs) is refused at once instead of overwriting the
first one's checkpoints.

The lock is `fcntl.flock` on `<output_dir>/.sftforge.lock`, which the kernel releases when
the holding process ends, however it ends (SIGKILL, OOM kill), so a dead run never leaves
the output dir locked. The file also says who holds it (pid, host, start time, command), for
the message the second run gets; the file itself stays, empty, after a release: deleting it
would let a third run lock a new file while the second still holds the old one.

Limits: on most network file systems (NFS, Lustre, GPFS, depending on their mount options)
flock is per host: two runs on different hosts may both take it. Forked children (a
DataLoader worker with the fork start method) share the lock and keep it until they end too.
In a multi-process (torchrun) run only rank 0 takes it; the caller decides which rank.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from datetime import datetime
from pathlib import Path

from sftforge.errors import InputError

LOCK_NAME = ".sftforge.lock"


class RunLockedError(InputError):
    pass


class OutputDirLock:
    """Held from `lock_output_dir` until `release()` or the end of the process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # no stale holder shown to whoever looks next
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(output_dir: Path) -> OutputDirLock:
    """Take the output dir's lock (creating the dir), or raise RunLockedError at once,
    naming the run that holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.pread(fd, 1 << 16, 0))
        os.close(fd)
        raise RunLockedError(
            f"output_dir {output_dir} is in use by another run ({holder}); wait for it to "
            "end or choose another output_dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
    return OutputDirLock(path, fd)


def _holder(recorded: bytes) -> str:
    try:
        h = json.loads(recorded)
        return (
            f"pid {h['pid']} on host {h['host']}, started {h['started']}, command: {h['command']}"
        )
    except (ValueError, TypeError, KeyError):  # taken a moment ago, not yet written
        return f"holder not recorded in {LOCK_NAME} yet"
