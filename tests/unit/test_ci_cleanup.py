""".ci/run stops only what its run started (by pid, from $LOCALKAFKA_PIDFILE), never processes found by name.

A decoy whose command line contains `kafka.Kafka` stands for someone else's broker on the CI machine: the old
trap (`pkill -f 'kafka\\.Kafka'`) would have killed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.dev import localkafka

REPO = Path(__file__).resolve().parents[2]
STOP_STARTED = REPO / ".ci" / "stop-started"
SLEEP = "import time; time.sleep(120)"


def _spawn(*args: str, own_session: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", SLEEP, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=own_session,
    )


def _alive(pid: int) -> bool:
    """Running: not ended, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling pace only: the condition is re-checked
    return True


def _matched_by_old_trap(pid: int, timeout: float = 10) -> bool:
    """Whether `pkill -f 'kafka\\.Kafka'` would have picked this process (it matches the full command line).

    Right after Popen returns the child may still be inside execve, with an empty command line: wait for it.
    """
    deadline = time.monotonic() + timeout
    while not (cmdline := Path(f"/proc/{pid}/cmdline").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling pace only
    return b"kafka.Kafka" in cmdline.split(b"\0")


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """Somebody else's "broker": must outlive every cleanup; the test ends it itself."""
    proc = _spawn("kafka.Kafka", "not-started-by-this-run", own_session=True)
    try:
        assert _matched_by_old_trap(proc.pid)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _stop_started(pidfile: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STOP_STARTED), str(pidfile)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _line(pid: int, start: str | None = None) -> str:
    return f"{pid} {start or localkafka.process_start_time(pid)}\n"


def test_stops_the_listed_processes_and_only_them(tmp_path: Path, decoy: subprocess.Popen[bytes]):
    leader = _spawn("kafka.Kafka", own_session=True)  # like LocalKafka's JVM: its own session and group
    plain = _spawn("kafka.Kafka")  # in the test's group: must be signalled alone, not the group
    try:
        pidfile = tmp_path / "pids"
        pidfile.write_text(
            _line(leader.pid)
            + _line(plain.pid)
            + _line(decoy.pid, start="1")  # the decoy's pid, but another start time: a reused pid
            + "\nnot a pid\n"
            + "999999999 1\n"  # ended long ago
        )

        done = _stop_started(pidfile)

        assert done.returncode == 0, done.stderr
        assert leader.wait(timeout=15) == -signal.SIGTERM
        assert plain.wait(timeout=15) == -signal.SIGTERM
        assert decoy.poll() is None, "a process that was not started by this run was stopped"
        assert f"SIGTERM -{leader.pid}" in done.stderr and f"SIGTERM {plain.pid}" in done.stderr
    finally:
        for proc in (leader, plain):
            proc.kill()
            proc.wait()


def test_kills_what_ignores_sigterm_after_the_grace_period(tmp_path: Path):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        pidfile = tmp_path / "pids"
        pidfile.write_text(_line(stubborn.pid))

        done = _stop_started(pidfile, STOP_STARTED_GRACE_SECONDS="1")

        assert done.returncode == 0, done.stderr
        assert stubborn.wait(timeout=15) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()
        if stubborn.stdout is not None:
            stubborn.stdout.close()


@pytest.mark.parametrize("content", [None, ""])
def test_no_pidfile_or_an_empty_one_is_nothing_to_do(tmp_path: Path, content: str | None):
    pidfile = tmp_path / "pids"
    if content is not None:
        pidfile.write_text(content)
    done = _stop_started(pidfile)
    assert (done.returncode, done.stderr) == (0, "")


def test_record_pid_appends_pid_and_start_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pidfile = tmp_path / "pids"
    monkeypatch.delenv(localkafka.PIDFILE_VARIABLE, raising=False)
    localkafka.record_pid(os.getpid())
    assert not pidfile.exists()

    monkeypatch.setenv(localkafka.PIDFILE_VARIABLE, str(pidfile))
    localkafka.record_pid(os.getpid())
    localkafka.record_pid(os.getppid())

    assert pidfile.read_text() == _line(os.getpid()) + _line(os.getppid())
    assert localkafka.process_start_time(os.getpid()).isdigit()


_FAKE_MAKE = """#!{python}
# Stands in for `make lint test`: leaves a "broker" behind, recorded the way LocalKafka records its JVM.
import subprocess, sys
from stream.dev.localkafka import record_pid
assert sys.argv[1:] == ["lint", "test"], sys.argv
left = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)", "kafka.Kafka", "started-by-this-run"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
)
record_pid(left.pid)
print(left.pid, flush=True)
sys.exit(3)
"""


def test_ci_run_stops_what_its_run_started_and_keeps_makes_status(tmp_path: Path, decoy: subprocess.Popen[bytes]):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {
        "make": _FAKE_MAKE.format(python=sys.executable),
        "java": "#!/bin/sh\nexit 0\n",  # present: .ci/run must not try to install anything
        "mvn": "#!/bin/sh\nexit 0\n",
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != localkafka.PIDFILE_VARIABLE}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO), TMPDIR=str(tmp), CI="true")

    done = subprocess.run(
        [str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 3, done.stderr  # make's status, through the EXIT trap
    left = int(done.stdout.split()[0])
    assert _gone_within(left, timeout=15), "the process the run started outlived it"
    assert decoy.poll() is None, "a process that was not started by this run was stopped"
    assert list(tmp.iterdir()) == [], "the pidfile was left behind"
