"""The chart's alert rules are scoped to their release (issue 15, item 2), checked with promtool on the rules the
chart renders: three releases side by side (two in one namespace, one of the same name in another namespace),
each with its own PrometheusRule, as Prometheus would load them together."""

from __future__ import annotations

import re
import subprocess

import pytest

yaml = pytest.importorskip("yaml", reason="needs PyYAML (.ci/deploy-checks installs it)")

from tests.deploy import chart  # noqa: E402
from tests.deploy.chart import one  # noqa: E402
from tests.tools import require_tool  # noqa: E402

# (release, namespace): a and b share prod; staging runs a release named like prod's first one.
RELEASES = [("stream-a", "prod"), ("stream-b", "prod"), ("stream-a", "staging")]
DEFAULT = chart.CHART / "ci" / "default-values.yaml"


def scope(release: str, namespace: str) -> str:
    # What the chart's ServiceMonitor/PodMonitor put on every series: job, namespace, release.
    return f'job="stream",namespace="{namespace}",release="{release}"'


@pytest.fixture(scope="module")
def rule_files(render, tmp_path_factory):
    """(directory, names): each release's rendered rules, written as a rules file."""
    out = tmp_path_factory.mktemp("rules")
    names = []
    for release, namespace in RELEASES:
        docs = render([DEFAULT], values={"prometheusRule": {"enabled": True}}, release=release, namespace=namespace)
        rule = one(docs, "PrometheusRule")
        path = out / f"{namespace}-{release}.yaml"
        path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
        names.append(path.name)
    return out, names


def promtool_test(rule_files: list[str], tests: list[dict], directory) -> subprocess.CompletedProcess:
    promtool = require_tool("promtool")
    (directory / "scoping_test.yaml").write_text(yaml.safe_dump(
        {"rule_files": rule_files, "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", "scoping_test.yaml"], cwd=directory, capture_output=True,
                          text=True, timeout=120, check=False)


def alerts(directory, rule_file: str, name: str, labels: dict, value: str | None = None) -> list[dict]:
    """The alert `name` as promtool must see it: `labels`, and the annotations of `rule_file`'s rule with the
    labels (and `value`, already humanized) filled in."""
    spec = yaml.safe_load((directory / rule_file).read_text())
    [rule] = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == name]
    annotations = {}
    for key, text in rule["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        if value is not None:
            text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
        annotations[key] = text
    return [{"exp_labels": {"severity": rule["labels"]["severity"], **labels}, "exp_annotations": annotations}]


def test_rendered_rules_are_scoped_to_their_release(rule_files):
    directory, rule_files = rule_files
    a_file, b_file, _ = rule_files
    a, b, staging = (scope(*r) for r in RELEASES)
    series = [
        # stream-a in prod and stream-a in staging are scraped; stream-b in prod is gone (no target at all).
        {"series": f"up{{{a},pod=\"stream-a-1\",instance=\"10.0.0.1:9090\"}}", "values": "1x30"},
        {"series": f"stream_build_info{{{a},pod=\"stream-a-1\",version=\"0.2.0\"}}", "values": "1x30"},
        {"series": f"up{{{staging},pod=\"stream-a-9\",instance=\"10.1.0.1:9090\"}}", "values": "1x30"},
        {"series": f"stream_build_info{{{staging},pod=\"stream-a-9\",version=\"0.2.0\"}}", "values": "1x30"},
        # Lag on the same topic in prod: stream-a's grows, stream-b's was large and steady (before it went).
        {"series": f"stream_consumer_lag{{{a},pod=\"stream-a-1\",topic=\"samples\",partition=\"0\"}}",
         "values": "0+100x30"},
        {"series": f"stream_consumer_lag{{{b},pod=\"stream-b-1\",topic=\"samples\",partition=\"0\"}}",
         "values": "5000x30"},
        # kube-state-metrics: a stream-a pod in prod is not ready; pods of the others are.
        {"series": 'kube_pod_status_ready{namespace="prod",pod="stream-a-7d9f8b6c5d-abcde",condition="true"}',
         "values": "0x30"},
        {"series": 'kube_pod_status_ready{namespace="prod",pod="stream-b-7d9f8b6c5d-abcde",condition="true"}',
         "values": "1x30"},
        {"series": 'kube_pod_status_ready{namespace="staging",pod="stream-a-7d9f8b6c5d-fghij",condition="true"}',
         "values": "1x30"},
    ]
    lag_a = {"job": "stream", "namespace": "prod", "release": "stream-a", "topic": "samples"}
    tests = [{
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [{
            "expr": 'stream:consumer_lag:sum{namespace="prod"}',
            "eval_time": "10m",
            # Each release's own sum: the lag of two releases in one namespace is not merged.
            "exp_samples": [
                {"labels": 'stream:consumer_lag:sum{job="stream",namespace="prod",release="stream-a",'
                           'topic="samples"}', "value": 1000},
                {"labels": 'stream:consumer_lag:sum{job="stream",namespace="prod",release="stream-b",'
                           'topic="samples"}', "value": 5000},
            ],
        }],
        "alert_rule_test": [
            # Only the release that is gone, although the others (one of the same name) are scraped; once.
            {"eval_time": "15m", "alertname": "StreamMetricsAbsent", "exp_alerts": alerts(
                directory, b_file, "StreamMetricsAbsent",
                {"job": "stream", "namespace": "prod", "release": "stream-b"})},
            {"eval_time": "15m", "alertname": "StreamServiceMetricsAbsent", "exp_alerts": alerts(
                directory, b_file, "StreamServiceMetricsAbsent",
                {"job": "stream", "namespace": "prod", "release": "stream-b"})},
            # stream-a's lag grows; stream-b's does not, and the two are not added up. Once, not once a release.
            {"eval_time": "29m", "alertname": "StreamConsumerLagGrowing", "exp_alerts": alerts(
                directory, a_file, "StreamConsumerLagGrowing", lag_a, "2.9k")},
            # The pod is stream-a's in prod: only that release's rules see it.
            {"eval_time": "20m", "alertname": "StreamPodsNotReady", "exp_alerts": alerts(
                directory, a_file, "StreamPodsNotReady",
                {"namespace": "prod", "pod": "stream-a-7d9f8b6c5d-abcde"})},
        ],
    }]
    result = promtool_test(rule_files, tests, directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unscoped_rules_would_merge_and_miss(rule_files):
    """The same situation with the plain file's generic rules (job="stream" only): no absent alert fires,
    which is why the chart scopes them (the check that the test above is not vacuous)."""
    directory, _ = rule_files
    (directory / "generic.yaml").write_text((chart.CHART / "files" / "alerts.yaml").read_text())
    tests = [{
        "interval": "1m",
        "input_series": [
            {"series": f"up{{{scope('stream-a', 'staging')}}}", "values": "1x30"},
            {"series": f"stream_build_info{{{scope('stream-a', 'staging')}}}", "values": "1x30"},
        ],
        "alert_rule_test": [{"eval_time": "15m", "alertname": "StreamMetricsAbsent", "exp_alerts": []}],
    }]
    result = promtool_test(["generic.yaml"], tests, directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_monitors_label_every_series_with_the_release(render):
    values = {"metrics": {"serviceMonitor": {"enabled": True, "relabelings": [{"targetLabel": "x",
                                                                                "replacement": "y"}]}}}
    monitor = one(render([DEFAULT], values=values, release="stream-b"), "ServiceMonitor")["spec"]
    relabelings = monitor["endpoints"][0]["relabelings"]
    assert relabelings[0] == {"action": "replace", "targetLabel": "release", "replacement": "stream-b"}
    assert relabelings[1] == {"targetLabel": "x", "replacement": "y"}  # the user's come after
    monitor = one(render([DEFAULT], values={"metrics": {"podMonitor": {"enabled": True}}}, release="stream-b"),
                  "PodMonitor")["spec"]
    assert monitor["podMetricsEndpoints"][0]["relabelings"] == [
        {"action": "replace", "targetLabel": "release", "replacement": "stream-b"}]


def test_rendered_rules_select_only_their_release(render):
    docs = render([DEFAULT], values={"prometheusRule": {"enabled": True}}, release="stream-b", namespace="staging")
    rule = one(docs, "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            expr = r["expr"]
            if "job=" in expr:
                assert 'job="stream",namespace="staging",release="stream-b"' in expr, r.get("alert") or r["record"]
                assert expr.count("job=") == expr.count('release="stream-b"'), r.get("alert") or r["record"]
            if "kube_" in expr:
                assert 'namespace="staging",pod=~"stream-b-[a-z0-9]+-[a-z0-9]+"' in expr, r["alert"]
            # Recorded series are read back scoped too: another release's recording would otherwise be seen.
            for name in set(re.findall(r"stream:[a-z_0-9]+:[a-z0-9_]+(?=[{\[ ]|$)", expr)):
                assert f'{name}{{job="stream",namespace="staging"' in expr, (r.get("alert"), name)
