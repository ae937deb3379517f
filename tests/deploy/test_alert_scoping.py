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
# The rules with the ServiceMonitor that adds the release label they select by (the render fails without).
RULES = {"prometheusRule": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}}


def scope(release: str, namespace: str) -> str:
    # What the chart's ServiceMonitor/PodMonitor put on every series: job, namespace, release.
    return f'job="stream",namespace="{namespace}",release="{release}"'


@pytest.fixture(scope="module")
def rule_files(render, tmp_path_factory):
    """(directory, names): each release's rendered rules, written as a rules file."""
    out = tmp_path_factory.mktemp("rules")
    names = []
    for release, namespace in RELEASES:
        docs = render([DEFAULT], values=RULES, release=release, namespace=namespace)
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


def pod_series(namespace: str, pod: str, replicaset: str, phase: str = "Running") -> list[dict]:
    """kube-state-metrics: the pod's phase and its owner."""
    return [
        {"series": f'kube_pod_status_phase{{namespace="{namespace}",pod="{pod}",phase="{phase}"}}', "values": "1x30"},
        {"series": f'kube_pod_owner{{namespace="{namespace}",pod="{pod}",owner_kind="ReplicaSet",'
                   f'owner_name="{replicaset}",owner_is_controller="true"}}', "values": "1x30"},
    ]


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
        *pod_series("prod", "stream-a-7d9f8b6c5d-abcde", "stream-a-7d9f8b6c5d"),
        *pod_series("prod", "stream-b-7d9f8b6c5d-abcde", "stream-b-7d9f8b6c5d"),
        *pod_series("staging", "stream-a-7d9f8b6c5d-fghij", "stream-a-7d9f8b6c5d"),
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
    }, {
        # The generic alert itself works: with nothing scraped at all it fires (so its silence above is the
        # merging, not a broken rule).
        "interval": "1m",
        "input_series": [{"series": 'up{job="other"}', "values": "1x30"}],
        "alert_rule_test": [{"eval_time": "15m", "alertname": "StreamMetricsAbsent", "exp_alerts": alerts(
            directory, "generic.yaml", "StreamMetricsAbsent", {"job": "stream"})}],
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


# --- Every selector of every expression ------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>[0-9][0-9.]*(?:e[+-]?[0-9]+)?(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>==|!=|=~|!~|>=|<=|[-+*/%^(){},=<>])
""", re.VERBOSE)
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                 "quantile"}
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def selectors(expr: str) -> list[tuple[str | None, dict[str, tuple[str, str]]]]:
    """Every vector selector of a PromQL expression: (metric name or None, {label: (operator, value)})."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot read {expr[pos:pos + 30]!r} in {expr!r}"
        pos = match.end()
        if match.lastgroup not in ("ws", "comment"):
            tokens.append((match.lastgroup, match.group()))
    found, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in _LABEL_LISTS:
            if following == "(":  # a label list: skip it
                i = next(j for j in range(i + 1, len(tokens)) if tokens[j][1] == ")")
            i += 1
            continue
        if kind == "ident" and (text in _AGGREGATIONS or text.lower() in _KEYWORDS or following == "("):
            i += 1  # an aggregation, a keyword or a function call
            continue
        if (kind == "ident") or (kind == "punct" and text == "{"):
            name = text if kind == "ident" else None
            matchers: dict[str, tuple[str, str]] = {}
            j = i + 1 if kind == "ident" else i
            if j < len(tokens) and tokens[j][1] == "{":
                j += 1
                while tokens[j][1] != "}":
                    label, op, value = tokens[j][1], tokens[j + 1][1], tokens[j + 2][1]
                    assert label not in matchers, f"{label} twice in a selector of {expr!r}"
                    matchers[label] = (op, value[1:-1].encode().decode("unicode_escape"))
                    j += 3
                    if tokens[j][1] == ",":
                        j += 1
                i = j
            found.append((name, matchers))
        i += 1
    return found


def quote_meta(text: str) -> str:
    """Go's regexp.QuoteMeta (helm's regexQuoteMeta): Python's re.escape also escapes "-"."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def scoping_errors(spec: dict, release: str, namespace: str, fullname: str) -> list[tuple[str, str]]:
    """(rule, what) of what is not scoped to the release in a rules file: each selector must carry its job,
    namespace and release, or be a kube-state-metrics selector of the namespace and the release's pods (by
    owner ReplicaSet <fullname>-<hash>, or a first cut by pod name joined with a series of the release) or
    Deployment."""
    errors = []
    pod_prefix = quote_meta(f"{fullname}-"[:58])
    for group in spec["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            found = selectors(rule["expr"])
            assert found, name
            release_scoped = owner_scoped = False
            for metric, m in found:
                where = f"{name}: {metric}{m}"
                if metric is None:
                    errors.append((name, f"{where}: a selector without a metric name"))
                elif metric.startswith("kube_"):
                    if m.get("namespace") != ("=", namespace):
                        errors.append((name, f"{where}: no namespace"))
                    if metric == "kube_pod_owner":
                        owner_scoped = m.get("owner_name") == ("=~", f"{quote_meta(fullname)}-[a-z0-9]+")
                        if not owner_scoped or m.get("owner_kind") != ("=", "ReplicaSet"):
                            errors.append((name, f"{where}: not the release's ReplicaSets"))
                    elif metric.startswith("kube_deployment_"):
                        if m.get("deployment") != ("=", fullname):
                            errors.append((name, f"{where}: not the release's Deployment"))
                    elif m.get("pod") != ("=~", f"{pod_prefix}[a-z0-9-]+"):
                        errors.append((name, f"{where}: not the release's pod names"))
                else:
                    scoped = all(m.get(k) == ("=", v) for k, v in
                                 {"job": "stream", "namespace": namespace, "release": release}.items())
                    release_scoped |= scoped
                    if not scoped:
                        errors.append((name, f"{where}: no job, namespace and release"))
            # A pod name prefix is a first cut: fullname-b's pods begin with fullname-. The release's pods are those
            # its ReplicaSets own, or those a series of the release names.
            pod_only = [metric for metric, m in found if metric and metric.startswith("kube_pod_") and "pod" in m]
            if pod_only and not (owner_scoped or release_scoped):
                errors.append((name, "pods by name only, not joined with kube_pod_owner or a series of the release"))
    return errors


def test_the_selector_reader_reads_every_selector():
    expr = ('sum by (namespace, pod) (increase(a_total{job="stream",x=~"y|z"}[1h] offset 1d)) / on (namespace) '
            'group_left max(b) > 2 * count without (pod) (c{d!="e"}) unless absent({__name__="f"}) and time() > 0')
    assert selectors(expr) == [("a_total", {"job": ("=", "stream"), "x": ("=~", "y|z")}), ("b", {}),
                               ("c", {"d": ("!=", "e")}), (None, {"__name__": ("=", "f")})]


def test_rendered_rules_select_only_their_release(render):
    docs = render([DEFAULT], values=RULES, release="stream-b", namespace="staging")
    spec = one(docs, "PrometheusRule")["spec"]
    assert scoping_errors(spec, "stream-b", "staging", "stream-b") == []
    metrics = {metric for g in spec["groups"] for r in g["rules"] for metric, _ in selectors(r["expr"])}
    assert {"up", "stream_build_info", "stream:consumer_lag:sum", "kube_pod_owner", "kube_pod_status_phase",
            "kube_deployment_spec_replicas", "process_resident_memory_bytes"} <= metrics
    # Not vacuous: the generic file's selectors are all reported.
    generic = yaml.safe_load((chart.CHART / "files" / "alerts.yaml").read_text())
    errors = scoping_errors(generic, "stream-b", "staging", "stream-b")
    rules = [r.get("alert") or r["record"] for g in generic["groups"] for r in g["rules"]]
    assert {rule for rule, _ in errors} == set(rules)


# A fullname long enough for Kubernetes to cut the pods' names: the ReplicaSet is <fullname>-<hash>, its pods'
# generated names keep the first 58 characters of "<fullname>-<hash>-" and add 5 random ones.
LONG = "samples-sync-eu-west-1-production-stream-consumer-blue"


def pod_name(replicaset: str, suffix: str = "abcde") -> str:
    return f"{replicaset}-"[:58] + suffix


def test_pods_of_a_long_fullname_are_seen(render, tmp_path):
    assert len(LONG) + len("-7d9f8b6c5d-") > 58
    rules = []
    for release, fullname in (("blue", LONG), ("blue-b", f"{LONG}-b")):
        docs = render([DEFAULT], values={**RULES, "fullnameOverride": fullname}, release=release, namespace="prod")
        spec = one(docs, "PrometheusRule")["spec"]
        assert scoping_errors(spec, release, "prod", fullname) == []
        (tmp_path / f"{release}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        rules.append(f"{release}.yaml")
    pod = pod_name(f"{LONG}-7d9f8b6c5d")  # <LONG>-7dabcde: not <fullname>-<hash>-<random>
    other = pod_name(f"{LONG}-b-7d9f8b6c5d")  # blue-b's: begins with <LONG>- too
    series = []
    for name, replicaset in ((pod, f"{LONG}-7d9f8b6c5d"), (other, f"{LONG}-b-7d9f8b6c5d")):
        series += [{"series": f'kube_pod_status_ready{{namespace="prod",pod="{name}",condition="true"}}',
                    "values": "0x30"}, *pod_series("prod", name, replicaset)]
    tests = [{"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "20m", "alertname": "StreamPodsNotReady", "exp_alerts": [
            *alerts(tmp_path, "blue.yaml", "StreamPodsNotReady", {"namespace": "prod", "pod": pod}),
            *alerts(tmp_path, "blue-b.yaml", "StreamPodsNotReady", {"namespace": "prod", "pod": other})]}]}]
    result = promtool_test(rules, tests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_need_the_release_label(render, render_error):
    error = render_error([DEFAULT], values={"prometheusRule": {"enabled": True}})
    assert "prometheusRule.enabled needs metrics.serviceMonitor.enabled or metrics.podMonitor.enabled" in error.stderr
    assert "prometheusRule.releaseLabelFromScrapeConfig=true" in error.stderr
    for values in ({"metrics": {"podMonitor": {"enabled": True}}}, {"metrics": {"serviceMonitor": {"enabled": True}}},
                   {"prometheusRule": {"enabled": True, "releaseLabelFromScrapeConfig": True}}):
        values = {**values, "prometheusRule": {"enabled": True, **values.get("prometheusRule", {})}}
        one(render([DEFAULT], values=values), "PrometheusRule")
