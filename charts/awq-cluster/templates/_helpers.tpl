{{/*
Helpers shared by every template: names, labels, addresses, the fixed security contexts and the
checks of values that the schema cannot express.
*/}}

{{- define "awq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 42 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" (or fullnameOverride), at most 42 characters so that every suffix fits. */}}
{{- define "awq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "awq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource; call with (dict "ctx" $ "component" "workers"). */}}
{{- define "awq.labels" -}}
helm.sh/chart: {{ include "awq.chart" .ctx }}
{{ include "awq.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: awq-cluster
{{- end -}}

{{- define "awq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "awq.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "awq.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The host at which a Service of this release is reached: addressHost, or its cluster DNS name. */}}
{{- define "awq.serviceHost" -}}
{{- if .ctx.Values.addressHost -}}
{{- .ctx.Values.addressHost -}}
{{- else -}}
{{- printf "%s.%s.svc.%s" .service .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}
{{- end -}}

{{/* The coordinator's URL, as workers and clients use it (`--coordinator`): https:// with tls.enabled. */}}
{{- define "awq.coordinatorUrl" -}}
{{- $svc := printf "%s-coordinator" (include "awq.fullname" .) -}}
{{- $scheme := ternary "https" "http" .Values.tls.enabled -}}
{{- printf "%s://%s:%d" $scheme (include "awq.serviceHost" (dict "ctx" . "service" $svc)) (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* The host a worker advertises for its stage ports (`--advertise`): its pod IP, or with TLS its
stable DNS name under the workers' headless Service, which a certificate can name
(`*.<fullname>-workers.<namespace>.svc.<domain>`); pod IPs change. addressHost keeps the pod IP. */}}
{{- define "awq.workerAdvertiseHost" -}}
{{- if and .Values.tls.enabled (not .Values.addressHost) -}}
{{- printf "$(POD_NAME).%s-workers.%s.svc.%s" (include "awq.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
$(POD_IP)
{{- end -}}
{{- end -}}

{{/* The coordinator's `--store`. */}}
{{- define "awq.store" -}}
{{- if eq .Values.etcd.mode "statefulset" -}}
{{- $svc := printf "%s-etcd" (include "awq.fullname" .) -}}
{{- printf "etcd://%s:%d" (include "awq.serviceHost" (dict "ctx" . "service" $svc)) (int .Values.etcd.clientPort) -}}
{{- else if eq .Values.etcd.mode "external" -}}
{{- printf "etcd://%s" .Values.etcd.externalEndpoint -}}
{{- else -}}
memory
{{- end -}}
{{- end -}}

{{/* `cpu`, or `cuda:0,...,cuda:N-1` for N GPUs. */}}
{{- define "awq.devices" -}}
{{- $n := int . -}}
{{- if eq $n 0 -}}
cpu
{{- else -}}
{{- $devices := list -}}
{{- range $i := until $n -}}
{{- $devices = append $devices (printf "cuda:%d" $i) -}}
{{- end -}}
{{- join "," $devices -}}
{{- end -}}
{{- end -}}

{{/* How many workers a worker pod runs (one per GPU; one on the CPU), hence its stage ports. */}}
{{- define "awq.workerCount" -}}
{{- max 1 (int .Values.workers.gpus) -}}
{{- end -}}

{{/* The name of the I-th worker's stage port in a worker pod: `stage`, `stage-1`, `stage-2`, ... */}}
{{- define "awq.stagePortName" -}}
{{- if eq (int .) 0 -}}stage{{- else -}}{{ printf "stage-%d" (int .) }}{{- end -}}
{{- end -}}

{{/* Container resources with nvidia.com/gpu set to N in requests and limits (none for N = 0). */}}
{{- define "awq.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- $n := int .gpus -}}
{{- if gt $n 0 -}}
{{- $requests := deepCopy (default dict $res.requests) -}}
{{- $limits := deepCopy (default dict $res.limits) -}}
{{- $_ := set $requests "nvidia.com/gpu" $n -}}
{{- $_ := set $limits "nvidia.com/gpu" $n -}}
{{- $_ := set $res "requests" $requests -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The pod securityContext of every pod (non-root, fsGroup, seccomp RuntimeDefault). */}}
{{- define "awq.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The securityContext of every container. */}}
{{- define "awq.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of every awq process: logs, and a writable HOME and kernel cache (the root
filesystem is read-only). */}}
{{- define "awq.commonEnv" -}}
- name: AWQ_LOG
  value: {{ .Values.logLevel | quote }}
- name: NO_COLOR
  value: "1"
- name: HOME
  value: /tmp
- name: AWQ_KERNEL_CACHE
  value: /var/cache/awq/kernels
{{- end -}}

{{/* The writable folders of every awq container (mounts; the volumes are in awq.scratchVolumes). */}}
{{- define "awq.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: kernel-cache
  mountPath: /var/cache/awq
{{- end -}}

{{- define "awq.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: kernel-cache
  emptyDir: {}
{{- end -}}

{{/* The model store's volume (name model-store), if any. */}}
{{- define "awq.modelStoreVolume" -}}
{{- $m := .Values.modelStore -}}
{{- if eq $m.type "pvc" -}}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "awq.fullname" .)) $m.pvc.existingClaim }}
{{- else if eq $m.type "hostPath" -}}
- name: model-store
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if eq $m.type "nfs" -}}
- name: model-store
  nfs:
    server: {{ $m.nfs.server }}
    path: {{ $m.nfs.path }}
{{- end -}}
{{- end -}}

{{- define "awq.modelStoreMount" -}}
{{- if ne .Values.modelStore.type "none" -}}
- name: model-store
  mountPath: {{ .Values.modelStore.mountPath }}
{{- end -}}
{{- end -}}

{{/* The Secret holding the HTTP API's key (the coordinator's and the server's), or nothing. */}}
{{- define "awq.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if .Values.apiKey.value -}}
{{- printf "%s-api-key" (include "awq.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the gRPC tokens, or nothing when they are off. */}}
{{- define "awq.tokensSecret" -}}
{{- if .Values.tokens.enabled -}}
{{- default (printf "%s-tokens" (include "awq.fullname" .)) .Values.tokens.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Where a pod finds its tokens (files named admin-token and worker-token). */}}
{{- define "awq.tokensDir" -}}
/var/run/secrets/awq
{{- end -}}

{{/* The tokens volume, with the tokens a pod needs: call with (dict "ctx" $ "admin" true/false).
Every awq pod but the server gets the worker token or the admin token, never more than it uses:
the admin token goes only to the coordinator and to the client pods (the deployments Job, helm
test), the worker token to the coordinator and the workers. */}}
{{- define "awq.tokensVolume" -}}
{{- $secret := include "awq.tokensSecret" .ctx -}}
{{- if $secret -}}
- name: tokens
  secret:
    secretName: {{ $secret }}
    items:
      {{- if .admin }}
      - key: {{ .ctx.Values.tokens.adminTokenKey }}
        path: admin-token
      {{- end }}
      {{- if .worker }}
      - key: {{ .ctx.Values.tokens.workerTokenKey }}
        path: worker-token
      {{- end }}
{{- end -}}
{{- end -}}

{{- define "awq.tokensMount" -}}
{{- if include "awq.tokensSecret" . -}}
- name: tokens
  mountPath: {{ include "awq.tokensDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* A token of the Secret the chart creates, base64: the value given, else the one the Secret
holds already (helm's lookup: kept across upgrades; empty in `helm template`), else a new one. */}}
{{- define "awq.tokenData" -}}
{{- if .value -}}
{{- .value | b64enc -}}
{{- else if .existing -}}
{{- .existing -}}
{{- else -}}
{{- randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Where a pod finds its TLS files (tls.crt, tls.key, ca.crt: those it uses). */}}
{{- define "awq.tlsDir" -}}
/etc/awq/tls
{{- end -}}

{{/* The TLS volume of a pod, with the files it uses: call with (dict "ctx" $ "cert" .. "ca" ..).
Every pod that dials another (all but the server: "ca" true) gets the CA; a pod that serves TLS
(coordinator, workers, server: "cert" true) gets the certificate and its key, and so do the client
pods (the deployments Job, helm test) with tls.mutual, where they present it. Nothing without
tls.enabled. */}}
{{- define "awq.tlsVolume" -}}
{{- $t := .ctx.Values.tls -}}
{{- if $t.enabled -}}
- name: tls
  secret:
    secretName: {{ $t.existingSecret }}
    items:
      {{- if .cert }}
      - key: {{ $t.certKey }}
        path: tls.crt
      - key: {{ $t.privateKeyKey }}
        path: tls.key
      {{- end }}
      {{- if .ca }}
      - key: {{ $t.caKey }}
        path: ca.crt
      {{- end }}
{{- end -}}
{{- end -}}

{{- define "awq.tlsMount" -}}
{{- if .Values.tls.enabled -}}
- name: tls
  mountPath: {{ include "awq.tlsDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The TLS flags of an awq process, as args: call with (dict "ctx" $ "cert" .. "ca" .. "clientCa" ..):
--tls-cert/--tls-key (it serves TLS, or presents its certificate as a client of mutual TLS),
--tls-ca (what it dials is checked against the CA), --tls-client-ca (its gRPC port accepts only
clients with a certificate the CA signed). Nothing without tls.enabled. */}}
{{- define "awq.tlsArgs" -}}
{{- if .ctx.Values.tls.enabled -}}
{{- $dir := include "awq.tlsDir" .ctx -}}
{{- $args := list -}}
{{- if .cert -}}
{{- $args = concat $args (list "--tls-cert" (printf "%s/tls.crt" $dir) "--tls-key" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- if .ca -}}
{{- $args = concat $args (list "--tls-ca" (printf "%s/ca.crt" $dir)) -}}
{{- end -}}
{{- if .clientCa -}}
{{- $args = concat $args (list "--tls-client-ca" (printf "%s/ca.crt" $dir)) -}}
{{- end -}}
{{- with $args -}}{{ toYaml . }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The probe of a gRPC port (call with (dict "ctx" $ "port" NUMBER "name" PORT_NAME)): Kubernetes'
`grpc` probe (grpc.health.v1), which speaks no TLS, so with tls.enabled a TCP connect to the port. */}}
{{- define "awq.grpcProbe" -}}
{{- if .ctx.Values.tls.enabled -}}
tcpSocket:
  port: {{ .name }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end -}}
{{- end -}}

{{/* The names a tls.enabled certificate must hold (DNS SANs), comma-separated: the coordinator's
Service, every worker pod's name under the workers' headless Service (what they advertise), the
server's Service. */}}
{{- define "awq.tlsNames" -}}
{{- $fullname := include "awq.fullname" . -}}
{{- $names := list (include "awq.serviceHost" (dict "ctx" . "service" (printf "%s-coordinator" $fullname))) -}}
{{- $names = append $names (printf "*.%s-workers.%s.svc.%s" $fullname .Release.Namespace .Values.clusterDomain) -}}
{{- if .Values.server.enabled -}}
{{- $names = append $names (include "awq.serviceHost" (dict "ctx" . "service" (printf "%s-server" $fullname))) -}}
{{- end -}}
{{- join ", " $names -}}
{{- end -}}

{{/* The label that lets a pod reach the coordinator through the NetworkPolicy. */}}
{{- define "awq.clientLabel" -}}
awq-cluster/client: "true"
{{- end -}}

{{/* Checks across values that values.schema.json cannot express; every template includes it. */}}
{{- define "awq.validate" -}}
{{- if and (eq .Values.etcd.mode "external") (not .Values.etcd.externalEndpoint) -}}
{{- fail "etcd.mode is external: set etcd.externalEndpoint to the etcd client endpoint (host:port)" -}}
{{- end -}}
{{- if and .Values.addressHost (gt (int .Values.etcd.replicas) 1) (eq .Values.etcd.mode "statefulset") -}}
{{- fail "addressHost runs every etcd member on one host: set etcd.replicas to 1" -}}
{{- end -}}
{{- if and (eq .Values.modelStore.type "nfs") (or (not .Values.modelStore.nfs.server) (not .Values.modelStore.nfs.path)) -}}
{{- fail "modelStore.type is nfs: set modelStore.nfs.server and modelStore.nfs.path" -}}
{{- end -}}
{{- if and .Values.server.enabled (not .Values.server.model) -}}
{{- fail "server.enabled: set server.model to the model's folder under modelStore.mountPath" -}}
{{- end -}}
{{- if and .Values.server.enabled (eq .Values.modelStore.type "none") -}}
{{- fail "server.enabled: the server reads its model from the model store; set modelStore.type" -}}
{{- end -}}
{{- if and .Values.deployments (eq .Values.modelStore.type "none") -}}
{{- fail "deployments: their models are read from the model store; set modelStore.type" -}}
{{- end -}}
{{- $names := dict -}}
{{- $served := dict -}}
{{- range .Values.deployments -}}
{{- if hasKey $names .name -}}
{{- fail (printf "deployments: the name %s is given twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- $as := default .name .servedModelName -}}
{{- if hasKey $served $as -}}
{{- fail (printf "deployments: %s and %s are both served as %s (servedModelName must be unique)" (get $served $as) .name $as) -}}
{{- end -}}
{{- $_ := set $served $as .name -}}
{{- end -}}
{{- $lastStage := add (int .Values.workers.stagePort) (int (include "awq.workerCount" .)) -1 -}}
{{- if gt (int $lastStage) 65535 -}}
{{- fail (printf "workers.stagePort + workers.gpus - 1 = %d is past 65535: the worker of GPU i listens on workers.stagePort + i" (int $lastStage)) -}}
{{- end -}}
{{- if and .Values.apiKey.existingSecret .Values.apiKey.value -}}
{{- fail "apiKey: set either existingSecret or value, not both" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled: set tls.existingSecret to the Secret holding the certificate, its key and the CA (tls.crt, tls.key, ca.crt)" -}}
{{- end -}}
{{- if and .Values.tokens.existingSecret (or .Values.tokens.adminToken .Values.tokens.workerToken) -}}
{{- fail "tokens: set either existingSecret or adminToken/workerToken, not both" -}}
{{- end -}}
{{- end -}}
