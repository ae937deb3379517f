{{/* Names, labels, and the checks that fail a render with a message naming the value. */}}

{{- define "stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- /* The pods' labels: stream.labels without helm.sh/chart, whose version would roll every pod at a chart bump. */}}
{{- define "stream.podLabels" -}}
{{ include "stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stream.labels" -}}
helm.sh/chart: {{ include "stream.chart" . }}
{{ include "stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stream.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the API token (and, by default, the Kafka SASL password). */}}
{{- define "stream.secretName" -}}
{{- default (include "stream.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "stream.saslEnabled" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "stream.tlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Where the SASL password comes from: its own Secret, or the chart's / existingSecret. */}}
{{- define "stream.saslPasswordSecretName" -}}
{{- default (include "stream.secretName" .) .Values.kafka.sasl.passwordSecret.name }}
{{- end }}

{{- define "stream.saslPasswordSecretKey" -}}
{{- if .Values.kafka.sasl.passwordSecret.name }}
{{- .Values.kafka.sasl.passwordSecret.key }}
{{- else }}
{{- .Values.secretKeys.kafkaSaslPassword }}
{{- end }}
{{- end }}

{{/* Paths of the mounted secrets. Whole-directory mounts, never subPath: the kubelet then swaps the
files in place when a Secret changes, and the service re-reads the token without a restart. */}}
{{- define "stream.apiTokenDir" -}}/var/run/secrets/stream/api{{- end }}
{{- define "stream.saslDir" -}}/var/run/secrets/stream/kafka-sasl{{- end }}
{{- define "stream.caDir" -}}/var/run/secrets/stream/kafka-ca{{- end }}
{{- define "stream.clientCertDir" -}}/var/run/secrets/stream/kafka-client{{- end }}

{{/* The grace period: at least the drain timeout (whole seconds, rounded up) + the final commit's timeout
(stream.config COMMIT_TIMEOUT_SECONDS, 10 s) + a margin (5 s: leaving the group and flushing the producer,
each bounded at 5 s side by side). 0: exactly that minimum. */}}
{{- define "stream.commitTimeoutSeconds" -}}10{{- end }}
{{- define "stream.stopMarginSeconds" -}}5{{- end }}
{{- define "stream.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (ceil .Values.config.drainTimeoutSeconds) }}
{{- $commit := int64 (include "stream.commitTimeoutSeconds" .) }}
{{- $margin := int64 (include "stream.stopMarginSeconds" .) }}
{{- $minimum := add $drain $commit $margin }}
{{- $grace := int64 .Values.terminationGracePeriodSeconds }}
{{- if eq $grace 0 }}
{{- $minimum }}
{{- else if lt $grace $minimum }}
{{- fail (printf "terminationGracePeriodSeconds (%d) is below its minimum %d = config.drainTimeoutSeconds (%v) + the final commit's timeout (%d s) + a margin (%d s) to leave the group and flush the producer: Kubernetes would kill the pod before it commits what it drained. Set at least %d, or 0 for that minimum." $grace $minimum .Values.config.drainTimeoutSeconds $commit $margin $minimum) }}
{{- else }}
{{- $grace }}
{{- end }}
{{- end }}

{{/* Every check that spans several values (the schema checks each value on its own). */}}
{{- define "stream.validate" -}}
{{- $partitions := int64 .Values.kafka.topicPartitions }}
{{- if .Values.keda.enabled }}
{{- if eq $partitions 0 }}
{{- fail "keda.enabled needs kafka.topicPartitions (the input topic's partition count): the chart checks keda.maxReplicas against it" }}
{{- end }}
{{- if gt (int64 .Values.keda.maxReplicas) $partitions }}
{{- fail (printf "keda.maxReplicas (%d) exceeds kafka.topicPartitions (%d): a replica beyond the partition count gets no partition: an idle standby that only adds a member to every rebalance. Lower keda.maxReplicas or add partitions." (int64 .Values.keda.maxReplicas) $partitions) }}
{{- end }}
{{- if gt (int64 .Values.keda.minReplicas) (int64 .Values.keda.maxReplicas) }}
{{- fail (printf "keda.minReplicas (%d) exceeds keda.maxReplicas (%d)" (int64 .Values.keda.minReplicas) (int64 .Values.keda.maxReplicas)) }}
{{- end }}
{{- else if and (gt $partitions 0) (gt (int64 .Values.replicaCount) $partitions) }}
{{- fail (printf "replicaCount (%d) exceeds kafka.topicPartitions (%d): a replica beyond the partition count gets no partition: an idle standby that only adds a member to every rebalance" (int64 .Values.replicaCount) $partitions) }}
{{- end }}
{{- if and (not .Values.existingSecret) (not .Values.secret.apiToken) }}
{{- fail "the API token is missing: set existingSecret (a Secret you manage, key secretKeys.apiToken) or secret.apiToken" }}
{{- end }}
{{- if include "stream.saslEnabled" . }}
{{- if not .Values.kafka.sasl.username }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.username" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and (not .Values.kafka.sasl.passwordSecret.name) (not .Values.existingSecret) (not .Values.secret.kafkaSaslPassword) }}
{{- fail (printf "kafka.securityProtocol %s needs a password: kafka.sasl.passwordSecret, existingSecret (key secretKeys.kafkaSaslPassword) or secret.kafkaSaslPassword" .Values.kafka.securityProtocol) }}
{{- end }}
{{- end }}
{{- if and (not (include "stream.tlsEnabled" .)) (or .Values.kafka.tls.caSecret.name .Values.kafka.tls.clientCertSecret.name) }}
{{- fail (printf "kafka.tls secrets are set but kafka.securityProtocol is %s: use SSL or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor and metrics.podMonitor are both enabled: every sample would be scraped twice" }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (not .Values.metrics.serviceMonitor.enabled) (not .Values.metrics.podMonitor.enabled) (not .Values.prometheusRule.releaseLabelFromScrapeConfig) }}
{{- fail "prometheusRule.enabled needs metrics.serviceMonitor.enabled or metrics.podMonitor.enabled: the alerts select this release's series by the target label release, which only the chart's ServiceMonitor/PodMonitor add, so without them no alert would ever see a series (and the absent() alerts would fire for ever). If your own scrape config sets job=<chart name> and release=<release name> on the pods' targets, set prometheusRule.releaseLabelFromScrapeConfig=true." }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor needs metrics.service.enabled" }}
{{- end }}
{{- if gt (float64 .Values.api.timeoutSeconds) (float64 .Values.config.drainTimeoutSeconds) }}
{{- fail (printf "api.timeoutSeconds (%v) exceeds config.drainTimeoutSeconds (%v): a request in flight at SIGTERM could still be waiting for the API when the drain gives up, and its samples would be sent again by the next owner. Lower api.timeoutSeconds or raise config.drainTimeoutSeconds (and terminationGracePeriodSeconds with it)." .Values.api.timeoutSeconds .Values.config.drainTimeoutSeconds) }}
{{- end }}
{{- with .Values.strategy }}
{{- if and (ne (toString .type) "Recreate") .rollingUpdate }}
{{- $surge := .rollingUpdate.maxSurge }}
{{- $unavailable := .rollingUpdate.maxUnavailable }}
{{- if and (not (kindIs "invalid" $surge)) (not (kindIs "invalid" $unavailable)) (regexMatch "^0*%?$" (toString $surge)) (regexMatch "^0*%?$" (toString $unavailable)) }}
{{- fail (printf "strategy.rollingUpdate.maxSurge (%v) and maxUnavailable (%v) are both 0: a rollout could neither add a pod nor take one down, so it would never progress. Keep maxSurge 0 (a surge pod gets no partition) and set maxUnavailable to 1." $surge $unavailable) }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt (float64 .Values.config.minBatchMaxAgeSeconds) (float64 .Values.config.minBatchHoldSeconds) }}
{{- fail "config.minBatchMaxAgeSeconds must be at least config.minBatchHoldSeconds" }}
{{- end }}
{{- if or (has .Values.kafka.dlqTopic .Values.kafka.topics) (has (include "stream.pendingTopic" .) .Values.kafka.topics) (has (include "stream.ledgerTopic" .) .Values.kafka.topics) }}
{{- fail "kafka.dlqTopic, kafka.pendingTopic and kafka.ledgerTopic must differ from kafka.topics" }}
{{- end }}
{{- if has (include "stream.ledgerTopic" .) (list .Values.kafka.dlqTopic (include "stream.pendingTopic" .)) }}
{{- fail "kafka.ledgerTopic must differ from kafka.dlqTopic and kafka.pendingTopic" }}
{{- end }}
{{- end }}

{{/* The pending topic: the configured one, or one of the consumer group's own (as the service derives it). */}}
{{- define "stream.pendingTopic" -}}
{{- default (printf "%s-pending" .Values.kafka.groupId) .Values.kafka.pendingTopic -}}
{{- end }}

{{/* The ledger topic: the configured one, or one of the consumer group's own (as the service derives it). */}}
{{- define "stream.ledgerTopic" -}}
{{- default (printf "%s-ledger" .Values.kafka.groupId) .Values.kafka.ledgerTopic -}}
{{- end }}
