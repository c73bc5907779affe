{{/*
Names and labels.
*/}}
{{- define "soma-backup.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "soma-backup.fullname" -}}
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

{{- define "soma-backup.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "soma-backup.selectorLabels" -}}
app.kubernetes.io/name: {{ include "soma-backup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "soma-backup.labels" -}}
helm.sh/chart: {{ include "soma-backup.chart" . }}
{{ include "soma-backup.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: soma-backup
{{- end }}

{{/*
The agent image: repository:tag. Takes the soma-backup values.
*/}}
{{- define "soma-backup.image" -}}
{{- printf "%s:%s" .agent.image.repository (toString .agent.image.tag) }}
{{- end }}

{{/*
ServiceAccount of the hook Jobs (restore, pre-upgrade backup): its own, created as a hook.
*/}}
{{- define "soma-backup.hookServiceAccountName" -}}
{{- if .Values.rbac.create }}
{{- printf "%s-hook" (include "soma-backup.fullname" . | trunc 58 | trimSuffix "-") }}
{{- else }}
{{- required "rbac.serviceAccountName is required when rbac.create=false" .Values.rbac.serviceAccountName }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the scheduled backup CronJob: a regular release resource.
*/}}
{{- define "soma-backup.scheduleServiceAccountName" -}}
{{- if .Values.rbac.create }}
{{- include "soma-backup.fullname" . }}
{{- else }}
{{- required "rbac.serviceAccountName is required when rbac.create=false" .Values.rbac.serviceAccountName }}
{{- end }}
{{- end }}

{{/*
The rules kubectl-soma needs, and nothing more:
- pods: get, list — discovery finds the agent pods by label (soma.dev/agent=true) and reads their
  readiness, engine label and soma.dev/agent-port annotation.
- pods/portforward: create, get — the tunnel to the agent's 127.0.0.1 port. A port-forward over
  SPDY is a POST, authorized as `create`. kubectl-soma (kube-rs) port-forwards over WebSocket,
  whose upgrade request is a GET: Kubernetes up to 1.34 authorizes it as `get` only, and since
  1.35 (feature gate AuthorizePodWebsocketUpgradeCreatePermission, beta, on by default;
  kubernetes/kubernetes#134577) it additionally requires `create`. Both verbs are therefore
  needed for the tunnel to work on every supported version.
No watch, no exec, no secrets, no cluster-wide rights.
*/}}
{{- define "soma-backup.rbacRules" -}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["pods/portforward"]
  verbs: ["create", "get"]
{{- end }}

{{/*
Pod spec fields shared by every Job. Takes (dict "root" $ "serviceAccountName" NAME).
*/}}
{{- define "soma-backup.jobPodSpec" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ .serviceAccountName }}
automountServiceAccountToken: true
restartPolicy: Never
enableServiceLinks: false
securityContext:
  runAsNonRoot: true
  seccompProfile:
    type: RuntimeDefault
{{- with $v.jobs.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.jobs.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.jobs.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.jobs.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The kubectl-soma container of a Job. Takes (dict "root" $ "name" NAME "args" LIST).
The plugin uses the in-cluster config of the pod's ServiceAccount; every argument is a plain
word (backup ids, engine names, the namespace), never a secret.
*/}}
{{- define "soma-backup.jobContainer" -}}
{{- $v := .root.Values -}}
- name: {{ .name }}
  image: {{ include "soma-backup.image" $v | quote }}
  imagePullPolicy: {{ $v.agent.image.pullPolicy }}
  command: ["kubectl-soma"]
  args:
    {{- range .args }}
    - {{ toString . | quote }}
    {{- end }}
  # Without a terminal kubectl-soma prints plain progress lines; the last lines (its error, if
  # any) also become the container's termination message.
  terminationMessagePolicy: FallbackToLogsOnError
  {{- with $v.jobs.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.jobs.securityContext | nindent 4 }}
{{- end }}

{{/*
Pod labels and annotations that make a database pod discoverable as an agent pod.
Take (dict "engine" "postgres"|"qdrant" "Values" <soma-backup values>).
*/}}
{{- define "soma-backup.agentPodLabels" -}}
soma.dev/agent: "true"
soma.dev/engine: {{ include "soma-backup.checkEngine" . }}
{{- end }}

{{- define "soma-backup.agentPodAnnotations" -}}
soma.dev/agent-port: {{ .Values.agent.port | toString | quote }}
{{- end }}

{{- define "soma-backup.checkEngine" -}}
{{- $engine := required "soma-backup: pass \"engine\" (postgres or qdrant)" .engine -}}
{{- if not (has $engine (list "postgres" "qdrant")) -}}
{{- fail (printf "soma-backup: engine must be postgres or qdrant, not %q" $engine) -}}
{{- end -}}
{{- $engine -}}
{{- end }}

{{/*
The agent sidecar container, to include in a PostgreSQL or a Qdrant pod:

  containers:
    {{- include "soma-backup.agentContainer" (dict "engine" "postgres" "Values" .Values) | nindent 4 }}

"Values" is the soma-backup values tree (from an umbrella chart: (index .Values "soma-backup")).
Add the pod labels/annotations ("soma-backup.agentPodLabels" / "soma-backup.agentPodAnnotations")
and the volumes ("soma-backup.agentVolumes") beside it. The result is one list item.

Secrets reach the container only through secretKeyRef: PGPASSWORD, SOMA_QDRANT_API_KEY and the
S3 keys; the PostgreSQL URL never carries a password. The agent listens on 127.0.0.1 only.
*/}}
{{- define "soma-backup.agentContainer" -}}
{{- $engine := include "soma-backup.checkEngine" . -}}
{{- $v := required "soma-backup.agentContainer: pass \"Values\" (the soma-backup values)" .Values -}}
{{- $store := $v.store -}}
{{- $bucket := required "store.bucket is required for the soma-agent sidecar" $store.bucket -}}
- name: {{ $v.agent.containerName }}
  image: {{ include "soma-backup.image" $v | quote }}
  imagePullPolicy: {{ $v.agent.image.pullPolicy }}
  env:
    - name: SOMA_LISTEN
      value: {{ printf "127.0.0.1:%v" $v.agent.port | quote }}
    - name: SOMA_STORE
      value: {{ printf "s3://%s/%s" $bucket (trimAll "/" (toString $store.prefix)) | trimSuffix "/" | quote }}
    - name: AWS_REGION
      value: {{ $store.region | quote }}
    {{- with $store.endpoint }}
    - name: AWS_ENDPOINT_URL
      value: {{ . | quote }}
    {{- end }}
    {{- if eq $store.credentials.source "secret" }}
    {{- $secret := required "store.credentials.existingSecret is required with store.credentials.source=secret" $store.credentials.existingSecret }}
    - name: AWS_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef:
          name: {{ $secret | quote }}
          key: {{ $store.credentials.accessKeyIdKey | quote }}
    - name: AWS_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $secret | quote }}
          key: {{ $store.credentials.secretAccessKeyKey | quote }}
    {{- end }}
    - name: SOMA_LOG_FORMAT
      value: {{ $v.agent.logFormat | quote }}
    {{- if not (kindIs "invalid" $v.agent.compressionLevel) }}
    - name: SOMA_COMPRESSION_LEVEL
      value: {{ $v.agent.compressionLevel | toString | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $v.agent.compressionThreads) }}
    - name: SOMA_COMPRESSION_THREADS
      value: {{ $v.agent.compressionThreads | toString | quote }}
    {{- end }}
    {{- with $v.agent.partSize }}
    - name: SOMA_PART_SIZE
      value: {{ . | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $v.agent.partsInFlight) }}
    - name: SOMA_PARTS_IN_FLIGHT
      value: {{ $v.agent.partsInFlight | toString | quote }}
    {{- end }}
    {{- if eq $engine "postgres" }}
    {{- $pg := $v.postgres }}
    - name: SOMA_POSTGRES_URL
      value: {{ printf "postgresql://%s@%s:%v/%s%s" (urlquery $pg.user) $pg.host $pg.port (urlquery $pg.database) (ternary (printf "?%s" $pg.params) "" (ne (toString $pg.params) "")) | quote }}
    - name: PGPASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ required "postgres.passwordSecret.name is required" $pg.passwordSecret.name | quote }}
          key: {{ required "postgres.passwordSecret.key is required" $pg.passwordSecret.key | quote }}
    {{- with $pg.binDir }}
    - name: SOMA_PG_BIN_DIR
      value: {{ . | quote }}
    {{- end }}
    {{- else }}
    {{- $q := $v.qdrant }}
    - name: SOMA_QDRANT_URL
      value: {{ required "qdrant.url is required" $q.url | quote }}
    - name: SOMA_QDRANT_MODE
      value: {{ $q.mode | quote }}
    {{- if $q.apiKeySecret.name }}
    - name: SOMA_QDRANT_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $q.apiKeySecret.name | quote }}
          key: {{ required "qdrant.apiKeySecret.key is required" $q.apiKeySecret.key | quote }}
    {{- end }}
    {{- if $q.caCertSecret.name }}
    - name: SOMA_QDRANT_CA_CERT
      value: /etc/soma-agent/qdrant-ca/ca.crt
    {{- end }}
    {{- end }}
    {{- with $v.agent.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.agent.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.agent.securityContext | nindent 4 }}
  volumeMounts:
    - name: soma-agent-tmp
      mountPath: /tmp
    {{- if and (eq $engine "qdrant") $v.qdrant.caCertSecret.name }}
    - name: soma-agent-qdrant-ca
      mountPath: /etc/soma-agent/qdrant-ca
      readOnly: true
    {{- end }}
{{- end }}

{{/*
The volumes the sidecar mounts, as list items for the pod's volumes.
Takes (dict "engine" "postgres"|"qdrant" "Values" <soma-backup values>).
*/}}
{{- define "soma-backup.agentVolumes" -}}
{{- $engine := include "soma-backup.checkEngine" . -}}
- name: soma-agent-tmp
  emptyDir:
    sizeLimit: {{ .Values.agent.tmpSizeLimit }}
{{- if and (eq $engine "qdrant") .Values.qdrant.caCertSecret.name }}
- name: soma-agent-qdrant-ca
  secret:
    secretName: {{ .Values.qdrant.caCertSecret.name }}
    items:
      - key: {{ .Values.qdrant.caCertSecret.key }}
        path: ca.crt
{{- end }}
{{- end }}
