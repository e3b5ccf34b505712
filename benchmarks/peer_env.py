"""The peer's own virtual environment, made on first use: FuxiCTR pins polars<2 and pulls ray[data],
which must not reach the project's environment, so it lives in benchmarks/_work/fuxictr-venv."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from _common import WORK

REQUIREMENTS = Path(__file__).parent / "requirements-fuxictr.txt"
VENV = WORK / "fuxictr-venv"


def peer_python() -> Path:
    """The peer venv's interpreter, (re)installed when the pinned requirements changed."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    print(f"making the FuxiCTR venv in {VENV} (about a minute) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([str(python), "-c", "import fuxictr, torch; assert torch.version.cuda is None"], check=True)
    stamp.write_text(wanted)
    return python
