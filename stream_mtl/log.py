"""Structured logging: ``event key=value …`` lines over the standard library.

Log events are short dotted names with fields; payloads of bad records are never logged
(they go to the dead-letter topic).

>>> import logging, io
>>> buf = io.StringIO(); h = logging.StreamHandler(buf)
>>> lg = get_logger("doc"); lg.logger.addHandler(h); lg.logger.setLevel(logging.INFO)
>>> lg.info("dlq.sent", count=2, stage="ingest")
>>> buf.getvalue().strip()
'dlq.sent count=2 stage=ingest'
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["StructLogger", "get_logger"]


def _fmt(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        if " " in text or "=" in text:
            text = repr(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class StructLogger:
    """A thin wrapper giving ``log.info("event", key=value)`` over a stdlib logger."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, _fmt(event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str) -> StructLogger:
    """A structured logger named ``name``."""
    return StructLogger(logging.getLogger(name))
