"""Logging as one JSON object per line, with stable keys: ts, level, logger, event, message, and context.

Also: the Kafka client's lines about conditions that are normal for a moment (a coordinator being elected or
moving) become one info line per episode, and come through as they are only if it lasts (`BenignKafkaFilter`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import msgspec
from aiokafka.errors import GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError

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
    # Its warnings and errors about a coordinator being elected or moving are normal for a moment: one info line.
    install_benign_filter()


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


# -- known-benign Kafka client conditions ---------------------------------------------------------------------------
#
# aiokafka logs some conditions as warnings and errors that are normal for a moment: a broker that starts creates
# __consumer_offsets on the first group request and elects the group's coordinator (the client logs
# "Group Coordinator Request failed: GroupCoordinatorNotAvailableError" and "Marking the coordinator dead" every
# retry, ~10 a second), a coordinator moves when its broker restarts, a topic just created has no leader yet. Each
# episode of such a condition is one info line; only if it lasts past the grace period do the client's own lines
# come through again, at their own level, at most once a minute per kind (with `suppressed`): by then it is trouble.

BENIGN_GRACE_SECONDS = 30.0  # a coordinator election or a group load takes a few seconds; 30 s of it is an outage
BENIGN_QUIET_SECONDS = 60.0  # an episode ends after this long without a line about it; the next one starts anew
BENIGN_LOG_EVERY = 60.0  # past the grace: one line a minute per kind of line, like the service's own ongoing trouble

COORDINATOR_WAITING = "kafka_coordinator_waiting"
TOPIC_LEADER_WAITING = "kafka_topic_leader_waiting"
BENIGN_MESSAGES = {
    COORDINATOR_WAITING: "waiting for the group coordinator (normal while a broker starts or a coordinator moves)",
    TOPIC_LEADER_WAITING: "waiting for a new topic's partition leaders (normal just after a topic is created)",
}

_COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"
_CLUSTER_LOGGER = "aiokafka.cluster"
BENIGN_LOGGERS = (_COORDINATOR_LOGGER, _CLUSTER_LOGGER)
# The lookup errors of an election or a move: not available (yet), moved elsewhere, still loading the group.
_COORDINATOR_MOVING = (GroupCoordinatorNotAvailableError, NotCoordinatorForGroupError, GroupLoadInProgressError)
# aiokafka's message templates (record.msg) of those lines; tests check each still appears in aiokafka's source.
COORDINATOR_LOOKUP_FAILED = "Group Coordinator Request failed: %s"
COORDINATOR_MARKED_DEAD = "Marking the coordinator dead"
COORDINATOR_HEARTBEAT_INVALID = "Heartbeat failed for group %s: coordinator (node %s)"
TOPIC_AUTO_CREATING = "Topic %s is not available during auto-create initialization"


def benign_condition(logger: str, msg: object, args: object) -> str | None:
    """The known-benign condition an aiokafka log line is about, or None: then it is logged as it is."""
    if not isinstance(msg, str):
        return None
    if logger == _COORDINATOR_LOGGER:
        if msg == COORDINATOR_LOOKUP_FAILED:
            error = args[0] if isinstance(args, tuple) and args else None
            return COORDINATOR_WAITING if isinstance(error, _COORDINATOR_MOVING) else None
        if msg.startswith((COORDINATOR_MARKED_DEAD, COORDINATOR_HEARTBEAT_INVALID)):
            return COORDINATOR_WAITING
    if logger == _CLUSTER_LOGGER and msg == TOPIC_AUTO_CREATING:
        return TOPIC_LEADER_WAITING
    return None


class Verdict(NamedTuple):
    action: str  # INFO: say the condition's info line instead; DROP: leave the line out; PASS: log it as it is
    suppressed: int = 0  # PASS: lines of this kind left out since the last one that passed
    lasting: float = 0.0  # seconds since the episode began


INFO, DROP, PASS = "info", "drop", "pass"


class BenignEpisodes:
    """Which lines about a known-benign condition are shown (pure: `now` from the clock or the caller).

    The first line of an episode becomes the condition's one info line; the next ones are left out while the
    episode is younger than `grace`; after that they pass, at most one per `every` seconds per kind (with how many
    were left out). An episode lasts while its lines keep coming: it ends after `quiet` seconds without one.
    """

    def __init__(self, grace: float = BENIGN_GRACE_SECONDS, quiet: float = BENIGN_QUIET_SECONDS,
                 every: float = BENIGN_LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.quiet = quiet
        self.every = every
        self._clock = clock
        self._episodes: dict[str, _Episode] = {}

    def judge(self, condition: str, kind: str, now: float | None = None) -> Verdict:
        now = self._clock() if now is None else now
        episode = self._episodes.get(condition)
        if episode is None or now - episode.last > self.quiet:
            self._episodes[condition] = _Episode(started=now, last=now)
            return Verdict(INFO)
        episode.last = now
        lasting = now - episode.started
        limiter = episode.limits.setdefault(kind, RateLimited(self.every, self._clock))
        if lasting < self.grace:
            limiter.suppressed += 1  # left out too: the first line past the grace counts it
            return Verdict(DROP, lasting=lasting)
        suppressed = limiter.take(now)
        return Verdict(DROP, lasting=lasting) if suppressed is None else Verdict(PASS, suppressed, lasting)


class _Episode:
    def __init__(self, started: float, last: float) -> None:
        self.started = started
        self.last = last
        self.limits: dict[str, RateLimited] = {}


class BenignKafkaFilter(logging.Filter):
    """On aiokafka's loggers (see `BENIGN_LOGGERS`): the glue between their records and `BenignEpisodes`.

    The info line goes out on the `stream.kafka` logger, so the configured level decides whether it shows (at the
    demo's WARNING it does not); a line that passes keeps its level and gains `condition`, `lasting_seconds` and
    `suppressed`. Every other record passes untouched.
    """

    def __init__(self, episodes: BenignEpisodes | None = None, out: logging.Logger | None = None) -> None:
        super().__init__()
        self.episodes = episodes or BenignEpisodes()
        self.out = out or logging.getLogger("stream.kafka")

    def filter(self, record: logging.LogRecord) -> bool:
        condition = benign_condition(record.name, record.msg, record.args)
        if condition is None:
            return True
        verdict = self.episodes.judge(condition, str(record.msg))
        if verdict.action == INFO:
            try:
                detail = record.getMessage()
            except Exception:  # arguments that do not fit the template: a filter must never raise into the client
                detail = str(record.msg)
            self.out.info(BENIGN_MESSAGES[condition],
                          extra={"event": condition, "detail": detail,
                                 "grace_seconds": self.episodes.grace})
            return False
        if verdict.action == PASS:
            record.condition = condition
            record.lasting_seconds = round(verdict.lasting, 1)
            record.suppressed = verdict.suppressed
            return True
        return False


def install_benign_filter(benign: BenignKafkaFilter | None = None) -> BenignKafkaFilter:
    """Put one `BenignKafkaFilter` on aiokafka's loggers, in place of any earlier one (configure may run twice)."""
    benign = benign or BenignKafkaFilter()
    for name in BENIGN_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, BenignKafkaFilter)]:
            logger.removeFilter(old)
        logger.addFilter(benign)
    return benign
