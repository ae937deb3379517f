"""Logging as one JSON object per line, with stable keys: ts, level, logger, event, message, and context."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import msgspec

# Attributes every LogRecord has; anything else passed through `extra=` is context and gets logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "event":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Kafka client is chatty at INFO about routine group coordination; its warnings still show.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))


class RateLimited:
    """At most one log line per `period` (on a monotonic clock) for one ongoing condition; the next line
    that goes out reports how many were left out (`suppressed`), so a storm is visible without flooding."""

    def __init__(self, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._last = float("-inf")
        self.suppressed = 0

    def take(self, now: float | None = None) -> int | None:
        """None when this line must be left out, else how many lines were left out since the last one."""
        now = self._clock() if now is None else now
        if now - self._last < self.period:
            self.suppressed += 1
            return None
        self._last = now
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed
