"""Alert rules, the Grafana dashboard and the custom resources: one source each, real metric names only."""

from __future__ import annotations

import json
import re

import pytest

yaml = pytest.importorskip("yaml", reason="needs PyYAML (.ci/deploy-checks installs it)")

from stream.metrics import Metrics  # noqa: E402
from tests.deploy import chart  # noqa: E402
from tests.deploy.chart import ROOT, one  # noqa: E402

RULES = chart.CHART / "files" / "alerts.yaml"
DEPLOY_RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = chart.CHART / "files" / "dashboard.json"
DEPLOY_DASHBOARD = ROOT / "deploy" / "grafana" / "stream.json"
KEDA = chart.CHART / "ci" / "keda-values.yaml"

# Metrics the alerts and the dashboard may use before stream/metrics.py has them. Empty: since the
# "Operations" issue landed (stream_consumer_lag), every metric they use exists.
COMING_METRICS: set[str] = set()


def exposed_metric_names() -> set[str]:
    """Every series name the service exposes, with the suffixes Prometheus adds."""
    suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count"), "info": ("_info",),
                "gauge": ("",)}
    names = set()
    # A family with labels has no samples until it is used: derive the names from its type.
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def referenced_metrics(text: str) -> set[str]:
    # Recording rules are named stream:...; metrics stream_...
    return set(re.findall(r"\bstream_[a-z0-9_]+", text))


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


# --- rules --------------------------------------------------------------------------------------------

def test_deploy_rules_are_the_charts_rules():
    assert DEPLOY_RULES.read_bytes() == RULES.read_bytes()
    # One file, not two copies that can drift: deploy/prometheus/alerts.yaml links to the chart's.
    assert DEPLOY_RULES.is_symlink()
    assert DEPLOY_RULES.resolve() == RULES.resolve()


def scoped(text: str, name: str = "stream", namespace: str = "prod", release: str = "stream",
           fullname: str = "stream") -> str:
    """files/alerts.yaml as the chart renders it for a release (templates/prometheusrule.yaml)."""
    return (text.replace('job="stream"', f'job="{name}",namespace="{namespace}",release="{release}"')
            .replace('pod=~"stream-[a-z0-9]+-[a-z0-9]+"',
                     f'namespace="{namespace}",pod=~"{f"{fullname}-"[:58]}[a-z0-9-]+"')
            .replace('owner_name=~"stream-[a-z0-9]+"', f'namespace="{namespace}",owner_name=~"{fullname}-[a-z0-9]+"')
            .replace('deployment="stream"', f'namespace="{namespace}",deployment="{fullname}"'))


def test_prometheus_rule_carries_the_rules_file(render):
    rule = one(render([KEDA]), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(scoped(RULES.read_text()))
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_follows_the_job_name(render):
    renamed = one(render([KEDA], {"nameOverride": "samples-sync"}), "PrometheusRule")
    text = json.dumps(renamed["spec"])
    assert 'job=\\"samples-sync\\"' in text
    assert 'job=\\"stream\\"' not in text
    assert renamed["spec"] == yaml.safe_load(scoped(RULES.read_text(), name="samples-sync",
                                                    fullname="stream-samples-sync"))


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_has_a_runbook_section():
    runbook = ROOT / "docs" / "runbook.md"
    anchors = {"docs/runbook.md#" + re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in runbook.read_text().splitlines() if line.startswith("## ")}
    for name, rule in alert_rules().items():
        url = rule["annotations"].get("runbook_url")
        assert url == f"docs/runbook.md#{name.lower()}", name
        assert url in anchors, f"{name}: docs/runbook.md has no section for {url}"


def test_runbook_base_url_makes_full_links(render):
    base = "https://github.com/example/stream/blob/main/docs/runbook.md"
    rule = one(render([KEDA], {"prometheusRule": {"runbookBaseUrl": base}}), "PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith(base + "#stream") for u in urls)


def test_rules_cover_the_alerts_issue():
    """Issue 15, item 6: the alerts that were missing, and crash loops that page."""
    alerts = alert_rules()
    exprs = {name: rule["expr"] for name, rule in alerts.items()}
    assert "stream_fetch_paused" in exprs["StreamFetchPausedLong"]
    assert "stream_oldest_retry_seconds" in exprs["StreamBatchesRetryingLong"]
    assert 'result="failed"' in exprs["StreamCommitsFailing"]
    assert "stream_rebalances_total" in exprs["StreamRebalancingOften"]
    assert "stream_end_to_end_latency_seconds_bucket" in exprs["StreamEndToEndLatencyHigh"]
    assert "kube_pod_status_ready" in exprs["StreamPodsNotReady"]
    assert "process_resident_memory_bytes" in exprs["StreamMemoryNearLimit"]
    assert 'resource="memory"' in exprs["StreamMemoryNearLimit"]
    assert 'reason="OOMKilled"' in exprs["StreamOOMKilled"]
    assert "time() -" in exprs["StreamNoProgress"] and "offset 1d" in exprs["StreamNoProgress"]
    assert alerts["StreamPodCrashLooping"]["labels"]["severity"] == "critical"
    # Samples over samples (item 5).
    assert "stream_records_consumed_total" not in exprs["StreamDeadLetterRateHigh"]
    assert exprs["StreamDeadLetterRateHigh"].count("stream_samples_total") == 2


def test_rules_are_grouped_by_release():
    """Issue 15, item 2: every aggregation keeps the release apart."""
    for name, rule in alert_rules().items():
        for by in re.findall(r"\b(?:by|on) \(([^)]*)\)", rule["expr"]):
            labels = {x.strip() for x in by.split(",")}
            # (namespace) alone: a join with the release's Deployment (kube_deployment_*{deployment=...}).
            deployment = labels == {"namespace"} and re.search(r"kube_deployment_\w+\{deployment=", rule["expr"])
            assert "release" in labels or labels >= {"namespace", "pod"} or deployment, (name, by)


def test_rules_use_only_metrics_the_service_exposes():
    unknown = referenced_metrics(RULES.read_text()) - exposed_metric_names() - COMING_METRICS
    assert not unknown, f"alerts.yaml uses metrics stream/metrics.py does not define: {sorted(unknown)}"


def test_rules_cover_the_operations_issue():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    exprs = {name: rule["expr"] for name, rule in alerts.items()}
    assert "deriv(stream:consumer_lag:sum" in exprs["StreamConsumerLagGrowing"]
    assert "stream_last_commit_timestamp_seconds" in exprs["StreamCommitsStalled"]
    assert "stream_consumer_lag" in exprs["StreamCommitsStalled"]
    # Multiwindow burn rate: a long and a short window at each threshold.
    assert {"rate1h", "rate5m", "rate6h", "rate30m"} <= set(re.findall(r"rate\d+[mhd]",
                                                                      exprs["StreamBatchFailureBudgetBurn"]))
    assert "stream_api_auth_failure" in exprs["StreamApiAuthFailure"]
    assert 'stream_samples_total{job="stream",outcome="dead_lettered"}' in exprs["StreamDeadLetterRateHigh"]
    assert "absent(up" in exprs["StreamMetricsAbsent"]
    assert "absent(stream_" in exprs["StreamServiceMetricsAbsent"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_page_on_a_refusal_storm():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    storm = alerts["StreamApiRefusalStorm"]
    assert "stream_api_refusal_storm" in storm["expr"]
    assert storm["labels"]["severity"] == "critical"  # it pages
    assert "STREAM_REFUSAL_STORM_GUARD" in storm["annotations"]["description"]


# --- dashboard -----------------------------------------------------------------------------------------

def test_deploy_dashboard_is_the_charts_dashboard():
    assert DEPLOY_DASHBOARD.read_bytes() == DASHBOARD.read_bytes()
    assert DEPLOY_DASHBOARD.is_symlink()


def test_dashboard_has_a_datasource_variable_and_no_hard_coded_uid():
    dashboard = json.loads(DEPLOY_DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    references = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "uid":
                    references.append((path, value))
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(dashboard, "$")
    # The dashboard's own uid ($.uid) is fixed on purpose (stable links); every datasource reference is the variable.
    hard_coded = [(path, uid) for path, uid in references
                  if path != "$" and uid not in ("${datasource}", "$datasource")]
    assert not hard_coded, f"hard-coded uids: {hard_coded}"
    assert references, "panels name no datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_dashboard_shows_what_the_issue_asks_for():
    exprs = "\n".join(dashboard_exprs(json.loads(DASHBOARD.read_text())))
    for needed in (
        "stream_records_consumed_total",  # throughput
        "stream_batches_total",  # batches by outcome
        "histogram_quantile(0.5, sum by (le) (rate(stream_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(stream_request_duration_seconds_bucket",
        "stream_consumer_lag",
        "stream_buffered_samples",
        "stream_dead_letters_total",
        "histogram_quantile(0.99, sum by (le) (rate(stream_end_to_end_latency_seconds_bucket",
    ):
        assert needed in exprs, needed


def test_dashboard_shows_the_refusal_storm():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    exprs = "\n".join(t["expr"] for t in panels["Refusal storm and refused share"]["targets"])
    assert "stream_api_refusal_storm" in exprs
    assert "stream_api_refused_share" in exprs


def test_dashboard_panels_do_not_overlap():
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        taken |= cells
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_only_metrics_the_service_exposes():
    text = "\n".join(dashboard_exprs(json.loads(DASHBOARD.read_text())))
    unknown = referenced_metrics(text) - exposed_metric_names() - COMING_METRICS
    assert not unknown, f"the dashboard uses metrics stream/metrics.py does not define: {sorted(unknown)}"


def test_dashboard_configmap_carries_the_dashboard(render):
    configmap = next(d for d in render([KEDA]) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(
        "-dashboard"))
    assert json.loads(configmap["data"]["stream.json"]) == json.loads(DASHBOARD.read_text())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- custom resources -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_custom_resources_fit_their_crds(ci_renders, name):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    from tests.deploy import crds

    _, custom = chart.split(ci_renders[name])
    for doc in custom:
        try:
            crds.validate(doc)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")


def test_crd_schemas_catch_a_misplaced_field(ci_renders):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    from tests.deploy import crds

    scaled = json.loads(json.dumps(one(ci_renders["keda-values"], "ScaledObject")))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        crds.validate(scaled)
    scaled = json.loads(json.dumps(one(ci_renders["keda-values"], "ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5000  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        crds.validate(scaled)
