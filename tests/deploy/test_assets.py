"""The Dockerfile and the chart's documentation agree with the chart."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("yaml", reason="needs PyYAML (.ci/deploy-checks installs it)")

from tests.deploy import values_table
from tests.deploy.chart import CHART, ROOT, one

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python():
    bases = [args.split()[0] for word, args in instructions() if word == "FROM" and "--from" not in args]
    assert len(bases) >= 2
    for base in bases:
        # A specific patch release of 3.11, slim, on a named Debian release: never a moving tag.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base), base


def test_dockerfile_runs_stream_as_the_charts_user(render):
    users = [args for word, args in instructions() if word == "USER"]
    uid, _, gid = users[-1].partition(":")
    deployment = one(render(values={"secret": {"apiToken": "t"}}), "Deployment")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert int(uid) == security["runAsUser"] == 10001
    assert int(gid) == security["runAsGroup"] == 10001


def test_entrypoint_is_exec_form_stream_run():
    [entrypoint] = [args for word, args in instructions() if word == "ENTRYPOINT"]
    # Exec form: stream is PID 1 and receives SIGTERM (a shell would swallow it).
    assert json.loads(entrypoint) == ["stream", "run"]
    assert not [args for word, args in instructions() if word == "CMD"]


def test_no_pip_cache_in_the_image():
    for word, args in instructions():
        if word == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args
    assert "EXPOSE 9090" in DOCKERFILE.read_text()


def test_readme_values_table_is_up_to_date():
    readme = values_table.README.read_text()
    assert readme == values_table.readme_with_table(readme), (
        "helm/stream/README.md is stale: run python -m tests.deploy.values_table --write")


def test_every_value_is_described():
    text = values_table.VALUES.read_text()
    import yaml

    rows = values_table.rows(yaml.safe_load(text), values_table.descriptions(text))
    undocumented = [path for path, _, description in rows if not description]
    assert not undocumented, f"values.yaml keys without a '# --' comment: {undocumented}"


def test_chart_version_and_kube_version():
    import yaml

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    from stream import __version__

    assert meta["appVersion"] == __version__


def test_notes_render_with_every_ci_values_file(ci_renders):
    # `helm template` renders NOTES.txt too (and fails on an error in it), without printing it.
    assert len(ci_renders) >= 4
