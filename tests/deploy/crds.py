"""Strict schemas for the custom resources the chart renders, which kubernetes-validate has no schema for.

Each is the subset of the upstream CRD's openAPIV3Schema (prometheus-operator monitoring.coreos.com/v1,
KEDA keda.sh/v1alpha1) that this chart may emit, with the upstream field names and types, and
additionalProperties false: a misspelt or misplaced field fails here instead of being pruned silently by
the API server. A field the chart starts to use must be added here from the upstream CRD.
"""

from __future__ import annotations

import jsonschema

_STR = {"type": "string"}
_INT = {"type": "integer"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
# Prometheus durations, as the CRDs' pattern has them.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
    "additionalProperties": False,
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": _STR, "modulus": _INT, "regex": _STR, "replacement": _STR, "separator": _STR,
        "sourceLabels": {"type": "array", "items": _STR}, "targetLabel": _STR,
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": _STR,
        "path": _STR,
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}},
}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
    }


SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "endpoints"],
    "properties": {
        "jobLabel": _STR,
        "namespaceSelector": _NAMESPACE_SELECTOR,
        "selector": _LABEL_SELECTOR,
        "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    },
})

POD_MONITOR = _resource("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "podMetricsEndpoints"],
    "properties": {
        "jobLabel": _STR,
        "namespaceSelector": _NAMESPACE_SELECTOR,
        "selector": _LABEL_SELECTOR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    },
})

_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]}, "for": _DURATION,
        "keep_firing_for": _DURATION, "labels": _STR_MAP, "annotations": _STR_MAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "additionalProperties": False,
    "required": ["groups"],
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {"name": _STR, "interval": _DURATION, "rules": {"type": "array", "items": _RULE}},
            },
        },
    },
})

# KEDA passes trigger metadata to the scaler as strings: a number or a boolean there is an error.
_KAFKA_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bootstrapServers", "consumerGroup", "topic"],
    "properties": {
        name: _STR for name in (
            "bootstrapServers", "consumerGroup", "topic", "lagThreshold", "activationLagThreshold",
            "offsetResetPolicy", "allowIdleConsumers", "scaleToZeroOnInvalidOffset", "excludePersistentLag",
            "limitToPartitionsWithLag", "version", "partitionLimitation", "sasl", "tls", "unsafeSsl",
        )
    },
}
SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "additionalProperties": False,
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR},
        },
        "minReplicaCount": _INT,
        "maxReplicaCount": _INT,
        "pollingInterval": _INT,
        "cooldownPeriod": _INT,
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"name": _STR, "behavior": {"type": "object"}},
                },
            },
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "metadata"],
                "properties": {
                    "type": {"const": "kafka"},
                    "name": _STR,
                    "metadata": _KAFKA_METADATA,
                    "authenticationRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": _STR, "kind": {"enum": ["TriggerAuthentication",
                                                                       "ClusterTriggerAuthentication"]}},
                    },
                },
            },
        },
    },
})

_KAFKA_AUTH_PARAMETER = {"enum": ["sasl", "username", "password", "tls", "ca", "cert", "key", "keyPassword"]}
TRIGGER_AUTHENTICATION = _resource("keda.sh/v1alpha1", "TriggerAuthentication", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["parameter", "name"],
                "properties": {"parameter": _KAFKA_AUTH_PARAMETER, "name": _STR, "containerName": _STR},
            },
        },
        "secretTargetRef": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["parameter", "name", "key"],
                "properties": {"parameter": _KAFKA_AUTH_PARAMETER, "name": _STR, "key": _STR},
            },
        },
    },
})

SCHEMAS = {
    "ServiceMonitor": SERVICE_MONITOR,
    "PodMonitor": POD_MONITOR,
    "PrometheusRule": PROMETHEUS_RULE,
    "ScaledObject": SCALED_OBJECT,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION,
}


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError when the custom resource does not fit its schema."""
    jsonschema.validate(doc, SCHEMAS[doc["kind"]])
