"""The README's first command works: `stream demo` runs the job end to end on the embedded default."""

from __future__ import annotations

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
