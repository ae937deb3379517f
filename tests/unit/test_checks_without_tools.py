"""On a machine without the deploy tools, the checks skip what they cannot run (one line each) and pass; under
CI=true a missing tool is a failure. The same for tests that need a program (tests/tools.py).

Nothing is uninstalled: .ci/deploy-checks runs with a PATH of links to every program on this PATH except the
tools (helm, promtool, go, apt-get, hadolint, kubernetes-validate...), a HOME without ~/go/bin, and a Python
environment of its own (the project's packages, but not the console scripts pip installed next to them).
STREAM_CHECKS_NO_INSTALL=1 keeps it from installing anything: no network, no pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from tests import tools

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CHECKS = REPO / ".ci" / "deploy-checks"
HIDDEN = {
    "helm", "promtool", "prometheus", "go", "gofmt", "apt-get", "apt", "hadolint", "kubernetes-validate",
    "pip", "pip3", "sudo",
}
CHECKS = [
    "helm lint --strict",
    "helm template | kubernetes-validate --strict",
    "promtool check/test rules deploy/prometheus",
    "promtool check rules of the chart's PrometheusRule",
    "hadolint deploy/Dockerfile",
]


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine with Python (and the project's packages) but none of the deploy tools."""
    root = tmp_path_factory.mktemp("bare")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = bin_dir / entry.name
            if entry.name in HIDDEN or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    path = str(bin_dir)
    for name in HIDDEN:
        assert shutil.which(name, path=path) is None, name

    # A Python environment whose scripts directory (which the checks put on PATH) has no hadolint nor
    # kubernetes-validate, but which imports what the project's environment has.
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    own_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(own_site, "project.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    home = root / "home"
    home.mkdir()
    env = {
        key: value for key, value in os.environ.items()
        if key not in {"CI", "VIRTUAL_ENV", "HELM", "GOPATH", "GOBIN", "PYTHONPATH", "PYTHONHOME"}
    }
    env.update(PATH=path, HOME=str(home), PYTHON=str(python), STREAM_CHECKS_NO_INSTALL="1")
    return env


def deploy_checks(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY_CHECKS)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False
    )


def skip_lines(output: str) -> list[str]:
    """The checks' SKIP lines (not the one pytest tests/deploy ends with: "SKIP 69 tests: ...; to run them")."""
    return [line for line in output.splitlines() if line.startswith("SKIP ") and "; to run it: " in line]


def test_without_the_tools_each_check_skips_in_one_line_and_the_rest_passes(bare):
    done = deploy_checks(bare)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = skip_lines(done.stdout)
    assert [line.split(":")[0].removeprefix("SKIP ") for line in lines] == CHECKS, lines
    by_check = dict(zip(CHECKS, lines, strict=True))
    assert by_check["helm lint --strict"] == (
        "SKIP helm lint --strict: helm not found (go is not installed); to run it: install helm "
        "(https://helm.sh/docs/intro/install/), or Go (https://go.dev/doc/install) and this script installs "
        "helm, then run make test again"
    )
    assert "kubernetes-validate not found (installing is turned off" in by_check[CHECKS[1]]
    assert "promtool not found (apt-get not found)" in by_check[CHECKS[2]]
    assert "hadolint not found (installing is turned off" in by_check[CHECKS[4]]
    for line in lines:
        assert ", then run make test again" in line
    # What needs no tool of its own ran: tests/deploy, whose helm tests skip outside CI.
    assert "\n== pytest tests/deploy\n" in done.stdout
    assert re.search(r"\d+ passed, \d+ skipped", done.stdout)
    assert re.search(r"^SKIP \d+ tests: helm not found; to run them: install helm ", done.stdout, re.M)
    assert "deploy checks passed: 1 ran, 5 skipped for a missing tool" in done.stdout


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_under_ci_a_missing_tool_fails_and_names_it(bare, ci):
    done = deploy_checks({**bare, "CI": ci})
    assert done.returncode != 0
    for tool in ("helm", "kubernetes-validate", "promtool", "hadolint"):
        assert re.search(rf"^FAIL {tool} not found \(.+\); to get it: ", done.stdout, re.M), done.stdout
    assert not skip_lines(done.stdout)
    assert "== pytest tests/deploy" not in done.stdout  # no check runs on an incomplete set of tools


def test_ci_false_is_not_strict(bare):
    done = deploy_checks({**bare, "CI": "false"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert len(skip_lines(done.stdout)) == len(CHECKS)


def test_a_failing_check_fails_the_run_and_the_others_still_run(bare, tmp_path):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    calls = tmp_path / "calls"
    for name in ("promtool", "hadolint"):
        (fakes / name).write_text(
            f'#!/bin/sh\n[ "$1" = --version ] && echo "fake {name}" && exit 0\necho "{name} $*" >> {calls}\nexit 1\n'
        )
        (fakes / name).chmod(0o755)
    done = deploy_checks({**bare, "PATH": f"{fakes}{os.pathsep}{bare['PATH']}"})
    assert done.returncode == 1, done.stdout
    # A check stops at its first failing command: promtool's `test rules` never ran.
    assert calls.read_text().splitlines() == [
        "promtool check rules deploy/prometheus/alerts.yaml",
        "hadolint deploy/Dockerfile",
    ]
    assert "FAILED promtool check/test rules deploy/prometheus (exit status 1)" in done.stdout
    assert "FAILED hadolint deploy/Dockerfile (exit status 1)" in done.stdout
    assert re.search(r"^  ran +\d+s  pytest tests/deploy$", done.stdout, re.M)
    assert "deploy checks FAILED: 2 failed, 1 passed, 3 skipped" in done.stdout


# --- tests/tools.py: a test whose program is missing ---------------------------------------------------

MISSING = "stream-test-no-such-program"


def test_a_missing_program_skips_the_test_saying_how_to_get_it(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        tools.require_tool(MISSING, "install it from the moon")
    assert str(info.value) == f"{MISSING} not found; to run this test: install it from the moon"


@pytest.mark.parametrize("ci", ["true", "True", "1"])
def test_under_ci_a_missing_program_fails_the_test(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as info:
        tools.require_tool(MISSING, "install it from the moon")
    assert f"{MISSING} not found; to run this test: install it from the moon" in str(info.value)
    assert "a missing tool is a failure" in str(info.value)


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_ci_other_than_true_is_not_strict(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert not tools.strict()


def test_a_present_program_is_returned(monkeypatch, tmp_path):
    program = tmp_path / MISSING
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert tools.require_tool(MISSING, "never said") == str(program)
    assert tools.require_tool("helm", locate=lambda _: "/opt/helm") == "/opt/helm"


def test_the_default_how_to_comes_from_the_table(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        tools.require_tool("prometheus", locate=lambda _: None)
    assert str(info.value) == f"prometheus not found; to run this test: {tools.HOW['prometheus']}"


SESSION = textwrap.dedent(f"""
    from tests.tools import require_tool

    def test_one():
        require_tool("{MISSING}", "install it from the moon")

    def test_two():
        require_tool("{MISSING}", "install it from the moon")

    def test_without_it():
        pass
""")


def run_session(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_session.py").write_text(SESSION)
    variables = {k: v for k, v in os.environ.items() if k != "CI"}
    variables.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), str(tmp_path / "test_session.py")],
        cwd=tmp_path, env=variables, capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_session_ends_with_one_line_per_missing_program(tmp_path):
    done = run_session(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout
    assert f"SKIP 2 tests: {MISSING} not found; to run them: install it from the moon" in done.stdout


def test_under_ci_the_session_fails(tmp_path):
    done = run_session(tmp_path, CI="true")
    assert done.returncode == 1, done.stdout
    assert "2 failed, 1 passed" in done.stdout
    assert f"{MISSING} not found; to run this test: install it from the moon" in done.stdout
