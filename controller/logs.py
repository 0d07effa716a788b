"""Logging for the daemon: structlog, configured once, here and nowhere else.

On a terminal the output is readable key=value lines with colours; anywhere
else (systemd, containers, files) it is one JSON object per line. Libraries in
this project never configure logging; they take a logger or use their module's.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

# Payload excerpts in logs are cut to this many characters: enough to see what
# went wrong, never a whole message (which may be large or sensitive).
EXCERPT_CHARS = 120


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Send structlog output to ``stream`` (stderr) as JSON or console lines."""
    output = stream or sys.stderr
    as_json = not output.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=output.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    # Route the standard library's records (paho, sqlite helpers) to the same
    # stream at warning and above, so nothing is lost and nothing is noisy.
    logging.basicConfig(stream=output, level=logging.WARNING, force=True)


def excerpt(payload: bytes | str) -> str:
    """The first characters of a payload, safe to put in a log line."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    if len(text) <= EXCERPT_CHARS:
        return text
    return text[:EXCERPT_CHARS] + f"...(+{len(text) - EXCERPT_CHARS} chars)"
