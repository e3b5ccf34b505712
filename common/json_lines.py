"""JSON-lines logs (training metrics, compression reports): append one record, read them all back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every record of ``path`` in order; an absent file has none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
