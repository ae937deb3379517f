"""`stream demo`'s progress: the line (a pure function of the figures), the live line on a terminal, plain lines
elsewhere, and nothing of it left on the line the report starts on."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import pytest

from stream.dev import demo
from stream.dev.demo import Figures, LiveLine, Progress, progress_line
from stream.metrics import Metrics

FIGURES = Figures(read=120_000, records=252_144, accepted=150_000, valid=300_536, batches=1000, dead_letters=12)


def test_the_line_says_elapsed_time_records_read_samples_accepted_batches_and_dead_letters():
    assert progress_line(12.34, FIGURES) == (" 12.3 s  records read 120000/252144  samples accepted 150000/300536  "
                                             "batches 1000  dead letters 12")


def test_at_the_start_everything_is_zero():
    nothing = Figures(read=0, records=20, accepted=0, valid=400, batches=0, dead_letters=0)
    line = progress_line(0.0, nothing)
    assert line == "  0.0 s  records read 0/20  samples accepted 0/400  batches 0  dead letters 0"


def test_a_narrow_terminal_gets_the_short_wording_and_never_more_than_its_width():
    wide = progress_line(12.34, FIGURES)
    assert progress_line(12.34, FIGURES, width=len(wide)) == wide
    short = progress_line(12.34, FIGURES, width=79)
    assert short == "12 s: read 120000/252144, accepted 150000/300536, batches 1000, dead letters 12"
    for width in (79, 40, 10, 1, 0):
        assert len(progress_line(12.34, FIGURES, width=width)) <= width


def test_the_figures_come_from_the_metrics_registry():
    metrics = Metrics()
    metrics.records.labels(topic="samples").inc(7)
    metrics.records.labels(topic="samples-sync-pending").inc(1)
    metrics.samples.labels(outcome="accepted", data_type="steps").inc(30)
    metrics.samples.labels(outcome="accepted", data_type="heart_rate").inc(12)
    metrics.samples.labels(outcome="dead_lettered", data_type="steps").inc(2)
    metrics.batches.labels(data_type="steps", status="2xx").inc(3)
    metrics.dead_letters.labels(reason="malformed_json").inc()
    metrics.dead_letters.labels(reason="below_min_batch").inc(2)
    assert demo._figures(metrics, records=10, valid=44) == Figures(
        read=8, records=10, accepted=42, valid=44, batches=3, dead_letters=3)


def test_the_live_line_is_rewritten_in_place_and_cleared_without_a_trace():
    out = io.StringIO()
    line = LiveLine(out)
    line.show("records read 10/20")
    line.show("read 20/20")  # shorter: blanks what the longer one left
    line.clear()
    line.clear()  # nothing shown: nothing written
    assert out.getvalue() == "\rrecords read 10/20" + "\rread 20/20        " + "\r" + " " * 10 + "\r"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Frames:
    """Progress's sleep: lets `free` frames go by, then holds the loop until cancelled; `held` is set then."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.slept: list[float] = []
        self.held = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        if len(self.slept) > self.free:
            self.held.set()
            await asyncio.Event().wait()  # until Progress.stop cancels the task


async def test_on_a_terminal_a_log_line_blanks_the_live_line_first_and_the_line_is_gone_before_the_report(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")  # the terminal's width, as shutil reads it
    out = Terminal()
    handler = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(handler)
    frames = Frames(free=0)
    try:
        progress = Progress(Metrics(), records=20, valid=400, started=time.monotonic(), out=out, sleep=frames)
        progress.start()
        await frames.held.wait()  # the first frame is on the line
        assert frames.slept == [demo.PROGRESS_EVERY_TERMINAL]
        assert out.getvalue().startswith("\r")
        assert "records read 0/20" in out.getvalue()
        logging.getLogger("stream.test").error("a real error")
        assert out.getvalue().endswith("\r")  # blanked, the cursor back at column 0, before the log line went out
        await progress.stop()
        assert handler.filters == []  # no longer blanks anything
        written = out.getvalue()
        assert written.endswith("\r")  # whatever prints next (the report) starts on a blank line
        assert progress._task is not None and progress._task.done()  # and nothing more can come
    finally:
        root.removeHandler(handler)


async def test_elsewhere_a_plain_line_every_few_seconds():
    out = io.StringIO()
    frames = Frames(free=3)
    progress = Progress(Metrics(), records=20, valid=400, started=time.monotonic(), out=out, sleep=frames)
    progress.start()
    await frames.held.wait()
    await progress.stop()
    assert frames.slept == [demo.PROGRESS_EVERY_PLAIN] * 4  # a line after each of the first three waits
    lines = out.getvalue().splitlines(keepends=True)
    assert len(lines) == 3
    assert all(line.endswith("  records read 0/20  samples accepted 0/400  batches 0  dead letters 0\n")
               for line in lines)
    assert "\r" not in out.getvalue()
