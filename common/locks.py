"""One writer per output: an advisory lock beside it, taken without waiting.

Two jobs writing the same output at once would both succeed and the last would silently win. The
lock is ``flock`` on ``.<name>.lock`` beside the output, so the kernel releases it when its holder
dies, even by SIGKILL; the file holds the holder's pid, for the message. The holder removes the
file when it is done; one left by a killed holder is taken over (and then removed) by the next.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import ConfigError


def _take(path: Path, final: Path, job: str) -> int:
    """An open, locked descriptor of the lock file that is at ``path`` now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{final}: another {job} (pid {holder}) is writing it right now "
                              f"(wait for it to finish, or write to another output)") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file after we opened it: take the new one


@contextmanager
def exclusive(final: Path, job: str) -> Iterator[None]:
    """Hold the lock of ``final`` for ``job``; fails at once, naming the holder's pid, if another has it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    fd = _take(path, final, job)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a newcomer then opens a fresh file
        os.close(fd)
