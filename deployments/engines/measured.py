"""Choices made by measurement on this machine (a precision, an engine), kept beside the model
cache so later starts read them instead of measuring again: one JSON file of entries by key,
written whole under a file lock and replaced atomically, so concurrent replicas never lose or
tear one another's entries."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from filelock import FileLock


class MeasuredChoices:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, key: str) -> dict[str, Any] | None:
        """The entry stored under `key`; None when there is none or the file is unreadable."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            entry = json.loads(self.path.read_text())[key]
            return entry if isinstance(entry, dict) else None
        return None

    def write(self, key: str, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            entries = {}
            with contextlib.suppress(OSError, ValueError):
                entries = json.loads(self.path.read_text())
            entries[key] = entry
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            tmp.replace(self.path)
