"""The Helm chart, rendered by the real helm binary: what an operator relies on when it runs in a cluster."""

from __future__ import annotations

import posixpath

import pytest

pytest.importorskip("yaml", reason="needs PyYAML (.ci/deploy-checks installs it)")

import yaml

from stream import config
from tests.deploy import chart
from tests.deploy.chart import container, environment, find, one

TOKEN = {"secret": {"apiToken": "t0ken"}}
DEFAULT = chart.CHART / "ci" / "default-values.yaml"
KEDA = chart.CHART / "ci" / "keda-values.yaml"
SASL_SSL = chart.CHART / "ci" / "sasl-ssl-values.yaml"
EXISTING_SECRET = chart.CHART / "ci" / "networkpolicy-existingsecret-values.yaml"

# The Kafka security settings of the "Operations" issue, which the chart set before the service read them.
# Exactly these may be missing from stream.config.Settings (they are there now); any other STREAM_* name
# the chart sets that Settings lacks is a typo.
COMING = {
    "STREAM_KAFKA_SECURITY_PROTOCOL",
    "STREAM_KAFKA_SASL_MECHANISM",
    "STREAM_KAFKA_SASL_USERNAME",
    "STREAM_KAFKA_SASL_PASSWORD_FILE",
    "STREAM_KAFKA_SSL_CAFILE",
    "STREAM_KAFKA_SSL_CERTFILE",
    "STREAM_KAFKA_SSL_KEYFILE",
}
SETTINGS = {config.env_name(field) for field in config.Settings.__struct_fields__}


def pod_spec(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def annotations(docs):
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def mounted_file(docs, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path`, mounted as a whole Secret volume (no subPath)."""
    spec = pod_spec(docs)
    mounts = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == posixpath.dirname(path)]
    assert len(mounts) == 1, f"no volume is mounted at {posixpath.dirname(path)}"
    mount = mounts[0]
    # A subPath mount is never updated by the kubelet: a rotated Secret would need a restart.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
    return volume["secret"]["secretName"], items[posixpath.basename(path)]


# --- every CI values file --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_every_stream_variable_the_chart_sets_is_a_setting(ci_renders, name):
    names = {n for n in environment(ci_renders[name]) if n.startswith("STREAM_")}
    unknown = names - SETTINGS - COMING
    assert not unknown, f"the chart sets variables stream.config.Settings does not have: {sorted(unknown)}"


def test_only_the_seven_kafka_security_settings_are_allowed_as_coming():
    assert len(COMING) == 7
    # Once the service has them they are plain settings; the allowance then only shrinks.
    assert all(name.startswith("STREAM_KAFKA_S") for name in COMING)


@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_the_service_accepts_the_rendered_settings(ci_renders, name):
    env = {k: v for k, v in environment(ci_renders[name]).items() if k in SETTINGS}
    config.load(env)  # raises ConfigError naming the variable (e.g. an integer rendered as 1e+06)


def test_chart_defaults_are_the_service_defaults(render):
    loaded = config.load({k: v for k, v in environment(render([DEFAULT])).items() if k in SETTINGS})
    defaults = config.Settings()
    # The bootstrap servers have no useful default in a cluster; the token file is the chart's mount.
    differ = {"kafka_bootstrap_servers", "api_token_file"}
    for field in config.Settings.__struct_fields__:
        if field not in differ:
            assert getattr(loaded, field) == getattr(defaults, field), config.env_name(field)


@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_only_known_kinds_are_rendered(ci_renders, name):
    chart.split(ci_renders[name])


# --- rollout -----------------------------------------------------------------------------------------

def test_config_checksum_changes_when_a_setting_changes(render):
    before = annotations(render([DEFAULT]))
    after = annotations(render([DEFAULT], {"config": {"batchWindowSeconds": 7}}))
    assert after["checksum/config"] != before["checksum/config"]


def test_no_credential_rotation_rolls_the_pods(render):
    # The API token is re-read from its file, and a changed Kafka password, CA or client certificate file
    # rebuilds the Kafka clients in the process: a new credential must not roll every pod (each pod replaced
    # costs the group two rebalances).
    sasl = {"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"username": "u"},
                      "tls": {"caSecret": {"name": "ca"}, "clientCertSecret": {"name": "client"}}}}
    before = one(render([DEFAULT], {**sasl, "secret": {"apiToken": "a", "kafkaSaslPassword": "pw"}}), "Deployment")
    after = one(render([DEFAULT], {**sasl, "secret": {"apiToken": "b", "kafkaSaslPassword": "pw2"}}), "Deployment")
    assert after["spec"]["template"] == before["spec"]["template"]
    # The files are whole Secret volumes (never subPath, which the kubelet does not update in place).
    mounts = after["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts and not any("subPath" in m for m in mounts)


def test_pointing_at_another_secret_rolls_the_pods(render):
    one_secret = one(render(values={"existingSecret": "a"}), "Deployment")["spec"]["template"]
    other_secret = one(render(values={"existingSecret": "b"}), "Deployment")["spec"]["template"]
    assert one_secret != other_secret


def test_a_chart_version_bump_alone_does_not_roll_the_pods(render):
    # The pod template carries no chart version (helm.sh/chart): only the Deployment's own labels do.
    deployment = one(render([DEFAULT]), "Deployment")
    assert "helm.sh/chart" in deployment["metadata"]["labels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in pod_labels
    assert pod_labels["app.kubernetes.io/instance"] and pod_labels["app.kubernetes.io/name"]


def test_a_new_pod_stays_ready_a_while_before_the_next_one_is_replaced(render):
    assert one(render([DEFAULT]), "Deployment")["spec"]["minReadySeconds"] == 15
    assert one(render([DEFAULT], {"minReadySeconds": 0}), "Deployment")["spec"]["minReadySeconds"] == 0


def test_checksums_are_stable(render):
    assert annotations(render([DEFAULT])) == annotations(render([DEFAULT]))


def test_replicas_set_without_keda_and_absent_with_it(render):
    assert one(render([DEFAULT]), "Deployment")["spec"]["replicas"] == 2
    docs = render([KEDA])
    assert "replicas" not in one(docs, "Deployment")["spec"]
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] == 12


def test_keda_scales_in_small_steps_that_each_cost_one_rebalance(render):
    # The HPA's default (+100 % or +4 pods every 15 s) would rebalance the whole group every 15 s while it grows.
    behavior = one(render([KEDA]), "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 60  # a burst of lag does not scale
    assert all(p["type"] == "Pods" and p["periodSeconds"] >= 60 for p in behavior["scaleUp"]["policies"])
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_keda_triggers_use_the_services_group_and_topics(ci_renders):
    for name in ("keda-values", "sasl-ssl-values"):
        docs = ci_renders[name]
        env = environment(docs)
        triggers = one(docs, "ScaledObject")["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        assert [t["metadata"]["topic"] for t in triggers] == env["STREAM_KAFKA_TOPICS"].split(",")
        for trigger in triggers:
            assert trigger["metadata"]["consumerGroup"] == env["STREAM_KAFKA_GROUP_ID"]
            assert trigger["metadata"]["bootstrapServers"] == env["STREAM_KAFKA_BOOTSTRAP_SERVERS"]
            assert trigger["metadata"]["allowIdleConsumers"] == "false"


def test_render_fails_when_keda_max_replicas_exceed_the_partitions(render, render_error):
    error = render_error([KEDA], {"keda": {"maxReplicas": 13}})
    assert error.returncode != 0
    assert "keda.maxReplicas (13) exceeds kafka.topicPartitions (12)" in error.stderr
    # Exactly as many replicas as partitions is fine.
    assert one(render([KEDA], {"keda": {"maxReplicas": 12}}), "ScaledObject")["spec"]["maxReplicaCount"] == 12


def test_render_fails_when_keda_has_no_partition_count(render_error):
    error = render_error([DEFAULT], {"keda": {"enabled": True}})
    assert "keda.enabled needs kafka.topicPartitions" in error.stderr


def test_render_fails_when_replicas_exceed_known_partitions(render, render_error):
    error = render_error([DEFAULT], {"replicaCount": 4, "kafka": {"topicPartitions": 3}})
    assert "replicaCount (4) exceeds kafka.topicPartitions (3)" in error.stderr
    render([DEFAULT], {"replicaCount": 3, "kafka": {"topicPartitions": 3}})


def test_grace_period_covers_the_drain_the_final_commit_and_a_margin(ci_renders, render, render_error):
    # The whole stop: the drain, then the final commit (bounded by stream.config.COMMIT_TIMEOUT_SECONDS),
    # then leaving the group and flushing the producer (5 s each, side by side): drain + 10 + 5 at least.
    minimum_over_drain = int(config.COMMIT_TIMEOUT_SECONDS) + 5
    for docs in ci_renders.values():
        drain = float(environment(docs)["STREAM_DRAIN_TIMEOUT_SECONDS"])
        assert pod_spec(docs)["terminationGracePeriodSeconds"] >= drain + minimum_over_drain
    assert pod_spec(render([DEFAULT]))["terminationGracePeriodSeconds"] == 45  # 30 s drain + 10 + 5
    assert pod_spec(render([DEFAULT], {"config": {"drainTimeoutSeconds": 100.5}}))[
        "terminationGracePeriodSeconds"] == 116
    assert pod_spec(render([DEFAULT], {"terminationGracePeriodSeconds": 45}))["terminationGracePeriodSeconds"] == 45
    # Passed the old check (above the drain): far too short for the final commit.
    for grace in (31, 44):
        error = render_error([DEFAULT], {"terminationGracePeriodSeconds": grace})
        assert (f"terminationGracePeriodSeconds ({grace}) is below its minimum 45 = config.drainTimeoutSeconds (30)"
                " + the final commit's timeout (10 s) + a margin (5 s)") in error.stderr
    error = render_error([DEFAULT], {"terminationGracePeriodSeconds": 70, "config": {"drainTimeoutSeconds": 60}})
    assert "terminationGracePeriodSeconds (70) is below its minimum 75" in error.stderr


def test_api_timeout_fits_in_the_drain(render, render_error):
    # A request in flight at SIGTERM must be able to finish (or time out) before the drain gives up.
    render([DEFAULT], {"api": {"timeoutSeconds": 30}, "config": {"drainTimeoutSeconds": 30}})
    render([DEFAULT], {"api": {"timeoutSeconds": 50}, "config": {"drainTimeoutSeconds": 60}})
    error = render_error([DEFAULT], {"api": {"timeoutSeconds": 31}})
    assert "api.timeoutSeconds (31) exceeds config.drainTimeoutSeconds (30)" in error.stderr
    error = render_error([DEFAULT], {"api": {"timeoutSeconds": 30}, "config": {"drainTimeoutSeconds": 20}})
    assert "api.timeoutSeconds (30) exceeds config.drainTimeoutSeconds (20)" in error.stderr


def test_pdb_lets_unready_pods_be_evicted(render):
    pdb = one(render([DEFAULT]), "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize(
    "rolling",
    [{"maxSurge": 0, "maxUnavailable": 0}, {"maxUnavailable": "0%"}, {"maxSurge": "0%", "maxUnavailable": "0"}],
)
def test_a_rollout_that_can_never_progress_fails_the_render(render_error, rolling):
    error = render_error([DEFAULT], {"strategy": {"rollingUpdate": rolling}})
    assert "are both 0: a rollout could neither add a pod nor take one down" in error.stderr


def test_rollout_strategies_that_progress(render):
    strategy = one(render([DEFAULT]), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    for rolling in ({"maxSurge": 1, "maxUnavailable": 0}, {"maxUnavailable": "10%"}):
        render([DEFAULT], {"strategy": {"rollingUpdate": rolling}})
    recreate = one(render([DEFAULT], {"strategy": {"type": "Recreate", "rollingUpdate": None}}), "Deployment")
    assert recreate["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("max_unavailable", [0, "0%", "00%", "0", "1"])
def test_a_pdb_that_blocks_every_eviction_is_refused(render_error, max_unavailable):
    error = render_error([DEFAULT], {"podDisruptionBudget": {"maxUnavailable": max_unavailable}})
    assert "values don't meet the specifications of the schema" in error.stderr


def test_pdb_percentages(render):
    pdb = one(render([DEFAULT], {"podDisruptionBudget": {"maxUnavailable": "10%"}}), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "10%"


def test_pods_spread_over_zones_and_nodes(render):
    constraints = pod_spec(render([DEFAULT]))["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert "topologySpreadConstraints" not in pod_spec(render([DEFAULT], {"topologySpreadConstraints": []}))


# --- security ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_security_context(ci_renders, name):
    docs = ci_renders[name]
    pod = pod_spec(docs)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["runAsGroup"] == 10001
    assert pod["fsGroup"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(docs)["securityContext"]
    assert c["runAsNonRoot"] is True
    assert c["runAsUser"] == 10001
    assert c["readOnlyRootFilesystem"] is True
    assert c["allowPrivilegeEscalation"] is False
    assert c.get("privileged", False) is False
    assert c["capabilities"] == {"drop": ["ALL"]}
    assert c["seccompProfile"] == {"type": "RuntimeDefault"}
    # The root filesystem is read-only: /tmp is an emptyDir.
    tmp = next(m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod_spec(docs)["volumes"] if v["name"] == tmp["name"])


@pytest.mark.parametrize("name", [p.stem for p in chart.CI_VALUES])
def test_no_service_links_and_no_kubernetes_token(ci_renders, name):
    docs = ci_renders[name]
    assert pod_spec(docs)["enableServiceLinks"] is False
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    for account in find(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_resources_are_set(render):
    resources = container(render([DEFAULT]))["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


# --- credentials -------------------------------------------------------------------------------------

def test_api_token_is_a_mounted_file(render):
    docs = render([DEFAULT])
    env = environment(docs)
    assert "STREAM_API_TOKEN" not in env  # never the value itself in the environment
    secret, key = mounted_file(docs, env["STREAM_API_TOKEN_FILE"])
    chart_secret = one(docs, "Secret")
    assert secret == chart_secret["metadata"]["name"]
    assert key in chart_secret["data"]


def test_existing_secret_is_used_and_none_created(ci_renders):
    docs = ci_renders["networkpolicy-existingsecret-values"]
    assert find(docs, "Secret") == []
    assert mounted_file(docs, environment(docs)["STREAM_API_TOKEN_FILE"]) == ("stream-credentials", "token")


def test_render_fails_without_a_token(render_error):
    assert "the API token is missing" in render_error().stderr


def test_sasl_ssl_credentials_are_mounted_files(ci_renders):
    docs = ci_renders["sasl-ssl-values"]
    env = environment(docs)
    assert env["STREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["STREAM_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["STREAM_KAFKA_SASL_USERNAME"] == "stream"
    assert mounted_file(docs, env["STREAM_KAFKA_SASL_PASSWORD_FILE"]) == ("stream-kafka-user", "password")
    assert mounted_file(docs, env["STREAM_KAFKA_SSL_CAFILE"]) == ("my-cluster-cluster-ca-cert", "ca.crt")
    assert mounted_file(docs, env["STREAM_KAFKA_SSL_CERTFILE"]) == ("stream-kafka-client", "tls.crt")
    assert mounted_file(docs, env["STREAM_KAFKA_SSL_KEYFILE"]) == ("stream-kafka-client", "tls.key")
    # KEDA reads the lag with the same credentials.
    auth = one(docs, "TriggerAuthentication")["spec"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["secretTargetRef"]}
    assert refs == {"password": ("stream-kafka-user", "password"), "ca": ("my-cluster-cluster-ca-cert", "ca.crt"),
                    "cert": ("stream-kafka-client", "tls.crt"), "key": ("stream-kafka-client", "tls.key")}
    assert auth["env"] == [{"parameter": "username", "name": "STREAM_KAFKA_SASL_USERNAME", "containerName": "stream"}]
    for trigger in one(docs, "ScaledObject")["spec"]["triggers"]:
        assert trigger["metadata"]["sasl"] == "scram_sha512"
        assert trigger["metadata"]["tls"] == "enable"
        assert trigger["authenticationRef"]["name"] == one(docs, "TriggerAuthentication")["metadata"]["name"]


def test_sasl_password_from_the_charts_secret(render):
    docs = render([DEFAULT], {"kafka": {"securityProtocol": "SASL_PLAINTEXT", "sasl": {"username": "u"}},
                              "secret": {"kafkaSaslPassword": "pw"}})
    env = environment(docs)
    secret = one(docs, "Secret")
    assert mounted_file(docs, env["STREAM_KAFKA_SASL_PASSWORD_FILE"]) == (secret["metadata"]["name"],
                                                                         "kafka-sasl-password")
    assert "kafka-sasl-password" in secret["data"]
    assert "STREAM_KAFKA_SSL_CAFILE" not in env


def test_plaintext_sets_no_sasl_or_ssl_settings(render):
    env = environment(render([DEFAULT]))
    assert env["STREAM_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert not {n for n in env if n.startswith(("STREAM_KAFKA_SASL_", "STREAM_KAFKA_SSL_"))}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.username"),
        ({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"username": "u"}}}, "needs a password"),
        ({"kafka": {"tls": {"caSecret": {"name": "ca"}}}}, "kafka.tls secrets are set but kafka.securityProtocol"),
        ({"kafka": {"securityProtocol": "SASL_SCRAM"}}, "securityProtocol"),
        ({"kafka": {"sasl": {"mechanism": "GSSAPI"}}}, "mechanism"),
        ({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}, "scraped twice"),
        ({"kafka": {"topics": ["samples.dlq"]}}, "must differ from kafka.topics"),
    ],
)
def test_inconsistent_values_fail_the_render(render_error, values, message):
    assert message in render_error([DEFAULT], values).stderr


# --- the strict values schema --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "values",
    [
        {"replicaCont": 3},
        {"kafka": {"groupID": "x"}},
        {"config": {"batchMaxSamples": 2000}},
        {"config": {"logLevel": "TRACE"}},
        {"metrics": {"port": 0}},
        {"image": {"digest": "latest"}},
        {"networkPolicy": {"metricsFrom": [{"podSelectr": {}}]}},
    ],
)
def test_schema_rejects_unknown_or_bad_values(render_error, values):
    assert "values don't meet the specifications of the schema" in render_error([DEFAULT], values).stderr


# --- metrics, probes, network ------------------------------------------------------------------------

def test_probes_use_the_metrics_port(render):
    docs = render([DEFAULT])
    c = container(docs)
    port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert str(port) == environment(docs)["STREAM_METRICS_PORT"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_metrics_service_scrapes_unready_pods_too(render):
    docs = render([DEFAULT], {"metrics": {"port": 9100}})
    service = one(docs, "Service")
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    assert environment(docs)["STREAM_METRICS_PORT"] == "9100"
    # A release named `stream` must not get a Service called `stream` (STREAM_* variables): belt and braces.
    assert service["metadata"]["name"] != "stream"


def test_service_monitor_selects_the_metrics_service(ci_renders):
    docs = ci_renders["keda-values"]
    monitor = one(docs, "ServiceMonitor")["spec"]
    service = one(docs, "Service")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    # The job label the alert rules select (job="stream").
    assert labels[monitor["jobLabel"]] == "stream"


def test_pod_monitor_selects_the_pods(ci_renders):
    docs = ci_renders["networkpolicy-existingsecret-values"]
    monitor = one(docs, "PodMonitor")["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert pod_labels[monitor["jobLabel"]] == "stream"


def test_network_policy(ci_renders, render):
    assert find(render([DEFAULT]), "NetworkPolicy") == []
    docs = ci_renders["networkpolicy-existingsecret-values"]
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    egress_ports = [{p["port"] for p in rule["ports"]} for rule in policy["egress"]]
    assert egress_ports == [{53}, {9093}, {443}]


CLUSTER_DNS = [{
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}]


def dns_rules(docs: list[dict]) -> list[dict]:
    return [rule for rule in one(docs, "NetworkPolicy")["spec"]["egress"]
            if {p["port"] for p in rule["ports"]} == {53}]


def test_dns_egress_by_default_to_any_destination_on_port_53(render):
    # The default works with every cluster DNS (kube-dns/CoreDNS, NodeLocal DNSCache, GKE Cloud DNS, OpenShift),
    # and is what the chart did before dnsTo existed: an upgrade changes nothing.
    assert yaml.safe_load((chart.CHART / "values.yaml").read_text())["networkPolicy"]["egress"]["dnsTo"] == []
    [dns] = dns_rules(render([DEFAULT], {"networkPolicy": {"enabled": True}}))
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert "to" not in dns


def test_dns_egress_can_be_restricted(ci_renders, render):
    [dns] = dns_rules(ci_renders["networkpolicy-existingsecret-values"])
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    # One peer with both selectors: pods labelled k8s-app=kube-dns *in* kube-system, not either of them.
    assert dns["to"] == CLUSTER_DNS
    # Another DNS (NodeLocal DNSCache); or no DNS rule at all.
    local = [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    [rule] = dns_rules(render([DEFAULT], {"networkPolicy": {"enabled": True, "egress": {"dnsTo": local}}}))
    assert rule["to"] == local
    docs = render([DEFAULT], {"networkPolicy": {"enabled": True, "egress": {"dns": False}}})
    assert dns_rules(docs) == []


def test_image_by_digest_or_tag(ci_renders, render):
    assert container(render([DEFAULT]))["image"] == "stream:0.2.0"
    assert container(ci_renders["networkpolicy-existingsecret-values"])["image"] == (
        "registry.example.com/stream@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
