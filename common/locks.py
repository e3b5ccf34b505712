"""One writer per output: an advisory lock beside it, taken without waiting.

Two jobs writing the same output at once would both succeed and the last would silently win. The
lock is ``flock`` on ``.<name>.lock`` beside the output, so the kernel releases it when its holder
dies, even by SIGKILL; the file itself holds the holder's pid, for the message, and is left in place
(removing it could let two writers lock two different files).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import ConfigError


@contextmanager
def exclusive(final: Path, job: str) -> Iterator[None]:
    """Hold the lock of ``final`` for ``job``; fails at once, naming the holder's pid, if another has it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{final}: another {job} (pid {holder}) is writing it right now "
                              f"(wait for it to finish, or write to another output)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
