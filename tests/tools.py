"""Programs outside Python that some tests run (helm, the Prometheus server), and what a test does without one.

`require_tool("helm")` returns the program's path. When the program is missing, the test skips with one line
that names it and says how to get it, and the session ends with one line per missing program (tests/conftest.py).
Under CI (the variable CI is `true` or `1`, as CI services set it) the same test fails instead: CI runs every
test. .ci/deploy-checks decides the same way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import NoReturn

import pytest

# How to get each program the tests run; a test may also pass its own text.
HOW = {
    "helm": "install helm (https://helm.sh/docs/intro/install/), or Go (https://go.dev/doc/install) and run "
    "make test, which then installs helm with go install",
    "prometheus": "install the Prometheus server: as root on Debian or Ubuntu, make test installs it "
    "(apt-get install prometheus); elsewhere put prometheus from https://prometheus.io/download/ on your PATH",
}

# The skips this session raised: their message -> (program, how to get it), for the summary at the end.
MISSING: dict[str, tuple[str, str]] = {}


def strict() -> bool:
    """True under CI: a missing program fails the test instead of skipping it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def missing_tool(name: str, how: str | None = None) -> NoReturn:
    """Skip the calling test (fail it under CI) because program `name` is not installed."""
    how = how or HOW[name]
    message = f"{name} not found; to run this test: {how}"
    if strict():
        pytest.fail(f"{message} (CI={os.environ['CI']}: a missing tool is a failure)", pytrace=False)
    MISSING[message] = (name, how)
    pytest.skip(message)


def require_tool(
    name: str, how: str | None = None, *, locate: Callable[[str], str | None] = shutil.which
) -> str:
    """The path of program `name` (found by `locate`, default: on PATH); skips the test, or fails it under CI,
    when there is none. `how` says how to get it (default: HOW[name])."""
    path = locate(name)
    if not path:
        missing_tool(name, how)
    return path
