"""Smoke test of the benchmark (`python -m bench`): tiny sizes, end to end against a real local Kafka broker.

It checks that every figure and ratio comes out as a positive, finite number, not what the numbers are:
on shared CI machines they mean nothing at this size. Set STREAM_TEST_BOOTSTRAP to reuse a running broker.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
METRICS = (
    "steady_samples_per_s",
    "startup_samples_per_s",
    "steady_cpu_s_per_million",
    "cpu_s_per_million",
    "peak_rss_bytes",
)


@pytest.mark.timeout(240)
def test_benchmark_end_to_end(tmp_path: Path) -> None:
    quix = importlib.util.find_spec("quixstreams") is not None
    contenders = ["a", "b", "c", "d"] if quix else ["a", "b", "d"]  # (c) needs the optional quixstreams
    out, md = tmp_path / "latest.json", tmp_path / "latest.md"
    cmd = [
        sys.executable, "-m", "bench", "--events", "20000", "--users", "200", "--keys", "20000",
        "--latency-seconds", "3", "--latency-rate", "5000", "--dead-letters", "5000",
        "--only", ",".join([*contenders, "latency", "deadletters", "keys", "ledger"]),
        "--output", str(out), "--markdown", str(md),
    ]  # fmt: skip
    if os.environ.get("STREAM_TEST_BOOTSTRAP"):
        cmd += ["--bootstrap", os.environ["STREAM_TEST_BOOTSTRAP"]]
    env = {k: v for k, v in os.environ.items() if k != "STREAM_TEST_BOOTSTRAP"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads(out.read_text())
    figures = results["figures"]
    expected = [f"{c}.{m}" for c in contenders for m in METRICS]
    expected += [f"ratio.d_over_{c}.{m}" for c in contenders if c != "d" for m in METRICS]
    expected += ["latency.p50_seconds", "latency.p99_seconds", "latency.window_seconds", "latency.measured_fraction"]
    expected += ["dead_letters.dead_letters_per_s", "dead_letters.cpu_s_per_million", "dead_letters.peak_rss_bytes",
                 "dead_letters.log_lines"]
    expected += [f"ratio.dead_letters_over_a.{m}" for m in ("per_s", "cpu_s_per_million")]
    expected += ["keys.bytes_per_buffered_sample", "keys.bytes_per_key", "keys.buffered_samples", "keys.buffers"]
    expected += ["batcher.10000.us_per_record", "batcher.20000.us_per_record"]
    expected += [f"decode.{shape}_us_per_sample" for shape in ("single", "bundle_100", "single_escaped")]
    expected += ["ledger.read_seconds", "ledger.restore_seconds", "ledger.ns_per_sample"]
    missing = sorted(set(expected) - set(figures))
    assert not missing, f"missing figures: {missing}"
    bad = {k: v for k, v in figures.items() if not (isinstance(v, int | float) and math.isfinite(v) and v > 0)}
    assert not bad, f"figures not positive and finite: {bad}"

    # Everything was delivered or consumed, and the many-keys run buffered every sample without sending any.
    for name in contenders:
        assert results["contenders"][name]["delivered_fraction"] >= 0.99
    assert results["keys"]["buffered_samples"] == results["keys"]["samples"]
    assert results["keys"]["buffers"] == results["keys"]["keys"]
    assert results["keys"]["requests_sent"] == 0
    assert results["latency"]["p50_seconds"] <= results["latency"]["p99_seconds"]
    # Every invalid event became one acknowledged dead letter of its reason, none reached the API, and the
    # service said little about it (no line per dead letter).
    dead = results["dead_letters"]
    assert dead["written"] == dead["dlq_records"] == dead["dead_letters"] == 5000
    assert dead["reasons"] == {"invalid_value": 5000}
    assert dead["api_requests"] == 0
    assert dead["log_lines"] <= 10, dead["log_events"]
    assert results["machine"]["nproc"] and results["machine"]["python"] and results["machine"]["kafka"]

    text = md.read_text()
    assert "(d) / (a)" in text and "stream run" in text
    assert "dead letters (5,000 invalid events" in text and "5,000 dead letters (5,000 in the DLQ)" in text
