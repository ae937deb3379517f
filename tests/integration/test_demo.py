"""The README's first command works: `stream demo` runs the job end to end on the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_runs_end_to_end_and_reports_every_sample_accepted():
    result = subprocess.run(
        [sys.executable, "-m", "stream", "demo", "--users", "20", "--max-samples", "40", "--timeout", "120"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = result.stdout
    assert "demo report" in report
    assert "result                  OK: every valid sample accepted" in report
    assert "dead-lettered records   12" in report  # one bad record of each kind
    # Not a terminal: plain progress lines at most, never a line rewritten in place.
    assert "\r" not in report
    # A fresh broker electing its group coordinator is normal: no warning or error about it (issue 14).
    loud = [line for line in result.stderr.splitlines()
            if line.startswith("{") and json.loads(line)["level"] in ("warning", "error")]
    assert not [line for line in loud if "coordinator" in line.lower()], loud


def test_at_info_level_the_election_is_one_info_line_at_most():
    result = subprocess.run(
        [sys.executable, "-m", "stream", "demo", "--users", "5", "--max-samples", "10", "--timeout", "120",
         "--log-level", "INFO"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "result                  OK: every valid sample accepted" in result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    about_coordinator = [line for line in lines if "coordinator" in line["message"].lower()]
    assert [line["event"] for line in about_coordinator] in ([], ["kafka_coordinator_waiting"]), about_coordinator
    assert all(line["level"] == "info" for line in about_coordinator)
