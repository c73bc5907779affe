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
- secrets: get, on the agent token's Secret only (agent.token), by resourceNames — kubectl-soma
  reads the token the pod annotation soma.dev/token-secret names.
No watch, no exec, no other secret, no cluster-wide rights.
*/}}
{{- define "soma-backup.rbacRules" -}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["pods/portforward"]
  verbs: ["create", "get"]
{{- if .Values.agent.token.enabled }}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ .Values.agent.token.secretName | quote }}]
  verbs: ["get"]
{{- end }}
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
{{- if .Values.agent.token.enabled }}
soma.dev/token-secret: {{ .Values.agent.token.secretName | quote }}
{{- end }}
{{- end }}

{{- define "soma-backup.checkEngine" -}}
{{- $engine := required "soma-backup: pass \"engine\" (postgres or qdrant)" .engine -}}
{{- if not (has $engine (list "postgres" "qdrant")) -}}
{{- fail (printf "soma-backup: engine must be postgres or qdrant, not %q" $engine) -}}
{{- end -}}
{{- $engine -}}
{{- end }}

{{/*
The store URL, SOMA_STORE: s3://<bucket>/<prefix>. Takes (dict "bucket" BUCKET "prefix" PREFIX).
*/}}
{{- define "soma-backup.storeUrl" -}}
{{- printf "s3://%s/%s" .bucket (trimAll "/" (toString .prefix)) | trimSuffix "/" -}}
{{- end }}

{{/*
The S3 client's environment (AWS_REGION, AWS_ENDPOINT_URL, and the access keys through
secretKeyRef only), as env list items. Takes the soma-backup values' "store". Shared by the
sidecar, the physical restore's init container and the PostgreSQL container that runs
restore_command, so all three reach the store with the same identity.
*/}}
{{- define "soma-backup.awsEnv" -}}
{{- include "soma-backup.awsEnvWith" (dict "store" . "credentials" .credentials) }}
{{- end }}

{{/*
The S3 environment for containers that only read (the physical restore's init container and the
PostgreSQL container running restore_command): store.readOnlyCredentials when given, else the
agent's. Takes the soma-backup values' "store".
*/}}
{{- define "soma-backup.readOnlyAwsEnv" -}}
{{- $ro := .readOnlyCredentials | default dict }}
{{- if and (eq .credentials.source "secret") $ro.existingSecret }}
{{- $creds := dict "source" "secret" "existingSecret" $ro.existingSecret "accessKeyIdKey" $ro.accessKeyIdKey "secretAccessKeyKey" $ro.secretAccessKeyKey }}
{{- include "soma-backup.awsEnvWith" (dict "store" . "credentials" $creds) }}
{{- else }}
{{- include "soma-backup.awsEnv" . }}
{{- end }}
{{- end }}

{{- define "soma-backup.awsEnvWith" -}}
{{- $store := .store -}}
{{- with $store -}}
- name: AWS_REGION
  value: {{ .region | quote }}
{{- with .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- $c := .credentials }}
{{- if eq $c.source "secret" }}
{{- $secret := required "store.credentials.existingSecret is required with store.credentials.source=secret" $c.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: {{ $c.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: {{ $c.secretAccessKeyKey | quote }}
{{- end }}
{{- end }}

{{/*
The agent's owner id, SOMA_OWNER_ID (empty: the agent then uses its host name). Takes the dict
given to "soma-backup.agentContainer". agent.ownerId when set; else, when the dict carries
"Release", "<kube-system namespace UID>/<release namespace>/<release name>": stable across pod
restarts and upgrades, and different in another cluster that installs the same release (a
disaster-recovery drill), so that cluster's agent never sweeps this one's uploads. Where lookup
answers nothing (helm template, --dry-run, no rights on namespaces) it is
"<release namespace>/<release name>".
*/}}
{{- define "soma-backup.ownerId" -}}
{{- with .Values.agent.ownerId -}}
{{- . -}}
{{- else -}}
{{- with .Release -}}
{{- $ns := lookup "v1" "Namespace" "" "kube-system" -}}
{{- $uid := "" -}}
{{- if $ns }}{{- $uid = (($ns.metadata).uid) | default "" -}}{{- end -}}
{{- $id := printf "%s/%s" .Namespace .Name -}}
{{- if $uid }}{{- $id = printf "%s/%s" $uid $id -}}{{- end -}}
{{- $id | trunc 253 -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The agent sidecar container, to include in a PostgreSQL or a Qdrant pod:

  containers:
    {{- include "soma-backup.agentContainer" (dict "engine" "postgres" "Values" .Values "Release" .Release) | nindent 4 }}

"Values" is the soma-backup values tree (from an umbrella chart: (index .Values "soma-backup")).
"Release" (optional) gives the default owner id (see "soma-backup.ownerId").
Add the pod labels/annotations ("soma-backup.agentPodLabels" / "soma-backup.agentPodAnnotations")
and the volumes ("soma-backup.agentVolumes") beside it. The result is one list item.

Secrets reach the container only through secretKeyRef: PGPASSWORD, SOMA_REPLICATION_PASSWORD,
SOMA_QDRANT_API_KEY and the S3 keys; no URL ever carries a password. The agent listens on
127.0.0.1 only. With postgres.walStream.enabled the PostgreSQL sidecar also streams WAL
(SOMA_WAL_*) into a spool volume, which "soma-backup.agentVolumes" then includes.

Unattended operation: agent.schedules (SOMA_SCHEDULES, checked and filtered per engine by
"soma-backup.schedules"), agent.retention (SOMA_RETENTION) and, for the PostgreSQL sidecar, the
drill volume (SOMA_DRILL_DIR, see "soma-backup.drillVolume"). With metrics.enabled the sidecar
also serves /metrics, /livez and /readyz on 0.0.0.0:<metrics.port>, the container port named
"metrics", which the liveness and readiness probes use: that listener answers nothing else, so
binding the pod IP exposes no API (the gRPC API stays on 127.0.0.1).
*/}}
{{/*
"true" when the agents encrypt (agent.encryption.enabled, on unless set to false), else empty.
On without a key Secret, or off with one, fails the render naming the values to set: encryption
is the default, so whoever can read the bucket reads nothing and whoever can write it cannot
plant a backup that is restored. Takes the soma-backup values.
*/}}
{{- define "soma-backup.encryptionOn" -}}
{{- $e := .agent.encryption -}}
{{- if ne (toString $e.enabled) "false" }}
{{- if not $e.existingSecret }}
{{- fail "agent.encryption.existingSecret is required: backups are encrypted by default (agent.encryption.enabled), so that whoever can read the bucket reads no database and whoever can write it cannot plant a backup that is restored. Create a key Secret (head -c 32 /dev/urandom > key; kubectl create secret generic soma-backup-key --from-file=key; keep a copy of the key outside the cluster) and set agent.encryption.existingSecret=soma-backup-key, or set agent.encryption.enabled=false to store backups unencrypted" }}
{{- end -}}
true
{{- else if $e.existingSecret }}
{{- fail (printf "agent.encryption.enabled is false but agent.encryption.existingSecret is %q: remove existingSecret to store backups unencrypted, or set enabled=true to encrypt with it" $e.existingSecret) }}
{{- end }}
{{- end }}

{{/*
The encryption keys' environment (SOMA_ENCRYPTION_KEY_FILE, SOMA_ACCEPT_UNENCRYPTED) as env list
items, empty with agent.encryption.enabled=false. Takes the soma-backup values.
*/}}
{{- define "soma-backup.encryptionEnv" -}}
{{- $e := .agent.encryption -}}
{{- if include "soma-backup.encryptionOn" . }}
{{- $files := list }}
{{- range (required "agent.encryption.keys lists the Secret's keys (the first encrypts)" $e.keys) }}
{{- if or (contains "/" .) (contains "," .) (hasPrefix "." .) }}
{{- fail (printf "agent.encryption.keys: %q is not a Secret key name" .) }}
{{- end }}
{{- $files = append $files (printf "/var/run/secrets/soma-encryption/%s" .) }}
{{- end }}
- name: SOMA_ENCRYPTION_KEY_FILE
  value: {{ join "," $files | quote }}
{{- with $e.acceptUnencrypted }}
{{- if not (kindIs "string" .) }}
{{- fail "agent.encryption.acceptUnencrypted takes the time encryption was turned on (RFC 3339, e.g. \"2026-12-01T00:00:00Z\"): only unencrypted objects stored before it are read" }}
{{- end }}
- name: SOMA_ACCEPT_UNENCRYPTED
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The encryption keys' volume mount, empty with agent.encryption.enabled=false.
*/}}
{{- define "soma-backup.encryptionMount" -}}
{{- if include "soma-backup.encryptionOn" . }}
- name: soma-encryption-keys
  mountPath: /var/run/secrets/soma-encryption
  readOnly: true
{{- end }}
{{- end }}

{{/*
The encryption keys' volume, empty with agent.encryption.enabled=false.
*/}}
{{- define "soma-backup.encryptionVolume" -}}
{{- if include "soma-backup.encryptionOn" . }}
- name: soma-encryption-keys
  secret:
    secretName: {{ .agent.encryption.existingSecret | quote }}
    defaultMode: 0444
{{- end }}
{{- end }}

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
    {{- if $v.agent.token.enabled }}
    - name: SOMA_AGENT_TOKEN_FILE
      value: /var/run/secrets/soma-agent/token
    {{- end }}
    - name: SOMA_STORE
      value: {{ include "soma-backup.storeUrl" (dict "bucket" $bucket "prefix" $store.prefix) | quote }}
    {{- with $store.restoreFrom }}
    - name: SOMA_RESTORE_FROM
      value: {{ . | quote }}
    {{- end }}
    {{- if $store.readOnly }}
    {{- if and (eq $engine "postgres") $v.postgres.walStream.enabled }}
    {{- fail "store.readOnly cannot be combined with postgres.walStream.enabled: the WAL archive is written to the store" }}
    {{- end }}
    - name: SOMA_STORE_READ_ONLY
      value: "true"
    {{- end }}
    {{- with include "soma-backup.ownerId" (dict "Values" $v "Release" .Release) }}
    - name: SOMA_OWNER_ID
      value: {{ . | quote }}
    {{- end }}
    {{- include "soma-backup.encryptionEnv" $v | nindent 4 }}
    {{- include "soma-backup.awsEnv" $store | nindent 4 }}
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
    {{- $wal := $pg.walStream }}
    {{- if $wal.enabled }}
    - name: SOMA_WAL_STREAM
      value: "true"
    - name: SOMA_WAL_SPOOL
      value: {{ required "postgres.walStream.spool.path is required" $wal.spool.path | quote }}
    - name: SOMA_WAL_SLOT
      value: {{ required "postgres.walStream.slot is required" $wal.slot | quote }}
    - name: SOMA_WAL_PARTIAL_INTERVAL
      value: {{ required "postgres.walStream.partialInterval is required" $wal.partialInterval | toString | quote }}
    - name: SOMA_WAL_DRAIN_TIMEOUT
      value: {{ required "postgres.walStream.drainTimeout is required" $wal.drainTimeout | toString | quote }}
    {{- with $wal.replicationUrl }}
    {{- if or (regexMatch "(?i)password" .) (regexMatch "^[a-z]+://[^/@]*:[^/@]*@" .) }}
    {{- fail "postgres.walStream.replicationUrl must not carry a password: put it in the Secret named by postgres.walStream.replicationPasswordSecret" }}
    {{- end }}
    - name: SOMA_REPLICATION_URL
      value: {{ . | quote }}
    {{- end }}
    {{- if $wal.replicationPasswordSecret.name }}
    - name: SOMA_REPLICATION_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ $wal.replicationPasswordSecret.name | quote }}
          key: {{ required "postgres.walStream.replicationPasswordSecret.key is required" $wal.replicationPasswordSecret.key | quote }}
    {{- end }}
    {{- end }}
    {{- else }}
    {{- $q := $v.qdrant }}
    - name: SOMA_QDRANT_URL
      value: {{ required "qdrant.url is required" $q.url | quote }}
    - name: SOMA_QDRANT_MODE
      value: {{ $q.mode | quote }}
    {{- if not (kindIs "invalid" $q.peerPort) }}
    - name: SOMA_QDRANT_PEER_PORT
      value: {{ $q.peerPort | toString | quote }}
    {{- end }}
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
    {{- with include "soma-backup.schedules" (dict "engine" $engine "Values" $v) }}
    - name: SOMA_SCHEDULES
      value: {{ . | quote }}
    {{- with $v.agent.scheduleTimeZone }}
    - name: SOMA_SCHEDULE_TIMEZONE
      value: {{ . | quote }}
    {{- end }}
    {{- with $v.agent.scheduleJitter }}
    - name: SOMA_SCHEDULE_JITTER
      value: {{ . | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.agent.retention }}
    - name: SOMA_RETENTION
      value: {{ . | quote }}
    {{- end }}
    {{- if include "soma-backup.drillVolume" (dict "engine" $engine "Values" $v) }}
    - name: SOMA_DRILL_DIR
      value: {{ clean $v.agent.drill.dir | quote }}
    {{- end }}
    {{- $metrics := $v.metrics }}
    {{- if $metrics.enabled }}
    {{- if eq (int $metrics.port) (int $v.agent.port) }}
    {{- fail (printf "metrics.port and agent.port are both %v: the metrics listener needs a port of its own" $metrics.port) }}
    {{- end }}
    - name: SOMA_METRICS_LISTEN
      value: {{ printf "0.0.0.0:%v" $metrics.port | quote }}
    {{- if and (eq $engine "postgres") $v.postgres.walStream.enabled }}
    - name: SOMA_WAL_STUCK_AFTER
      value: {{ required "agent.walStuckAfter is required" $v.agent.walStuckAfter | toString | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.agent.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if $metrics.enabled }}
  # Serves only /metrics, /livez and /readyz: no API, so it may listen on the pod IP.
  ports:
    - name: metrics
      containerPort: {{ $metrics.port }}
      protocol: TCP
  {{- with $metrics.livenessProbe }}
  {{- if .enabled }}
  # Fails when the WAL stream is stuck (agent.walStuckAfter): restarts this container only.
  livenessProbe:
    httpGet:
      path: /livez
      port: metrics
    {{- toYaml (omit . "enabled") | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $metrics.readinessProbe }}
  {{- if .enabled }}
  # Never reflects backup health: an unready sidecar takes the database pod out of its Service.
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml (omit . "enabled") | nindent 4 }}
  {{- end }}
  {{- end }}
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
    {{- if $v.agent.token.enabled }}
    - name: soma-agent-token
      mountPath: /var/run/secrets/soma-agent
      readOnly: true
    {{- end }}
    {{- include "soma-backup.encryptionMount" $v | nindent 4 }}
    {{- if and (eq $engine "postgres") $v.postgres.walStream.enabled }}
    - name: soma-agent-wal-spool
      mountPath: {{ $v.postgres.walStream.spool.path }}
    {{- end }}
    {{- if and (eq $engine "qdrant") $v.qdrant.caCertSecret.name }}
    - name: soma-agent-qdrant-ca
      mountPath: /etc/soma-agent/qdrant-ca
      readOnly: true
    {{- end }}
    {{- if include "soma-backup.drillVolume" (dict "engine" $engine "Values" $v) }}
    - name: soma-agent-drill
      mountPath: {{ clean $v.agent.drill.dir }}
    {{- end }}
{{- end }}

{{/*
The volumes the sidecar mounts, as list items for the pod's volumes: its /tmp, the WAL spool
(PostgreSQL with postgres.walStream.enabled) and the Qdrant CA (qdrant.caCertSecret).
Takes (dict "engine" "postgres"|"qdrant" "Values" <soma-backup values>).
*/}}
{{- define "soma-backup.agentVolumes" -}}
{{- $engine := include "soma-backup.checkEngine" . -}}
- name: soma-agent-tmp
  emptyDir:
    sizeLimit: {{ .Values.agent.tmpSizeLimit }}
{{- include "soma-backup.encryptionVolume" .Values }}
{{- if .Values.agent.token.enabled }}
- name: soma-agent-token
  secret:
    secretName: {{ required "agent.token.secretName is required with agent.token.enabled" .Values.agent.token.secretName }}
    items:
      - key: token
        path: token
{{- end }}
{{- if and (eq $engine "postgres") .Values.postgres.walStream.enabled }}
{{- $spool := .Values.postgres.walStream.spool }}
- name: soma-agent-wal-spool
  {{- if $spool.volume }}
  {{- toYaml $spool.volume | nindent 2 }}
  {{- else }}
  emptyDir:
    {{- if $spool.sizeLimit }}
    sizeLimit: {{ $spool.sizeLimit }}
    {{- else }} {}
    {{- end }}
  {{- end }}
{{- end }}
{{- if and (eq $engine "qdrant") .Values.qdrant.caCertSecret.name }}
- name: soma-agent-qdrant-ca
  secret:
    secretName: {{ .Values.qdrant.caCertSecret.name }}
    items:
      - key: {{ .Values.qdrant.caCertSecret.key }}
        path: ca.crt
{{- end }}
{{- if include "soma-backup.drillVolume" (dict "engine" $engine "Values" .Values) }}
{{- $drill := .Values.agent.drill }}
- name: soma-agent-drill
  {{- if $drill.claimName }}
  persistentVolumeClaim:
    claimName: {{ $drill.claimName }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ required "agent.drill.sizeLimit is required (or agent.drill.claimName)" $drill.sizeLimit }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the sidecar of this engine gets the drill scratch volume (soma-agent-drill at
agent.drill.dir, SOMA_DRILL_DIR): PostgreSQL only, because only a physical drill writes a data
directory locally (logical and Qdrant drills restore into a scratch database or collection on the
server itself); and only when a "drill" schedule exists or agent.drill.enabled, because the
volume reserves room for a whole copy of the database. Empty otherwise.
Takes (dict "engine" "postgres"|"qdrant" "Values" <soma-backup values>).
*/}}
{{- define "soma-backup.drillVolume" -}}
{{- $engine := include "soma-backup.checkEngine" . -}}
{{- if eq $engine "postgres" -}}
{{- $wanted := .Values.agent.drill.enabled -}}
{{- range .Values.agent.schedules -}}
{{- if eq (first (regexSplit "\\s+" (trim (toString .)) -1)) "drill" -}}
{{- $wanted = true -}}
{{- end -}}
{{- end -}}
{{- if $wanted }}true{{ end -}}
{{- end -}}
{{- end }}

{{/*
SOMA_SCHEDULES for the sidecar of one engine: agent.schedules, one "ACTION CRON" per line, with
the whitespace of each entry normalised to single spaces. Entries whose action names the other
engine (backup-postgres and backup-physical on Qdrant, backup-qdrant on PostgreSQL) are left out,
so one list serves both sidecars. Every entry is checked first, whatever the engine, and a bad
one fails the render naming it: the agent would refuse it at start-up, in the database pod, and
the sidecar would crash-loop where nobody looks.
Takes (dict "engine" "postgres"|"qdrant" "Values" <soma-backup values>).
*/}}
{{- define "soma-backup.schedules" -}}
{{- $engine := include "soma-backup.checkEngine" . -}}
{{- $v := .Values -}}
{{- $actions := list "backup" "backup-postgres" "backup-physical" "backup-qdrant" "verify-latest" "drill" "prune" -}}
{{- $fields := list "minute" "hour" "day of month" "month" "day of week" -}}
{{- $min := list 0 0 1 1 0 -}}
{{- $max := list 59 23 31 12 7 -}}
{{- $months := list "JAN" "FEB" "MAR" "APR" "MAY" "JUN" "JUL" "AUG" "SEP" "OCT" "NOV" "DEC" -}}
{{- $days := list "SUN" "MON" "TUE" "WED" "THU" "FRI" "SAT" -}}
{{- $out := list -}}
{{- range $i, $entry := $v.agent.schedules -}}
{{- $words := regexSplit "\\s+" (trim (toString $entry)) -1 -}}
{{- $action := first $words -}}
{{- if not (has $action $actions) -}}
{{- fail (printf "agent.schedules[%d] %q: unknown action %q; use one of %s" $i $entry $action (join ", " $actions)) -}}
{{- end -}}
{{- if ne (len $words) 6 -}}
{{- fail (printf "agent.schedules[%d] %q: the cron expression after %q must have 5 fields (minute hour day-of-month month day-of-week, e.g. \"%s 0 3 * * *\"), it has %d" $i $entry $action $action (sub (len $words) 1)) -}}
{{- end -}}
{{- range $j, $f := rest $words -}}
{{- $name := index $fields $j -}}
{{- if not (regexMatch "^[0-9A-Za-z*,/-]+$" $f) -}}
{{- fail (printf "agent.schedules[%d] %q: the %s field %q may only hold numbers, names, *, ranges (a-b), lists (a,b) and steps (*/n)" $i $entry $name $f) -}}
{{- end -}}
{{- if regexMatch "/0*([^0-9]|$)" $f -}}
{{- fail (printf "agent.schedules[%d] %q: the %s field %q has a step of 0" $i $entry $name $f) -}}
{{- end -}}
{{- range $n := regexFindAll "[0-9]+" (regexReplaceAll "/[0-9]+" $f "") -1 -}}
{{- if or (lt (atoi $n) (index $min $j)) (gt (atoi $n) (index $max $j)) -}}
{{- fail (printf "agent.schedules[%d] %q: the %s field %q holds %s, outside %d-%d" $i $entry $name $f $n (index $min $j) (index $max $j)) -}}
{{- end -}}
{{- end -}}
{{- range $word := regexFindAll "[A-Za-z]+" $f -1 -}}
{{- $names := ternary $months (ternary $days (list) (eq $j 4)) (eq $j 3) -}}
{{- if not (has (upper $word) $names) -}}
{{- fail (printf "agent.schedules[%d] %q: the %s field %q holds %q, which is not a %s" $i $entry $name $f $word (ternary "month name (JAN-DEC)" (ternary "day name (SUN-SAT)" "number" (eq $j 4)) (eq $j 3))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $action "prune") (not $v.agent.retention) -}}
{{- fail (printf "agent.schedules[%d] %q: a prune schedule needs agent.retention, the policy it prunes by (e.g. \"keep-daily=14,keep-weekly=8,keep-monthly=12\")" $i $entry) -}}
{{- end -}}
{{- $other := ternary (list "backup-qdrant") (list "backup-postgres" "backup-physical") (eq $engine "postgres") -}}
{{- if not (has $action $other) -}}
{{- $out = append $out (join " " $words) -}}
{{- end -}}
{{- end -}}
{{- join "\n" $out -}}
{{- end }}

{{/*
Physical (point-in-time) restore of PostgreSQL: an init container for the PostgreSQL pod that lays
a base backup into the empty data volume before PostgreSQL starts, and what the PostgreSQL
container then needs to replay WAL from the store. Four templates, each rendering nothing unless
restore.physical.enabled, all taking (dict "Values" <soma-backup values>):

  initContainers:
    {{- include "soma-backup.physicalRestoreInitContainers" (dict "Values" $soma) | nindent 4 }}
  containers:
    - name: postgresql
      env:
        {{- include "soma-backup.physicalRestoreEnv" (dict "Values" $soma) | nindent 8 }}
      volumeMounts:
        {{- include "soma-backup.physicalRestoreVolumeMounts" (dict "Values" $soma) | nindent 8 }}
  volumes:
    {{- include "soma-backup.physicalRestoreVolumes" (dict "Values" $soma) | nindent 4 }}

The init container (image: the agent's; user: restore.physical.runAsUser, PostgreSQL's own):
  1. copies soma-agent into the emptyDir soma-agent-bin, which the PostgreSQL container mounts at
     /soma-bin: restore-pgdata writes restore_command = '/soma-bin/soma-agent wal-fetch ...' into
     postgresql.auto.conf, and PostgreSQL runs it, as itself, for every WAL file it replays. This
     happens on every start of the pod, because recovery may outlive one pod;
  2. skips the restore, saying so, when <pgdata>/PG_VERSION exists: a restart after a successful
     restore (or a cluster that was never restored) starts PostgreSQL on its data as it is;
  3. otherwise runs `soma-agent restore-pgdata --backup ID --pgdata DIR --target... --agent-binary
     /soma-bin/soma-agent`. A marker beside DIR (<pgdata>.soma-restore-incomplete, on the data
     volume) exists exactly while that runs: the base backup writes PG_VERSION long before it is
     complete, so a restore killed halfway (node lost, OOM) must not look finished. Finding the
     marker, the next start removes what the interrupted restore wrote and restores again. A
     non-empty DIR without PG_VERSION and without the marker is someone else's: it is refused.
The init container and the PostgreSQL container get the S3 environment of
"soma-backup.readOnlyAwsEnv" (store.readOnlyCredentials when given: they only read; the store
location itself is part of restore_command), the encryption keys (agent.encryption, mounted at the
sidecar's path, which restore_command names), plus restore.physical.postgresEnv (bitnami's entrypoint deletes
recovery.signal at start unless POSTGRESQL_PERFORM_RESTORE=yes, which would silently turn the
point-in-time recovery into a plain start on the base backup), and the read-only soma-agent-bin
mount. The soma-agent binary
is built on Debian bookworm (glibc): the PostgreSQL image must be glibc-based (bitnami and the
official Debian images are; Alpine images are not).
*/}}
{{- define "soma-backup.physicalRestoreBinDir" -}}/soma-bin{{- end }}

{{- define "soma-backup.physicalRestorePgdata" -}}
{{- $p := .restore.physical -}}
{{- $pgdata := clean (required "restore.physical.pgdataPath is required" $p.pgdataPath) -}}
{{- $mount := clean (required "restore.physical.dataVolume.mountPath is required" $p.dataVolume.mountPath) -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $mount)) $pgdata) -}}
{{- fail (printf "restore.physical.pgdataPath (%s) must be a directory below restore.physical.dataVolume.mountPath (%s): the restore keeps its progress marker beside the data directory, on the same volume" $pgdata $mount) -}}
{{- end -}}
{{- $pgdata -}}
{{- end }}

{{- define "soma-backup.physicalRestoreInitContainers" -}}
{{- $v := required "soma-backup.physicalRestoreInitContainers: pass \"Values\" (the soma-backup values)" .Values -}}
{{- $p := $v.restore.physical -}}
{{- if $p.enabled -}}
{{- $store := $v.store -}}
{{- $bucket := required "store.bucket is required for the physical restore" $store.bucket -}}
{{- $prefix := ternary $p.storePrefix $store.prefix (ne (toString $p.storePrefix) "") -}}
{{- $pgdata := include "soma-backup.physicalRestorePgdata" $v -}}
{{- $bin := include "soma-backup.physicalRestoreBinDir" . -}}
{{- if and $p.targetTime $p.targetLsn }}
{{- fail "restore.physical: set targetTime or targetLsn, not both (neither: replay all the WAL in the store)" }}
{{- end -}}
- name: soma-restore-pgdata
  image: {{ include "soma-backup.image" $v | quote }}
  imagePullPolicy: {{ $v.agent.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      set -eu
      cp "$(command -v soma-agent)" {{ $bin }}/soma-agent
      marker="${PGDATA}.soma-restore-incomplete"
      if [ -e "$marker" ]; then
        echo "soma-restore-pgdata: an earlier restore into $PGDATA was interrupted ($marker exists): removing what it wrote and restoring again"
        if [ -d "$PGDATA" ]; then find "$PGDATA" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +; fi
      elif [ -e "$PGDATA/PG_VERSION" ]; then
        echo "soma-restore-pgdata: $PGDATA/PG_VERSION exists, so this data directory is already restored (or was initialised by PostgreSQL): skipping the restore; PostgreSQL starts on the data as it is"
        exit 0
      elif [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
        echo "soma-restore-pgdata: $PGDATA is not empty but has no PG_VERSION: refusing to restore over files this restore did not write; empty the directory (or use a new volume) and delete the pod" >&2
        exit 1
      fi
      touch "$marker"
      echo "soma-restore-pgdata: restoring into $PGDATA: soma-agent $*"
      soma-agent "$@"
      rm -f "$marker"
      echo "soma-restore-pgdata: restore complete; PostgreSQL replays the WAL up to the target and promotes when it starts"
    - soma-restore-pgdata
  args:
    - restore-pgdata
    - --backup
    - {{ $p.backup | toString | quote }}
    - --pgdata
    - {{ $pgdata | quote }}
    {{- if $p.targetTime }}
    - --target-time
    - {{ $p.targetTime | toString | quote }}
    {{- else if $p.targetLsn }}
    - --target-lsn
    - {{ $p.targetLsn | toString | quote }}
    {{- else }}
    - --target
    - latest
    {{- end }}
    - --agent-binary
    - {{ printf "%s/soma-agent" $bin | quote }}
  env:
    - name: SOMA_STORE
      value: {{ include "soma-backup.storeUrl" (dict "bucket" $bucket "prefix" $prefix) | quote }}
    {{- with $store.restoreFrom }}
    - name: SOMA_RESTORE_FROM
      value: {{ . | quote }}
    {{- end }}
    {{- include "soma-backup.readOnlyAwsEnv" $store | nindent 4 }}
    - name: SOMA_LOG_FORMAT
      value: {{ $v.agent.logFormat | quote }}
    - name: PGDATA
      value: {{ $pgdata | quote }}
    {{- include "soma-backup.encryptionEnv" $v | nindent 4 }}
  # The restore's last lines (its error, if any) also become the container's termination message.
  terminationMessagePolicy: FallbackToLogsOnError
  {{- with $p.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- $user := dict "runAsUser" (required "restore.physical.runAsUser is required (PostgreSQL's uid)" $p.runAsUser) }}
    {{- if not (kindIs "invalid" $p.runAsGroup) }}
    {{- $_ := set $user "runAsGroup" $p.runAsGroup }}
    {{- end }}
    {{- toYaml (mergeOverwrite (deepCopy $v.agent.securityContext) $user) | nindent 4 }}
  volumeMounts:
    - name: {{ required "restore.physical.dataVolume.name is required" $p.dataVolume.name }}
      mountPath: {{ clean $p.dataVolume.mountPath }}
      {{- with $p.dataVolume.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: soma-agent-bin
      mountPath: {{ $bin }}
    - name: soma-restore-tmp
      mountPath: /tmp
    {{- include "soma-backup.encryptionMount" $v | nindent 4 }}
{{- end }}
{{- end }}

{{- define "soma-backup.physicalRestoreVolumes" -}}
{{- $v := required "soma-backup.physicalRestoreVolumes: pass \"Values\" (the soma-backup values)" .Values -}}
{{- if $v.restore.physical.enabled -}}
- name: soma-agent-bin
  emptyDir:
    sizeLimit: {{ $v.restore.physical.binSizeLimit }}
- name: soma-restore-tmp
  emptyDir:
    sizeLimit: {{ $v.agent.tmpSizeLimit }}
{{- /* The keys' volume (agent.encryption) comes with the sidecar's ("soma-backup.agentVolumes"). */}}
{{- end }}
{{- end }}

{{- define "soma-backup.physicalRestoreVolumeMounts" -}}
{{- $v := required "soma-backup.physicalRestoreVolumeMounts: pass \"Values\" (the soma-backup values)" .Values -}}
{{- if $v.restore.physical.enabled -}}
- name: soma-agent-bin
  mountPath: {{ include "soma-backup.physicalRestoreBinDir" . }}
  readOnly: true
{{- include "soma-backup.encryptionMount" $v }}
{{- end }}
{{- end }}

{{- define "soma-backup.physicalRestoreEnv" -}}
{{- $v := required "soma-backup.physicalRestoreEnv: pass \"Values\" (the soma-backup values)" .Values -}}
{{- if $v.restore.physical.enabled }}
{{- include "soma-backup.readOnlyAwsEnv" $v.store }}
{{- include "soma-backup.encryptionEnv" $v }}
{{- with $v.restore.physical.postgresEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the metrics Service, ServiceMonitor, PodMonitor and PrometheusRule.
*/}}
{{- define "soma-backup.metricsName" -}}
{{- printf "%s-metrics" (include "soma-backup.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The job label Prometheus gives the agents' samples, for the target-down alert: the Service's name
with the ServiceMonitor, "<namespace>/<PodMonitor name>" with the PodMonitor (the Prometheus
Operator's defaults), or metrics.prometheusRule.job. Empty when none applies.
*/}}
{{- define "soma-backup.metricsJob" -}}
{{- $m := .Values.metrics -}}
{{- if $m.prometheusRule.job -}}
{{- $m.prometheusRule.job -}}
{{- else if $m.serviceMonitor.enabled -}}
{{- include "soma-backup.metricsName" . -}}
{{- else if $m.podMonitor.enabled -}}
{{- printf "%s/%s" .Release.Namespace (include "soma-backup.metricsName" .) -}}
{{- end -}}
{{- end }}

{{/*
A Prometheus duration of the values ("26h", "8d", "15m") in seconds, for comparisons with
timestamps: a number and one of s, m, h, d, w (values.schema.json allows nothing else).
Takes (list DURATION "the.value.path").
*/}}
{{- define "soma-backup.seconds" -}}
{{- $d := toString (index . 0) -}}
{{- if not (regexMatch "^[0-9]+[smhdw]$" $d) -}}
{{- fail (printf "%s: %q is not a Prometheus duration like 15m, 26h or 8d" (index . 1) $d) -}}
{{- end -}}
{{- $unit := dict "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 -}}
{{- mul (atoi (trimSuffix (substr (sub (len $d) 1 | int) (len $d) $d) $d)) (get $unit (substr (sub (len $d) 1 | int) (len $d) $d)) -}}
{{- end }}
