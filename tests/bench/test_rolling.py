"""The rolling-restart benchmark's pure part (bench/rolling.py): log lines and samples into figures.

No broker, no processes, no sleeps: the functions take the observations as data.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import rolling


def _line(ts: str, event: str, **extra: object) -> str:
    return json.dumps({"ts": ts, "level": "info", "logger": "stream.pipeline", "event": event, **extra})


def test_parse_ts_reads_the_log_format_as_utc() -> None:
    assert rolling.parse_ts("1970-01-01T00:00:01.250Z") == pytest.approx(1.25)
    assert rolling.parse_ts("2026-11-29T22:41:13.688Z") - rolling.parse_ts("2026-11-29T22:41:07.580Z") == (
        pytest.approx(6.108)
    )


def test_group_events_keeps_assigned_and_revoked_in_order() -> None:
    lines = [
        _line("1970-01-01T00:00:01.000Z", "started"),
        "not json at all",
        '{"event": "assigned"}',  # no ts: skipped
        _line("1970-01-01T00:00:02.000Z", "assigned", partitions="t-0"),
        _line("1970-01-01T00:00:05.500Z", "revoked", partitions="t-0"),
        _line("1970-01-01T00:00:06.000Z", "assigned", partitions="t-0,t-1"),
        "[1, 2]",
    ]
    assert rolling.group_events(lines) == [(2.0, "assigned"), (5.5, "revoked"), (6.0, "assigned")]


def test_stop_the_world_pairs_each_revoke_with_the_next_assign_inside_the_window() -> None:
    events = [(1.0, "assigned"), (10.0, "revoked"), (10.5, "assigned"), (20.0, "revoked"), (23.0, "assigned"),
              (30.0, "revoked")]  # fmt: skip
    # The last revoke is the member leaving: no assign follows, so it is not a stop-the-world spell.
    assert rolling.stop_the_world(events, 0, 100) == (pytest.approx(3.5), 2)
    # Only spells whose revoke falls in the window.
    assert rolling.stop_the_world(events, 15, 100) == (pytest.approx(3.0), 1)
    assert rolling.stop_the_world([], 0, 100) == (0.0, 0)
    # A second revoke before the assign (never seen, but harmless) keeps the first one's start.
    assert rolling.stop_the_world([(1.0, "revoked"), (2.0, "revoked"), (4.0, "assigned")], 0, 10) == (3.0, 1)


def test_generations_cluster_the_members_assigned_events() -> None:
    # Three members assigned within milliseconds, then two, then three again: three generations.
    times = [13.70, 13.71, 16.98, 16.99, 17.00, 20.36, 20.37, 20.37, 13.69]
    assert rolling.generations(times) == 3
    assert rolling.generations([]) == 0
    assert rolling.generations([1.0, 1.5, 2.0, 2.5], gap=1.0) == 1  # a chain of close events is one
    assert rolling.generations([1.0, 2.5], gap=1.0) == 2


def test_stall_counts_intervals_without_acceptance_while_samples_wait() -> None:
    ticks = [
        (0.0, 100, 50),
        (0.25, 200, 50),  # nothing accepted over [0, 0.25] with lag: stalled
        (0.5, 300, 50),  # stalled
        (0.75, 400, 120),  # accepted moved: not stalled
        (1.0, 400, 400),  # moved
        (1.25, 400, 400),  # unchanged but no lag: idle, not stalled
        (1.5, 500, 400),
        (1.75, 600, 400),  # stalled over [1.5, 1.75] (lag at its start)
    ]
    total, longest = rolling.stall_seconds(ticks, 0, 10)
    assert total == pytest.approx(0.75)
    assert longest == pytest.approx(0.5)
    # Clipped to the window.
    total, longest = rolling.stall_seconds(ticks, 0.1, 0.4)
    assert total == pytest.approx(0.3)
    assert rolling.stall_seconds([], 0, 1) == (0.0, 0.0)
    assert rolling.stall_seconds(ticks[:1], 0, 1) == (0.0, 0.0)


def test_duplicates_are_keys_accepted_again() -> None:
    keys = [("u1", "steps", "t1"), ("u1", "steps", "t2"), ("u1", "bpm", "t1"), ("u1", "steps", "t1"),
            ("u2", "steps", "t1"), ("u1", "steps", "t1")]  # fmt: skip
    assert rolling.duplicates(keys) == (4, 2)
    assert rolling.duplicates([]) == (0, 0)


METRICS = """\
# HELP stream_ledger_restore_seconds How long a partition was held back
# TYPE stream_ledger_restore_seconds histogram
stream_ledger_restore_seconds_bucket{le="0.1"} 1.0
stream_ledger_restore_seconds_count 3.0
stream_ledger_restore_seconds_sum 0.75
stream_ledger_restored_samples_total 1200.0
stream_ledger_restored_samples_total_extra 5.0
stream_rebalances_total{kind="assigned"} 4.0
stream_rebalances_total{kind="revoked"} 3.0
"""


def test_prometheus_sums_and_ledger_figures() -> None:
    assert rolling.prom_sum(METRICS, "stream_rebalances_total") == 7.0
    assert rolling.prom_sum(METRICS, "stream_ledger_restored_samples_total") == 1200.0  # not the _extra series
    assert rolling.prom_sum(METRICS, "stream_missing_total") == 0.0
    both = rolling.ledger_figures([METRICS, METRICS, ""])
    assert both["stream_ledger_restore_seconds_count"] == 6.0
    assert both["stream_ledger_kept_partitions_total"] == 0.0
    delta = rolling.ledger_delta(rolling.ledger_figures([METRICS]), both)
    assert delta["stream_ledger_restored_samples_total"] == 1200.0


def test_figures_of_one_run() -> None:
    members = [
        [(1.0, "assigned"), (10.0, "revoked"), (10.2, "assigned")],  # stays
        [(1.0, "assigned")],  # stopped at 9 (its leave is not logged)
        [(10.21, "assigned")],  # its replacement
    ]
    ticks = [(9.0, 10, 5), (9.25, 20, 5), (9.5, 30, 30)]
    restores = {"stream_ledger_restore_seconds_count": 2.0, "stream_ledger_restore_seconds_sum": 0.5}
    out = rolling.figures(ticks, members, (9.0, 20.0), produced=30, accepted_keys=(29, 1), restores=restores)
    assert out["partition_idle_s"] == 0.0 and out["extra_backlog_s"] is None  # no ownership, no rate given
    assert out["generations"] == 1
    assert out["assigned_events"] == 2
    assert out["group_stall_s"] == pytest.approx(0.25)
    assert out["member_stw_s"] == pytest.approx(0.2)
    assert out["stw_spells"] == 1
    assert (out["duplicates"], out["lost"]) == (1, 1)
    assert out["restored_partitions"] == 2.0
    assert out["restored_samples"] == 0.0
    assert out["backlog_peak"] == 15


def test_figures_compare_the_backlog_with_the_steady_spell() -> None:
    ticks = [(0.0, 100, 0), (1.0, 200, 100), (5.0, 1500, 400), (6.0, 1600, 1500)]
    none: frozenset[int] = frozenset()
    ownership = [[(0.0, "assigned", frozenset({0, 1})), (4.0, "draining", none)], [(5.0, "assigned", frozenset({0}))]]
    out = rolling.figures(
        ticks, [], (2.0, 8.0), produced=1600, accepted_keys=(1600, 0), restores={},
        ownership=ownership, partitions=2, rate=100.0, steady=(0.0, 1.5),
    )  # fmt: skip
    assert (out["backlog_peak"], out["steady_backlog_peak"]) == (1100, 100)
    assert out["extra_backlog_s"] == pytest.approx(10.0)
    assert out["partition_idle_s"] == pytest.approx(1.0 + 4.0)
    assert out["max_partition_idle_s"] == pytest.approx(4.0)


def test_table_has_a_column_per_run_and_a_row_per_figure() -> None:
    a = {key: 1 for _, key, _ in rolling.ROWS}
    b = dict(a, duplicates=None)
    text = rolling.table([("new mr=0", a), ("new mr=15", b)])
    lines = text.splitlines()
    assert len(lines) == 1 + len(rolling.ROWS)
    assert "new mr=0" in lines[0] and "new mr=15" in lines[0]
    dup = next(line for line in lines if line.startswith("duplicates"))
    assert dup.split()[-2:] == ["1", "-"]


def test_lanes_are_chronological_valid_json_keyed_by_user() -> None:
    import random

    lanes = rolling.lanes_for(users=20, partitions=6, seed=3)
    assert len(lanes) == 40
    assert {lane.partition for lane in lanes} <= set(range(6))
    rng = random.Random(1)
    for lane in lanes[:4]:
        first, second = (json.loads(lane.next_value(rng)) for _ in range(2))
        assert first["user_id"].encode() == lane.key
        assert first["start_date"] < second["start_date"]
        assert first["start_date"] <= first["end_date"]
        assert first["unit"] == ("count" if first["data_type"] == "steps" else "count/min")
        assert 0 < first["value"] and not math.isnan(first["value"])


def test_ownership_events_keep_the_input_topic_partition_numbers() -> None:
    lines = [
        _line("1970-01-01T00:00:01.000Z", "assigned", partitions="in-0,in-3,in-pending-0,in-pending-3,other-1"),
        _line("1970-01-01T00:00:02.000Z", "ledger_restored", partition=0),
        _line("1970-01-01T00:00:03.000Z", "revoked", partitions="in-0,in-3,in-pending-0,in-pending-3"),
        _line("1970-01-01T00:00:04.000Z", "draining", buffered=12),
        _line("1970-01-01T00:00:05.000Z", "stopped"),
    ]
    assert rolling.ownership_events(lines, "in") == [
        (1.0, "assigned", frozenset({0, 3})),
        (3.0, "revoked", frozenset({0, 3})),
        (4.0, "draining", frozenset()),
        (5.0, "stopped", frozenset()),
    ]


def test_idle_seconds_is_the_time_no_member_fetched_a_partition() -> None:
    none: frozenset[int] = frozenset()
    leaving = [(0.0, "assigned", frozenset({0, 1})), (10.0, "draining", none), (12.0, "stopped", none)]
    staying = [
        (0.0, "assigned", frozenset({2})),
        (16.0, "revoked", frozenset({2})),
        (16.5, "assigned", frozenset({2})),
    ]  # still holds 2 when its log ends
    replacement = [(16.5, "assigned", frozenset({0, 1}))]
    idle = rolling.idle_seconds([leaving, staying, replacement], 3, 5.0, 30.0)
    assert idle == [pytest.approx(6.5), pytest.approx(6.5), pytest.approx(0.5)]
    # Before the window nothing counts; a partition nobody ever held is idle the whole window.
    assert rolling.idle_seconds([replacement], 3, 20.0, 30.0) == [0.0, 0.0, pytest.approx(10.0)]
    assert rolling.idle_seconds([], 0, 0.0, 1.0) == []


def test_backlog_peak_within_a_window() -> None:
    ticks = [(0.0, 100, 50), (1.0, 400, 100), (2.0, 500, 480), (3.0, 900, 100)]
    assert rolling.backlog_peak(ticks, 0.0, 2.0) == 300
    assert rolling.backlog_peak(ticks, 0.0, 9.0) == 800
    assert rolling.backlog_peak(ticks, 5.0, 9.0) == 0
