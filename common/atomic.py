"""Write-then-rename helpers, so an interrupted job never leaves a half-written file in place.

Every scratch name carries the pid of the process that owns it (``.<name>.tmp-<pid>-<random>``). A
process killed with SIGKILL cannot clean up after itself, so the next writer of the same output
removes the scratch of owners that are gone (``remove_stale``), and a living owner's is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from common.errors import ConfigError

_OWNER = re.compile(r"-(\d+)-")


def _prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's living process
        return True
    return True


def remove_stale(final: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Remove the scratch files and folders beside ``final`` whose owner process is gone."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for kind in kinds:
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            owner = _OWNER.search(path.name[len(f".{final.name}.{kind}"):])
            if owner is not None and pid_alive(int(owner.group(1))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def ensure_writable(folder: Path) -> None:
    """Fail before any work when ``folder`` cannot be created or written (one line, not a traceback
    after hours of work)."""
    blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"{blocked}: is a file, so {folder} cannot be a directory (choose another output directory)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ctr-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write here: {exc.strerror or exc} "
                          "(choose an output directory you can write to)") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, sync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, ("tmp",))
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files should read like any other
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def scratch_path(final: Path) -> Path:
    """A fresh, owned file name beside ``final`` (same file system, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=_prefix(final, "tmp"), dir=final.parent)
    os.close(fd)
    return Path(name)


def scratch_dir_beside(final: Path) -> Path:
    """A fresh directory next to ``final`` (same file system, so the final rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    path = Path(tempfile.mkdtemp(prefix=_prefix(final, "tmp"), dir=final.parent))
    path.chmod(0o755)  # mkdtemp creates 0700; the published directory should read like any other
    return path


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written directory into place; an existing one is replaced only after that succeeds."""
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=_prefix(final, "old"), dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
