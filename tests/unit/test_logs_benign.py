"""aiokafka's lines about a coordinator being elected or moving: one info line per episode, loud again if it lasts."""

from __future__ import annotations

import inspect
import json
import logging

import aiokafka.cluster
import aiokafka.consumer.group_coordinator
import pytest
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    KafkaConnectionError,
    NodeNotReadyError,
    NotCoordinatorForGroupError,
)

from stream import logs
from stream.logs import (
    COORDINATOR_WAITING,
    DROP,
    INFO,
    PASS,
    TOPIC_LEADER_WAITING,
    BenignEpisodes,
    BenignKafkaFilter,
    JsonFormatter,
    benign_condition,
    install_benign_filter,
)

COORDINATOR = "aiokafka.consumer.group_coordinator"
CLUSTER = "aiokafka.cluster"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- which lines are about a known-benign condition ---------------------------------------------------------------


@pytest.mark.parametrize("error", [GroupCoordinatorNotAvailableError(), NotCoordinatorForGroupError(),
                                   GroupLoadInProgressError()])
def test_a_coordinator_lookup_refused_while_it_is_elected_moved_or_loading_is_benign(error):
    assert benign_condition(COORDINATOR, logs.COORDINATOR_LOOKUP_FAILED, (error,)) == COORDINATOR_WAITING


@pytest.mark.parametrize("error", [KafkaConnectionError(), NodeNotReadyError(), RuntimeError("boom")])
def test_a_coordinator_lookup_that_fails_otherwise_is_not(error):
    assert benign_condition(COORDINATOR, logs.COORDINATOR_LOOKUP_FAILED, (error,)) is None


def test_the_coordinator_marked_dead_and_a_heartbeat_to_a_stale_coordinator_are_benign():
    marked = "Marking the coordinator dead (node %s)for group %s."
    heartbeat = "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid"
    assert benign_condition(COORDINATOR, marked, (1, "samples-sync")) == COORDINATOR_WAITING
    assert benign_condition(COORDINATOR, heartbeat, ("samples-sync", 1)) == COORDINATOR_WAITING


def test_a_new_topic_without_a_leader_yet_is_benign():
    assert benign_condition(CLUSTER, logs.TOPIC_AUTO_CREATING, ("samples",)) == TOPIC_LEADER_WAITING


@pytest.mark.parametrize(("logger", "msg"), [
    (COORDINATOR, "Heartbeat session expired - marking coordinator dead"),
    (COORDINATOR, "Error sending %s to node %s [%s] -- marking coordinator dead"),
    (COORDINATOR, "OffsetCommit failed for group %s due to group error (%s), will rejoin"),
    (CLUSTER, "Topic %s not found in cluster metadata"),
    ("aiokafka.client", 'Unable connect to "%s:%s": %s'),
    ("stream.source", "Marking the coordinator dead (node %s)for group %s."),  # only aiokafka's own line
])
def test_real_trouble_is_not_benign(logger, msg):
    assert benign_condition(logger, msg, ("x", "y", "z")) is None


@pytest.mark.parametrize(("module", "template"), [
    (aiokafka.consumer.group_coordinator, logs.COORDINATOR_LOOKUP_FAILED),
    (aiokafka.consumer.group_coordinator, logs.COORDINATOR_MARKED_DEAD),
    (aiokafka.consumer.group_coordinator, logs.COORDINATOR_HEARTBEAT_INVALID),
    (aiokafka.cluster, logs.TOPIC_AUTO_CREATING),
])
def test_the_recognised_lines_are_still_aiokafkas(module, template):
    """An aiokafka upgrade that rewords one of them fails here rather than making it loud again unnoticed."""
    assert template in inspect.getsource(module)


# -- episodes: one info line, quiet during the grace period, loud (rate-limited) after it ---------------------------


def test_the_first_line_of_an_episode_becomes_the_info_line_and_the_next_ones_are_left_out():
    episodes = BenignEpisodes(grace=30, quiet=60, every=60, clock=Clock())
    assert episodes.judge(COORDINATOR_WAITING, "a", now=0).action == INFO
    for t in (0.1, 0.2, 5, 29.9):
        assert episodes.judge(COORDINATOR_WAITING, "a", now=t).action == DROP
        assert episodes.judge(COORDINATOR_WAITING, "b", now=t).action == DROP


def test_each_condition_has_its_own_info_line():
    episodes = BenignEpisodes(grace=30, quiet=60, every=60, clock=Clock())
    assert episodes.judge(COORDINATOR_WAITING, "a", now=0).action == INFO
    assert episodes.judge(TOPIC_LEADER_WAITING, "t", now=1).action == INFO
    assert episodes.judge(TOPIC_LEADER_WAITING, "t", now=2).action == DROP


def test_past_the_grace_period_the_lines_pass_once_per_period_and_kind_with_the_count_left_out():
    episodes = BenignEpisodes(grace=30, quiet=60, every=60, clock=Clock())
    episodes.judge(COORDINATOR_WAITING, "a", now=0)
    for t in range(1, 30):
        episodes.judge(COORDINATOR_WAITING, "a", now=t)
    first = episodes.judge(COORDINATOR_WAITING, "a", now=30)
    # The 29 lines left out in the grace period are counted (the episode's first became the info line).
    assert first.action == PASS and first.suppressed == 29 and first.lasting == 30
    second_kind = episodes.judge(COORDINATOR_WAITING, "b", now=30.1)  # another kind of line: its own limit
    assert second_kind.action == PASS and second_kind.suppressed == 0
    for t in range(31, 90):
        assert episodes.judge(COORDINATOR_WAITING, "a", now=t).action == DROP
    again = episodes.judge(COORDINATOR_WAITING, "a", now=90)
    assert again.action == PASS and again.suppressed == 59 and again.lasting == 90


def test_an_episode_ends_after_a_quiet_spell_and_the_next_one_is_one_info_line_again():
    episodes = BenignEpisodes(grace=30, quiet=60, every=60, clock=Clock())
    episodes.judge(COORDINATOR_WAITING, "a", now=0)
    assert episodes.judge(COORDINATOR_WAITING, "a", now=50).action == PASS  # 50 s quiet: the same episode, past grace
    assert episodes.judge(COORDINATOR_WAITING, "a", now=100).action == DROP  # the same again (passed 50 s ago)
    assert episodes.judge(COORDINATOR_WAITING, "a", now=161).action == INFO  # 61 s quiet: a coordinator moved anew
    assert episodes.judge(COORDINATOR_WAITING, "a", now=162).action == DROP


def test_the_clock_is_read_when_no_time_is_given():
    clock = Clock()
    episodes = BenignEpisodes(grace=30, quiet=60, every=60, clock=clock)
    assert episodes.judge(COORDINATOR_WAITING, "a").action == INFO
    clock.now += 31
    assert episodes.judge(COORDINATOR_WAITING, "a").action == PASS


# -- the logging glue -----------------------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[dict]:
        return [json.loads(self.format(r)) for r in self.records]


@pytest.fixture
def installed():
    """The filter on aiokafka's loggers with a fake clock, lines captured; every logger put back afterwards."""
    names = (*logs.BENIGN_LOGGERS, "aiokafka", "stream.kafka.test")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters), logging.getLogger(n).propagate)
             for n in names}
    capture = Capture()
    out = logging.getLogger("stream.kafka.test")
    out.setLevel(logging.INFO)
    out.addHandler(capture)
    out.propagate = False
    aiokafka_logger = logging.getLogger("aiokafka")
    aiokafka_logger.setLevel(logging.WARNING)
    aiokafka_logger.addHandler(capture)
    aiokafka_logger.propagate = False
    clock = Clock()
    benign = install_benign_filter(BenignKafkaFilter(BenignEpisodes(grace=30, quiet=60, every=60, clock=clock), out))
    try:
        yield clock, capture, benign
    finally:
        aiokafka_logger.removeHandler(capture)
        out.removeHandler(capture)
        for n, (level, filters, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.setLevel(level)
            logger.filters[:] = filters
            logger.propagate = propagate


def test_an_election_is_one_info_line_and_nothing_else(installed):
    clock, capture, _ = installed
    log = logging.getLogger(COORDINATOR)
    for _ in range(5):
        log.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
        log.warning("Marking the coordinator dead (node %s)for group %s.", 1, "samples-sync")
        clock.now += 0.15
    lines = capture.lines()
    assert len(lines) == 1
    assert lines[0]["level"] == "info"
    assert lines[0]["event"] == COORDINATOR_WAITING
    assert lines[0]["message"] == logs.BENIGN_MESSAGES[COORDINATOR_WAITING]
    assert lines[0]["detail"] == "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"


def test_past_the_grace_period_the_clients_own_error_comes_through(installed):
    clock, capture, _ = installed
    log = logging.getLogger(COORDINATOR)
    log.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    clock.now += 31
    log.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    log.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())  # within the minute
    lines = capture.lines()
    assert [line["level"] for line in lines] == ["info", "error"]
    assert lines[1]["logger"] == COORDINATOR
    assert lines[1]["message"] == "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    assert lines[1]["condition"] == COORDINATOR_WAITING
    assert lines[1]["lasting_seconds"] == 31
    assert lines[1]["suppressed"] == 0


def test_an_unrelated_client_error_passes_unchanged(installed):
    _, capture, _ = installed
    logging.getLogger(COORDINATOR).error("Heartbeat session expired - marking coordinator dead")
    logging.getLogger(COORDINATOR).error("Group Coordinator Request failed: %s", KafkaConnectionError())
    logging.getLogger(CLUSTER).error("Topic %s not found in cluster metadata", "samples")
    lines = capture.lines()
    assert [(line["level"], line["message"]) for line in lines] == [
        ("error", "Heartbeat session expired - marking coordinator dead"),
        ("error", "Group Coordinator Request failed: KafkaConnectionError"),
        ("error", "Topic samples not found in cluster metadata"),
    ]
    assert all("condition" not in line and "suppressed" not in line for line in lines)


def test_the_info_line_follows_the_configured_level(installed):
    _, capture, benign = installed
    benign.out.setLevel(logging.WARNING)  # the demo's level: the info line is not shown, and nothing else either
    logging.getLogger(COORDINATOR).error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    logging.getLogger(COORDINATOR).warning("Marking the coordinator dead (node %s)for group %s.", 1, "g")
    assert capture.records == []


def test_installing_twice_leaves_one_filter_per_logger(installed):
    install_benign_filter()
    latest = install_benign_filter()
    for name in logs.BENIGN_LOGGERS:
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, BenignKafkaFilter)]
        assert filters == [latest]
