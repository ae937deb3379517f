"""The tails benchmark's pure part (bench/tails.py): scraped counts and offsets into figures.

No broker, no processes, no sleeps: the functions take the observations as data.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bench import tails

METRICS = """\
# HELP stream_records_consumed_total Kafka records consumed
# TYPE stream_records_consumed_total counter
stream_records_consumed_total{topic="in"} 1000.0
stream_records_consumed_total{topic="g-pending"} 40.0
stream_records_consumed_total_created{topic="in"} 1.7e9
stream_buffers 12.0
stream_buffered_samples 17.0
stream_resting_tails 9.0
stream_dead_letters_total{reason="invalid_value"} 2.0
"""


def test_prom_sum_filters_by_label_and_tells_absent_from_zero() -> None:
    assert tails.prom_sum(METRICS, "stream_records_consumed_total") == 1040.0  # _created is another series
    assert tails.prom_sum(METRICS, "stream_records_consumed_total", topic="in") == 1000.0
    assert tails.prom_sum(METRICS, "stream_records_consumed_total", topic="g-pending") == 40.0
    assert tails.prom_sum(METRICS, "stream_records_consumed_total", topic="other") is None
    assert tails.prom_sum(METRICS, "stream_resting_tails") == 9.0
    assert tails.prom_sum(METRICS.replace("stream_resting_tails 9.0", ""), "stream_resting_tails") is None
    assert tails.prom_sum("stream_buffers 0.0\n", "stream_buffers") == 0.0
    assert tails.prom_sum("", "stream_buffers") is None


def test_data_type_plan_gives_steps_only_users_no_heart_rate() -> None:
    order, types = tails.data_type_plan(users=200, events=5000, seed=3, steps_only_share=0.5)
    assert len(order) == 5000
    steps_only = {u for u, kinds in enumerate(types) if kinds == ["steps"]}
    assert 60 < len(steps_only) < 140  # about half
    assert all(kinds in (["steps"], ["steps", "bpm"]) for kinds in types)
    for k in order:
        user, kind = divmod(k, 2)
        assert 0 <= user < 200
        assert not (kind == 1 and user in steps_only)
    # Deterministic for a seed; every user appears at this density.
    assert tails.data_type_plan(200, 5000, 3, 0.5) == (order, types)
    assert len({k // 2 for k in order}) == 200
    only_steps, _ = tails.data_type_plan(50, 500, 3, 1.0)
    assert all(k % 2 == 0 for k in only_steps)


def test_tail_records_keep_each_keys_samples_chronological() -> None:
    records = tails.tail_records(events=3000, users=100, seed=5, steps_only_share=0.5)
    assert len(records) == 3000
    last: dict[tuple[bytes, str], str] = {}
    kinds: Counter[str] = Counter()
    for key, value in records:
        event = json.loads(value)
        assert event["user_id"].encode() == key
        kinds[event["data_type"]] += 1
        lane = (key, event["data_type"])
        assert last.get(lane, "") < event["start_date"]  # one offset throughout: strings order as times
        last[lane] = event["start_date"]
    assert kinds["steps"] > kinds["bpm"] > 0  # steps-only users tilt the mix toward steps
    assert tails.tail_records(300, 10, 5, 0.5) == tails.tail_records(300, 10, 5, 0.5)


def test_per_minute_uses_the_samples_inside_the_window() -> None:
    series = [(100.0, 0.0), (105.0, 10.0), (130.0, 60.0), (160.0, 120.0), (200.0, 500.0)]
    assert tails.per_minute(series, 100, 160) == pytest.approx(120.0)
    assert tails.per_minute(series, 101, 160) == pytest.approx(110 / 55 * 60)  # first sample at or after start
    assert tails.per_minute(series, 100, 100) is None
    assert tails.per_minute([], 0, 10) is None
    assert tails.per_minute([(1.0, 5.0), (1.0, 9.0)], 0, 10) is None  # no time passed


def test_ratio() -> None:
    assert tails.ratio(10, 4) == 2.5
    assert tails.ratio(3, 1000, 1000.0) == 3.0
    assert tails.ratio(None, 4) is None
    assert tails.ratio(5, 0) is None
    assert tails.ratio(5, None) is None


def _observations(**changes: object) -> tails.Observations:
    base = dict(
        produced=1000,
        produce_start=1000.0,
        consumed_at=1025.0,
        last_accept=1030.0,
        backlog_end=1033.0,
        sandbox_at_backlog={"requests": 250, "accepted_samples": 900, "min_batch": 3,
                            "status_counts": {"200": 250}},
        sandbox_at_end={"requests": 250, "accepted_samples": 900, "rejected_samples": 0,
                        "status_counts": {"200": 250}},
        pending=[(1033.0, 40.0), (1063.0, 80.0), (1093.0, 120.0), (1123.0, 160.0), (1153.0, 200.0)],
        pending_at_start=40.0,
        metrics_at_backlog="stream_buffered_samples 100.0\nstream_buffers 60.0\n",
        metrics_at_end="stream_buffered_samples 100.0\nstream_buffers 60.0\n",
        dead_letters=0.0,
        cpu=(2.0, 12.5, 14.0),
        distinct=900,
        duplicates=0,
        window_end=1153.0,
    )  # fmt: skip
    base.update(changes)
    return tails.Observations(**base)  # type: ignore[arg-type]


def test_figures_for_an_old_tree_that_re_parks_every_tail() -> None:
    result = tails.figures(_observations())
    assert result["backlog_s"] == pytest.approx(30.0)  # to the last acceptance, after the input was consumed
    assert result["consumed_s"] == pytest.approx(25.0)
    assert tails.figures(_observations(last_accept=1020.0))["backlog_s"] == pytest.approx(25.0)
    assert result["samples_per_request"] == pytest.approx(3.6)
    assert result["requests_per_1000"] == pytest.approx(250 / 900 * 1000)
    assert result["pending_in_window"] == 160.0
    assert result["pending_per_min"] == pytest.approx(80.0)
    assert result["pending_per_min_2nd_half"] == pytest.approx(80.0)  # from 1093 (the middle) to 1153
    assert result["resting_tails"] is None  # the old tree has no such gauge: tails are its buffers
    assert result["buffers"] == 60.0
    assert result["pending_per_tail_min"] == pytest.approx(80 / 60)
    assert result["cpu_backlog_s"] == pytest.approx(10.5)
    assert result["cpu_window_s"] == pytest.approx(1.5)
    assert result["unaccounted"] == 0  # 900 accepted + 100 buffered
    assert result["requests_in_window"] == 0 and result["accepted_in_window"] == 0
    assert result["window_s"] == pytest.approx(120.0)
    assert result["non_200"] == 0


def test_figures_for_a_tree_whose_tails_rest() -> None:
    end = "stream_buffered_samples 100.0\nstream_buffers 60.0\nstream_resting_tails 60.0\n"
    flat = [(1033.0, 100.0), (1063.0, 100.0), (1093.0, 100.0), (1123.0, 100.0), (1153.0, 100.0)]
    result = tails.figures(_observations(pending=flat, pending_at_start=100.0, metrics_at_end=end,
                                         sandbox_at_end={"requests": 251, "accepted_samples": 903,
                                                         "status_counts": {"200": 250, "503": 1}},
                                         distinct=902, duplicates=1, dead_letters=3.0))  # fmt: skip
    assert result["pending_per_min"] == 0.0
    assert result["pending_per_tail_min"] == 0.0
    assert result["resting_tails"] == 60.0
    assert result["requests_in_window"] == 1 and result["accepted_in_window"] == 3
    assert result["samples_per_request_window"] == 3.0
    assert result["non_200"] == 1
    assert result["dead_letters"] == 3.0
    assert result["unaccounted"] == 1000 - 902 - 100  # a negative count: accepted while still counted buffered
    assert result["duplicates"] == 1


def test_figures_without_a_sample_after_the_backlog() -> None:
    result = tails.figures(_observations(pending=[(1033.0, 40.0)], sandbox_at_backlog={}, metrics_at_end=""))
    assert result["pending_per_min"] is None
    assert result["pending_per_tail_min"] is None
    assert result["samples_per_request"] is None
    assert result["pending_in_window"] == 0.0
    assert result["buffered_samples"] == 0.0


def test_table_prints_one_column_per_contender_and_dashes_for_missing() -> None:
    runs = [("new", tails.figures(_observations())), ("old", {"backlog_s": 12.25})]
    text = tails.table(runs)
    lines = text.splitlines()
    assert lines[0].split() == ["new", "old"]
    assert len(lines) == len(tails.ROWS) + 1
    backlog = next(line for line in lines if line.startswith("backlog s"))
    assert backlog.split()[-2:] == ["30.0", "12.2"]
    per_request = next(line for line in lines if line.startswith("samples per request"))
    assert per_request.split()[-2:] == ["3.60", "-"]
    rejected = next(line for line in lines if line.startswith("rejected samples"))
    assert rejected.endswith("0 / 0")
