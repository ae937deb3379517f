"""The Dockerfile and the chart's documentation agree with the chart."""

from __future__ import annotations

import json
import re
import sys
import tomllib

import pytest

pytest.importorskip("yaml", reason="needs PyYAML (.ci/deploy-checks installs it)")

from tests.deploy import values_table
from tests.deploy.chart import CHART, ROOT, one

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
# The multi-architecture index digest of python:3.11.14-slim-bookworm (both stages).
BASE_IMAGE = "python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d"


def runtime_dependencies() -> list[str]:
    """The runtime dependencies of pyproject.toml with their own, transitively (extras followed), by
    canonical name, as the installed distributions declare them (markers evaluated for this interpreter)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(r) for r in declared]
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.distribution(req.name).requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                stack.append(sub)
    return sorted({name for name, _ in seen})


def constraints() -> dict[str, str]:
    """deploy/constraints.txt: {canonical name: the `==` version}; anything but `name==version` fails."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), (
                f"deploy/constraints.txt: {line!r} is not an exact pin (name==version)")
            pins[canonicalize_name(name)] = version
    return pins


def write_constraints() -> None:
    import importlib.metadata as metadata

    lines = [
        "# Exact versions of every runtime dependency of the image (pyproject.toml [project] dependencies,",
        "# transitively), for reproducible builds: deploy/Dockerfile installs with `pip install -c`.",
        "# Generated from the virtualenv the tests ran in: python -m tests.deploy.test_assets --write-constraints",
    ]
    lines += [f"{name}=={metadata.version(name)}" for name in runtime_dependencies()]
    CONSTRAINTS.write_text("\n".join(lines) + "\n")


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
        # A specific patch release of 3.11, slim, on a named Debian release, and its digest: what is pulled
        # can never change under the same Dockerfile.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", base), base
    assert set(bases) == {BASE_IMAGE}  # one base for both stages: the venv's interpreter link holds


def test_every_runtime_dependency_is_pinned_in_the_constraints():
    pytest.importorskip("packaging", reason="needs packaging (comes with pip's tools)")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = constraints()
    missing = [name for name in runtime_dependencies() if name not in pins]
    assert not missing, (f"deploy/constraints.txt lacks {missing}: "
                         "run python -m tests.deploy.test_assets --write-constraints")
    # The pins satisfy pyproject.toml's ranges (pip would refuse the build otherwise).
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), (req, pins[canonicalize_name(req.name)])
    # The image installs with them, and the build context holds the file.
    [install] = [args for word, args in instructions() if word == "RUN" and "pip install" in args]
    assert re.search(r"(-c|--constraint)[ =]\S*constraints\.txt", install), install
    assert any(word == "COPY" and args.split()[0] == "deploy/constraints.txt" for word, args in instructions())
    assert "!deploy/constraints.txt" in DOCKERIGNORE.read_text().splitlines()


def test_dockerfile_oci_labels():
    from stream import __version__

    stages = "\n".join(f"{word} {args}" for word, args in instructions()).split("\nFROM ")
    final = stages[-1]
    args = dict(re.findall(r"^ARG (\w+)(?:=(.*))?$", final, re.MULTILINE))
    assert args["VERSION"] == __version__  # the default: the package's version
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', final))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"
    assert "SOURCE" in args
    assert labels["org.opencontainers.image.title"] == "stream"


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
    # 0.3.0: breaking (grace periods, the release label the rules need, the NetworkPolicy's DNS default back).
    assert meta["version"] == "0.3.0"
    # A lower bound only: helm must not refuse an upgrade once a cluster moves past the newest validated minor.
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert meta["annotations"]["stream/validated-kubernetes"] == "1.29-1.37"
    from stream import __version__

    assert meta["appVersion"] == __version__


def test_the_stated_kubernetes_range_is_what_deploy_checks_validates():
    from tests.deploy import chart

    pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (.ci/deploy-checks installs it)")
    # .ci/deploy-checks validates every minor from kubeVersion's lower bound to the newest kubernetes-validate
    # knows (kube_versions raises on a gap); the chart states that range in its annotation: no more, no fewer.
    versions = chart.kube_versions()
    stated = [f"{a}.{b}.0" for a, b in chart.stated_kube_minors()]
    assert versions[0] == "{}.{}.0".format(*chart.kube_lower_bound()) == "1.29.0"
    assert versions == stated, (
        f"Chart.yaml annotation {chart.VALIDATED_ANNOTATION} states {stated[0]}..{stated[-1]}, but .ci/deploy-checks "
        f"validates {versions[0]}..{versions[-1]}: update the annotation")
    script = (ROOT / ".ci" / "deploy-checks").read_text()
    assert '"$PYTHON" -m tests.deploy.chart kube-versions' in script
    # The tests render for the newest validated version.
    assert chart.KUBE_VERSION == versions[-1]


def test_stated_range_mismatch_is_caught(monkeypatch):
    """The comparison above is not vacuous: an annotation one minor short, or one beyond kubeVersion's lower
    bound, differs from what deploy-checks validates."""
    from tests.deploy import chart

    pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (.ci/deploy-checks installs it)")
    text = (CHART / "Chart.yaml").read_text()
    versions = chart.kube_versions()
    for stated in ("1.29-1.36", "1.30-1.37", f"1.29-1.{int(versions[-1].split('.')[1]) + 1}"):
        monkeypatch.setattr(chart, "_chart_yaml", lambda s=stated: text.replace(
            'stream/validated-kubernetes: "1.29-1.37"', f'stream/validated-kubernetes: "{s}"'))
        assert [f"{a}.{b}.0" for a, b in chart.stated_kube_minors()] != chart.kube_versions()


def test_helm_accepts_every_newer_kubernetes_and_refuses_an_older_one(render):
    from tests.deploy import chart

    token = {"secret": {"apiToken": "t"}}
    versions = chart.kube_versions()
    low = chart.kube_lower_bound()
    # Every validated minor, and the ones after it (an upgrade must not be refused once the cluster moves on).
    for version in (versions[0], versions[-1], "1.38.0", "1.40.3"):
        render(values=token, kube_version=version)
    with pytest.raises(chart.RenderError) as info:
        render(values=token, kube_version=f"1.{low[1] - 1}.0")
    assert "kubeVersion" in info.value.stderr or "incompatible" in info.value.stderr


DASHBOARD = CHART / "files" / "dashboard.json"
DASHBOARD_UID = "stream-service"


def dashboard_targets() -> dict[str, list[str]]:
    """{panel title: its queries} of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels}


def test_dashboard_has_cpu_memory_and_restart_panels():
    panels = dashboard_targets()
    # The process collector of prometheus_client (the service's own series), per pod.
    [cpu] = panels["CPU"]
    assert "rate(process_cpu_seconds_total{" in cpu and 'job=~"$job"' in cpu and "by (namespace, pod)" in cpu
    assert any("process_resident_memory_bytes{" in e and 'job=~"$job"' in e for e in panels["Memory"])
    # kube-state-metrics (its own job): the stream container of the pods this job scrapes, nothing else.
    [restarts] = panels["Container restarts"]
    assert "increase(kube_pod_container_status_restarts_total{" in restarts
    assert 'container="stream"' in restarts and 'and on (namespace, pod) up{job=~"$job"}' in restarts
    assert 'job=~"$job", namespace' not in restarts.split(" and on ")[0]  # KSM's series carry its own job


def test_dashboard_shows_lag_per_namespace():
    panels = dashboard_targets()
    [by_namespace] = panels["Consumer lag by namespace and topic"]
    assert by_namespace.startswith(
        "sum by (namespace, topic) (max by (namespace, topic, partition) (stream_consumer_lag{")
    # Two releases in two namespaces may read topics of the same name: their partitions are not one.
    for exprs in panels.values():
        for expr in exprs:
            if "stream_consumer_lag" in expr:
                assert "max by (namespace, topic, partition" in expr, expr


def test_dashboard_has_a_fixed_uid():
    assert json.loads(DASHBOARD.read_text()).get("uid") == DASHBOARD_UID


def test_notes_render_with_every_ci_values_file(ci_renders):
    # `helm template` renders NOTES.txt too (and fails on an error in it), without printing it.
    assert len(ci_renders) >= 4


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-constraints"]:
        sys.exit("usage: python -m tests.deploy.test_assets --write-constraints")
    write_constraints()
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)}")
