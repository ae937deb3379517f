"""Measure one version of `stream`: a copy of the package taken when the benchmark starts.

The package is edited while benchmarks run (a long run takes minutes). Every process of the run (this
one, the sandbox, `stream run`, the contenders' helpers) imports `stream` from this copy: it comes first on
sys.path and in PYTHONPATH, ahead of the working tree (an editable install's finder comes after sys.path).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKDIR: Path | None = None  # the run's directory: the copy of the code and the processes' logs


def take() -> Path:
    """Copy stream/ into a fresh run directory and make every later import of `stream` use the copy."""
    global WORKDIR
    if "stream" in sys.modules:
        raise RuntimeError("take() must run before anything imports stream")
    WORKDIR = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    code = WORKDIR / "code"
    shutil.copytree(REPO / "stream", code / "stream", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(code))
    paths = [str(code), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    return code / "stream"
