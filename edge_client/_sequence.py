"""Telemetry sequence numbers that keep increasing across restarts."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

STATE_VERSION = 1


class SequenceCounter:
    """Hands out ``seq`` values: +1 per report, and never back across restarts.

    A new counter starts above both the last value saved in ``path`` (when
    given) and the current wall-clock time in milliseconds. The clock alone
    keeps a restarted agent increasing as long as it sent fewer than 1000
    reports a second and its clock did not step back; the state file covers
    the rest. Writes replace the file atomically but are not fsynced, so a
    power cut may lose the last few values: the clock floor still holds.
    """

    def __init__(self, path: Path | None, logger: logging.Logger) -> None:
        self.path = path
        self._log = logger
        self._warned = False
        floor = time.time_ns() // 1_000_000 - 1
        self._last = max(self._load(), floor)

    @property
    def last(self) -> int:
        """The last value handed out (or the starting floor)."""
        return self._last

    def peek(self) -> int:
        """The next value, without using it."""
        return self._last + 1

    def commit(self, seq: int) -> None:
        """Record that ``seq`` was used, and save it when there is a state file."""
        self._last = seq
        if self.path is not None:
            self._save(self.path, seq)

    def _load(self) -> int:
        if self.path is None or not self.path.exists():
            return -1
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            return int(state["seq"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._log.warning(
                "state file %s unreadable (%s); seq restarts from the clock",
                self.path,
                error,
            )
            return -1

    def _save(self, path: Path, seq: int) -> None:
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(json.dumps({"v": STATE_VERSION, "seq": seq}))
            os.replace(partial, path)
        except OSError as error:
            if not self._warned:
                self._log.warning(
                    "cannot save seq to %s (%s); continuing without it", path, error
                )
                self._warned = True
