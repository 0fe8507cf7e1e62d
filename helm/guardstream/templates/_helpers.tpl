{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "guardstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Leaves room for the "-server" suffix of the split topology.
*/}}
{{- define "guardstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "guardstream.serverFullname" -}}
{{- printf "%s-server" (include "guardstream.fullname" .) }}
{{- end }}

{{- define "guardstream.escalationFullname" -}}
{{- printf "%s-escalation" (include "guardstream.fullname" .) }}
{{- end }}

{{- /* The chart runs the cascade's second model server (no external cascade.baseUrl). */ -}}
{{- define "guardstream.escalationServerEnabled" -}}
{{- if and .Values.cascade.enabled (not .Values.cascade.baseUrl) }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "guardstream.labels" -}}
helm.sh/chart: {{ include "guardstream.chart" .ctx }}
{{ include "guardstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: guardstream
{{- end }}

{{- define "guardstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "guardstream.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "guardstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "guardstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The engine the workers run: the split topology always talks to its model server.
*/}}
{{- define "guardstream.workerEngine" -}}
{{- if eq .Values.topology "split" }}openai_http{{ else }}{{ .Values.engine.name }}{{ end }}
{{- end }}

{{/*
"true" when the workers run the model in-process (trtllm, hf): the GPU image, which carries
tensorrt_llm, torch and transformers.
*/}}
{{- define "guardstream.workerInProcess" -}}
{{- if has (include "guardstream.workerEngine" .) (list "trtllm" "hf") }}true{{ else }}false{{ end }}
{{- end }}

{{/*
"true" when the worker pods ask for GPUs (and get the GPU tolerations and nodeSelector).
*/}}
{{- define "guardstream.workerUsesGpu" -}}
{{- if and (eq (include "guardstream.workerInProcess" .) "true") (gt (int .Values.gpu.count) 0) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
"true" when the trtllm init container builds (or verifies) a compiled engine.
*/}}
{{- define "guardstream.usesEngineFolder" -}}
{{- if and (eq (include "guardstream.workerEngine" .) "trtllm") (eq .Values.engine.trtllm.runtime "engine") }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.buildsEngine" -}}
{{- if and (eq (include "guardstream.usesEngineFolder" .) "true") .Values.engine.trtllm.build.enabled }}true{{ else }}false{{ end }}
{{- end }}

{{/*
"true" when the workers mount the models volume (checkpoints or replay data).
*/}}
{{- define "guardstream.workerUsesModels" -}}
{{- if and .Values.persistence.models.enabled (has (include "guardstream.workerEngine" .) (list "trtllm" "hf" "replay")) }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.serverEnabled" -}}
{{- if eq .Values.topology "split" }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.workerImage" -}}
{{- $img := ternary .Values.image.gpu .Values.image.cpu (eq (include "guardstream.workerInProcess" .) "true") }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}

{{/*
Image of the engine-build init container: always the GPU image (it needs tensorrt_llm).
*/}}
{{- define "guardstream.gpuImage" -}}
{{- printf "%s:%s" .Values.image.gpu.repository (default .Chart.AppVersion .Values.image.gpu.tag) }}
{{- end }}

{{- define "guardstream.modelsPath" -}}
{{- printf "%s/%s" (.ctx.Values.persistence.models.mountPath | trimSuffix "/") (.path | trimPrefix "/") }}
{{- end }}

{{- define "guardstream.checkpointDir" -}}
{{- include "guardstream.modelsPath" (dict "ctx" . "path" .Values.model.checkpointPath) }}
{{- end }}

{{/*
Sequences decoding at once in the engine: engine.maxSequences, or by model size (the first key
of engine.maxSequencesByModelSize, in sorted order, that model.id contains, case-insensitive;
none: the smallest value, the safe side of the GPU's memory).
*/}}
{{- define "guardstream.maxSequences" -}}
{{- $e := .Values.engine }}
{{- if gt (int $e.maxSequences) 0 }}
{{- int $e.maxSequences }}
{{- else }}
{{- $id := lower .Values.model.id }}
{{- $found := 0 }}
{{- $smallest := 0 }}
{{- range $size, $n := $e.maxSequencesByModelSize }}
{{- if or (eq $smallest 0) (lt (int $n) $smallest) }}{{ $smallest = int $n }}{{ end }}
{{- if and (eq $found 0) (contains (lower $size) $id) }}{{ $found = int $n }}{{ end }}
{{- end }}
{{- if gt $found 0 }}{{ $found }}{{ else }}{{ $smallest }}{{ end }}
{{- end }}
{{- end }}

{{/* A batch-size setting of 0 means the resolved maxSequences. */}}
{{- define "guardstream.orMaxSequences" -}}
{{- if gt (int .value) 0 }}{{ int .value }}{{ else }}{{ include "guardstream.maxSequences" .ctx }}{{ end }}
{{- end }}

{{/*
Engine folder. Derived from the checkpoint and every build setting, so that changing a setting
builds a new engine next to the old one instead of reusing a mismatching one.
*/}}
{{- define "guardstream.engineDir" -}}
{{- $t := .Values.engine.trtllm }}
{{- $b := $t.build }}
{{- $name := $t.prebuiltEnginePath }}
{{- if not $name }}
{{- $batch := include "guardstream.orMaxSequences" (dict "ctx" . "value" $b.maxBatchSize) }}
{{- $name = printf "%s-%s-%s-b%d-n%d-s%d-tp%d" (base .Values.model.checkpointPath) $b.dtype $b.quantization (int $batch) (int $b.maxNumTokens) (int $b.maxSeqLen) (int $b.tp) }}
{{- if gt (int $b.maxInputLen) 0 }}{{ $name = printf "%s-i%d" $name (int $b.maxInputLen) }}{{ end }}
{{- end }}
{{- printf "%s/%s" (.Values.persistence.engines.mountPath | trimSuffix "/") $name }}
{{- end }}

{{- define "guardstream.openaiBaseUrl" -}}
{{- if eq .Values.topology "split" }}
{{- printf "http://%s:%d/v1" (include "guardstream.serverFullname" .) (int .Values.server.port) }}
{{- else }}
{{- .Values.engine.openai.baseUrl }}
{{- end }}
{{- end }}

{{- /* The model name the workers send: trtllm-serve lists a model folder by its base name. */ -}}
{{- define "guardstream.servedModel" -}}
{{- if .Values.engine.openai.servedModel }}
{{- .Values.engine.openai.servedModel }}
{{- else if eq .Values.topology "split" }}
{{- base (default .Values.model.checkpointPath .Values.server.modelPath) }}
{{- end }}
{{- end }}

{{- define "guardstream.terminationGracePeriodSeconds" -}}
{{- add (int .Values.gracePeriodSeconds) (int .Values.terminationMarginSeconds) }}
{{- end }}

{{- define "guardstream.modelsClaimName" -}}
{{- default (printf "%s-models" (include "guardstream.fullname" .)) .Values.persistence.models.existingClaim }}
{{- end }}

{{- define "guardstream.enginesClaimName" -}}
{{- default (printf "%s-engines" (include "guardstream.fullname" .)) .Values.persistence.engines.existingClaim }}
{{- end }}

{{- define "guardstream.kafkaUsesSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.kafkaUsesTls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ else }}false{{ end }}
{{- end }}

{{- define "guardstream.kafkaTlsMounted" -}}
{{- if and (eq (include "guardstream.kafkaUsesTls" .) "true") .Values.kafka.tls.existingSecret }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Input topics the workers consume, by the `moderate` setting.
*/}}
{{- define "guardstream.inputTopics" -}}
{{- $topics := list }}
{{- if has .Values.moderate (list "prompts" "both") }}{{ $topics = append $topics .Values.topics.prompts }}{{ end }}
{{- if has .Values.moderate (list "responses" "both") }}{{ $topics = append $topics .Values.topics.responses }}{{ end }}
{{- join "," $topics }}
{{- end }}

{{/*
Cross-value rules that JSON Schema cannot express. Included by the worker Deployment, so that
every `helm template` / `helm install` runs them.
*/}}
{{- define "guardstream.validate" -}}
{{- $partitions := int .Values.topics.partitions }}
{{- $keda := .Values.autoscaling.keda }}
{{- $hpa := .Values.autoscaling.hpa }}
{{- if and $keda.enabled $hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are exclusive: enable one" }}
{{- end }}
{{- if and $keda.enabled (gt (int $keda.maxReplicaCount) $partitions) }}
{{- fail (printf "autoscaling.keda.maxReplicaCount (%d) exceeds topics.partitions (%d): KEDA's Kafka scaler never runs more consumers than partitions; raise the partitions or lower the maximum" (int $keda.maxReplicaCount) $partitions) }}
{{- end }}
{{- if and $keda.enabled (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- fail (printf "autoscaling.keda.minReplicaCount (%d) exceeds maxReplicaCount (%d)" (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- end }}
{{- if and $hpa.enabled (gt (int $hpa.maxReplicas) $partitions) }}
{{- fail (printf "autoscaling.hpa.maxReplicas (%d) exceeds topics.partitions (%d): consumers beyond the partition count sit idle" (int $hpa.maxReplicas) $partitions) }}
{{- end }}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- fail (printf "autoscaling.hpa.minReplicas (%d) exceeds maxReplicas (%d)" (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- end }}
{{- if and (eq (include "guardstream.kafkaUsesSasl" .) "true") (not .Values.kafka.sasl.existingSecret) }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.existingSecret (a Secret with keys %s and %s)" .Values.kafka.securityProtocol .Values.kafka.sasl.usernameKey .Values.kafka.sasl.passwordKey) }}
{{- end }}
{{- if and .Values.kafka.tls.existingSecret (ne (include "guardstream.kafkaUsesTls" .) "true") }}
{{- fail (printf "kafka.tls.existingSecret is set but kafka.securityProtocol is %s: use SSL or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if ne (empty .Values.kafka.tls.certKey) (empty .Values.kafka.tls.keyKey) }}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together (mutual TLS): set both or neither" }}
{{- end }}
{{- if and .Values.cache.enabled (not .Values.redis.existingSecret) }}
{{- fail "cache.enabled needs redis.existingSecret: a Secret holding the Redis URL under redis.urlKey" }}
{{- end }}
{{- $engine := include "guardstream.workerEngine" . }}
{{- if and (eq $engine "openai_http") (not (include "guardstream.openaiBaseUrl" .)) }}
{{- fail "engine.name openai_http in the single topology needs engine.openai.baseUrl (or use topology: split)" }}
{{- end }}
{{- if and (eq $engine "openai_http") (not .Values.model.revision) }}
{{- fail "model.revision is required when the workers call a model server (engine.name openai_http, or topology split): the served checkpoint's commit or digest, which keys the verdict cache so that a new checkpoint never reads the old one's verdicts" }}
{{- end }}
{{- if and .Values.cascade.enabled (not .Values.cascade.model.revision) }}
{{- fail "cascade.model.revision is required with cascade.enabled: the second checkpoint's commit or digest, which keys the cascade's verdict cache" }}
{{- end }}
{{- if and (eq (include "guardstream.escalationServerEnabled" .) "true") (not .Values.persistence.models.enabled) }}
{{- fail "the cascade's model server reads cascade.server.modelPath from the models volume: enable persistence.models (or set cascade.baseUrl)" }}
{{- end }}
{{- if and (has $engine (list "trtllm" "hf" "replay")) (not .Values.persistence.models.enabled) }}
{{- fail (printf "engine %s reads from the models volume: enable persistence.models" $engine) }}
{{- end }}
{{- if and (eq (include "guardstream.usesEngineFolder" .) "true") (not .Values.persistence.engines.enabled) }}
{{- fail "engine trtllm with runtime engine needs persistence.engines (or runtime: pytorch)" }}
{{- end }}
{{- if and (eq (include "guardstream.usesEngineFolder" .) "true") (not .Values.engine.trtllm.build.enabled) (not .Values.engine.trtllm.prebuiltEnginePath) }}
{{- fail "engine.trtllm.build.enabled is false: set engine.trtllm.prebuiltEnginePath to the prebuilt engine's folder" }}
{{- end }}
{{- if and (eq $engine "trtllm") (eq (int .Values.gpu.count) 0) }}
{{- fail "engine trtllm needs a GPU: gpu.count must be at least 1" }}
{{- end }}
{{- $b := .Values.engine.trtllm.build }}
{{- if and (eq (include "guardstream.buildsEngine" .) "true") (eq $b.quantization "fp8") (not $b.calibDataset) }}
{{- fail "engine.trtllm.build.quantization fp8 needs engine.trtllm.build.calibDataset (a local calibration dataset on the models volume)" }}
{{- end }}
{{- if and (gt (int $b.maxInputLen) 0) (gt (int $b.maxInputLen) (int $b.maxSeqLen)) }}
{{- fail (printf "engine.trtllm.build.maxInputLen (%d) exceeds maxSeqLen (%d)" (int $b.maxInputLen) (int $b.maxSeqLen)) }}
{{- end }}
{{- if and (eq .Values.topology "split") (not .Values.persistence.models.enabled) }}
{{- fail "the split topology's server loads its model from the models volume: enable persistence.models" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if $pdb.enabled }}
{{- $hasMin := not (empty $pdb.minAvailable) }}
{{- $hasMax := not (empty $pdb.maxUnavailable) }}
{{- if and $hasMin $hasMax }}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable (\"\" unsets)" }}
{{- end }}
{{- if not (or $hasMin $hasMax) }}
{{- fail "podDisruptionBudget: set one of maxUnavailable and minAvailable" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Worker environment: the service's GUARDSTREAM_ settings. Secrets only by reference.
*/}}
{{- define "guardstream.workerEnv" -}}
{{- $engine := include "guardstream.workerEngine" . }}
{{- $v := .Values }}
- name: GUARDSTREAM_APP_ID
  value: {{ $v.kafka.consumerGroup | quote }}
- name: GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS
  value: {{ $v.kafka.bootstrapServers | quote }}
- name: GUARDSTREAM_KAFKA_SECURITY_PROTOCOL
  value: {{ $v.kafka.securityProtocol | quote }}
{{- if eq (include "guardstream.kafkaUsesSasl" .) "true" }}
- name: GUARDSTREAM_KAFKA_SASL_MECHANISM
  value: {{ $v.kafka.sasl.mechanism | quote }}
- name: GUARDSTREAM_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $v.kafka.sasl.existingSecret }}
      key: {{ $v.kafka.sasl.usernameKey }}
- name: GUARDSTREAM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.kafka.sasl.existingSecret }}
      key: {{ $v.kafka.sasl.passwordKey }}
{{- end }}
{{- if eq (include "guardstream.kafkaTlsMounted" .) "true" }}
- name: GUARDSTREAM_KAFKA_SSL_CAFILE
  value: {{ printf "/etc/guardstream/kafka-tls/%s" $v.kafka.tls.caKey | quote }}
{{- if $v.kafka.tls.certKey }}
- name: GUARDSTREAM_KAFKA_SSL_CERTFILE
  value: {{ printf "/etc/guardstream/kafka-tls/%s" $v.kafka.tls.certKey | quote }}
- name: GUARDSTREAM_KAFKA_SSL_KEYFILE
  value: {{ printf "/etc/guardstream/kafka-tls/%s" $v.kafka.tls.keyKey | quote }}
{{- end }}
{{- end }}
- name: GUARDSTREAM_CACHE_ENABLED
  value: {{ $v.cache.enabled | quote }}
- name: GUARDSTREAM_CACHE_REQUIRED
  value: {{ $v.cache.required | quote }}
- name: GUARDSTREAM_CACHE_TTL_S
  value: {{ $v.cache.ttlSeconds | quote }}
{{- if $v.cache.enabled }}
- name: GUARDSTREAM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret }}
      key: {{ $v.redis.urlKey }}
{{- end }}
- name: GUARDSTREAM_ENGINE
  value: {{ $engine | quote }}
- name: GUARDSTREAM_MODEL
  value: {{ $v.model.id | quote }}
{{- if $v.model.revision }}
- name: GUARDSTREAM_MODEL_REVISION
  value: {{ $v.model.revision | quote }}
{{- end }}
{{- if eq $engine "trtllm" }}
- name: GUARDSTREAM_TRTLLM_RUNTIME
  value: {{ $v.engine.trtllm.runtime | quote }}
- name: GUARDSTREAM_TRTLLM_CHECKPOINT_DIR
  value: {{ include "guardstream.checkpointDir" . | quote }}
{{- if eq $v.engine.trtllm.runtime "engine" }}
- name: GUARDSTREAM_TRTLLM_ENGINE_DIR
  value: {{ include "guardstream.engineDir" . | quote }}
{{- end }}
# Engines are built by the init container, never by the worker at start.
- name: GUARDSTREAM_TRTLLM_BUILD_ON_START
  value: "false"
- name: GUARDSTREAM_TRTLLM_KV_CACHE_FREE_GPU_MEMORY_FRACTION
  value: {{ $v.engine.trtllm.kvCacheFreeGpuMemoryFraction | quote }}
{{- end }}
{{- if eq $engine "hf" }}
- name: GUARDSTREAM_HF_MODEL_PATH
  value: {{ include "guardstream.checkpointDir" . | quote }}
- name: GUARDSTREAM_HF_DEVICE
  value: {{ $v.engine.hf.device | quote }}
{{- end }}
{{- if eq $engine "openai_http" }}
- name: GUARDSTREAM_OPENAI_BASE_URL
  value: {{ include "guardstream.openaiBaseUrl" . | quote }}
- name: GUARDSTREAM_OPENAI_MAX_CONCURRENCY
  value: {{ include "guardstream.orMaxSequences" (dict "ctx" . "value" $v.engine.openai.maxConcurrency) | quote }}
{{- with include "guardstream.servedModel" . }}
- name: GUARDSTREAM_OPENAI_SERVED_MODEL
  value: {{ . | quote }}
{{- end }}
{{- if $v.engine.openai.apiKeySecret.name }}
- name: GUARDSTREAM_OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.engine.openai.apiKeySecret.name }}
      key: {{ $v.engine.openai.apiKeySecret.key }}
{{- end }}
{{- end }}
{{- if eq $engine "replay" }}
- name: GUARDSTREAM_REPLAY_PATH
  value: {{ include "guardstream.modelsPath" (dict "ctx" . "path" $v.engine.replay.path) | quote }}
{{- end }}
- name: GUARDSTREAM_MAX_NEW_TOKENS
  value: {{ $v.engine.maxNewTokens | quote }}
- name: GUARDSTREAM_ENGINE_RETRIES
  value: {{ $v.engine.retries | quote }}
- name: GUARDSTREAM_ENGINE_TIMEOUT_S
  value: {{ $v.engine.timeoutSeconds | quote }}
- name: GUARDSTREAM_ADMISSION
  value: {{ $v.engine.admission | quote }}
{{- if $v.cascade.enabled }}
{{- $c := $v.cascade }}
- name: GUARDSTREAM_ESCALATE_ENGINE
  value: openai_http
- name: GUARDSTREAM_ESCALATE_MODEL
  value: {{ $c.model.id | quote }}
- name: GUARDSTREAM_ESCALATE_MODEL_REVISION
  value: {{ $c.model.revision | quote }}
- name: GUARDSTREAM_ESCALATE_OPENAI_BASE_URL
  {{- if $c.baseUrl }}
  value: {{ $c.baseUrl | quote }}
  {{- else }}
  value: {{ printf "http://%s:%d/v1" (include "guardstream.escalationFullname" .) (int $v.server.port) | quote }}
  {{- end }}
{{- $served := $c.servedModel | default (ternary "" (base $c.server.modelPath) (not (empty $c.baseUrl))) }}
{{- with $served }}
- name: GUARDSTREAM_ESCALATE_OPENAI_SERVED_MODEL
  value: {{ . | quote }}
{{- end }}
{{- with $c.policy }}
- name: GUARDSTREAM_ESCALATE_POLICY
  value: {{ . | quote }}
{{- end }}
- name: GUARDSTREAM_ESCALATE_MAX_SEQUENCES
  value: {{ $c.maxSequences | quote }}
- name: GUARDSTREAM_ESCALATE_RETRIES
  value: {{ $c.retries | quote }}
- name: GUARDSTREAM_ESCALATE_TIMEOUT_S
  value: {{ $c.timeoutSeconds | quote }}
{{- end }}
- name: GUARDSTREAM_ENGINE_MAX_SEQUENCES
  value: {{ include "guardstream.maxSequences" . | quote }}
- name: GUARDSTREAM_EARLY_EXIT
  value: {{ $v.engine.earlyExit | quote }}
- name: GUARDSTREAM_BATCH_MAX_SIZE
  value: {{ $v.batch.maxSize | quote }}
- name: GUARDSTREAM_BATCH_MAX_WAIT_MS
  value: {{ $v.batch.maxWaitMs | quote }}
- name: GUARDSTREAM_BATCH_MAX_IN_FLIGHT
  value: {{ $v.batch.maxInFlight | quote }}
- name: GUARDSTREAM_TOPIC_PROMPTS
  value: {{ $v.topics.prompts | quote }}
- name: GUARDSTREAM_TOPIC_RESPONSES
  value: {{ $v.topics.responses | quote }}
- name: GUARDSTREAM_TOPIC_VERDICTS
  value: {{ $v.topics.verdicts | quote }}
- name: GUARDSTREAM_TOPIC_FLAGGED
  value: {{ $v.topics.flagged | quote }}
- name: GUARDSTREAM_TOPIC_DLQ
  value: {{ $v.topics.dlq | quote }}
- name: GUARDSTREAM_TOPIC_PARTITIONS
  value: {{ $v.topics.partitions | quote }}
- name: GUARDSTREAM_MODERATE
  value: {{ $v.moderate | quote }}
- name: GUARDSTREAM_POLICY
  value: {{ $v.policy | quote }}
- name: GUARDSTREAM_SHADOW
  value: {{ $v.shadow | quote }}
- name: GUARDSTREAM_PROCESSING_GUARANTEE
  value: {{ $v.processingGuarantee | quote }}
- name: GUARDSTREAM_WEB_PORT
  value: {{ $v.web.port | quote }}
- name: GUARDSTREAM_GRACE_PERIOD_S
  value: {{ $v.gracePeriodSeconds | quote }}
- name: GUARDSTREAM_TRACES_EXPORTER
  value: {{ $v.telemetry.tracesExporter | quote }}
- name: GUARDSTREAM_METRICS_EXPORTER
  value: {{ $v.telemetry.metricsExporter | quote }}
{{- if $v.telemetry.otlp.endpoint }}
- name: GUARDSTREAM_OTLP_ENDPOINT
  value: {{ $v.telemetry.otlp.endpoint | quote }}
- name: GUARDSTREAM_OTLP_PROTOCOL
  value: {{ $v.telemetry.otlp.protocol | quote }}
{{- end }}
- name: GUARDSTREAM_LOG_FORMAT
  value: {{ $v.logging.format | quote }}
- name: GUARDSTREAM_LOG_LEVEL
  value: {{ $v.logging.level | quote }}
- name: HOME
  value: /var/lib/guardstream
{{- with $v.worker.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Tolerations and nodeSelector for a pod: the GPU ones when it uses a GPU, merged with its own.
Call with (dict "ctx" $ "gpu" true/false "own" .Values.worker).
*/}}
{{- define "guardstream.placement" -}}
{{- $v := .ctx.Values }}
{{- $nodeSelector := dict }}
{{- if .gpu }}{{ $nodeSelector = merge $nodeSelector (deepCopy $v.gpu.nodeSelector) }}{{ end }}
{{- $nodeSelector = merge (deepCopy (.own.nodeSelector | default dict)) $nodeSelector }}
{{- $tolerations := list }}
{{- if .gpu }}{{ $tolerations = concat $tolerations $v.gpu.tolerations }}{{ end }}
{{- $tolerations = concat $tolerations (.own.tolerations | default list) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .own.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Resources with the GPU limit added. Call with (dict "resources" ... "gpu" true/false "ctx" $).
*/}}
{{- define "guardstream.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .gpu }}
{{- $limits := deepCopy (get $res "limits" | default dict) }}
{{- $_ := set $limits .ctx.Values.gpu.resourceName (int .ctx.Values.gpu.count) }}
{{- $_ = set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}
