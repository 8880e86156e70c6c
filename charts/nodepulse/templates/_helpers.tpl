{{/* Chart name. */}}
{{- define "nodepulse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of the chart's objects: the release name, plus the chart name unless the release
name already contains it ("nodepulse" -> nodepulse-agent, nodepulse-controller).
*/}}
{{- define "nodepulse.fullname" -}}
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

{{/* chart label value. */}}
{{- define "nodepulse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Pod templates use nodepulse.podLabels instead: no chart version there, so
an upgrade of the chart alone does not roll the pods.
*/}}
{{- define "nodepulse.labels" -}}
helm.sh/chart: {{ include "nodepulse.chart" . }}
app.kubernetes.io/name: {{ include "nodepulse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nodepulse
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Stable selector labels; call with (dict "ctx" $ "component" "agent"). */}}
{{- define "nodepulse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nodepulse.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of a component's objects; call with (dict "ctx" $ "component" "agent"). */}}
{{- define "nodepulse.componentLabels" -}}
{{ include "nodepulse.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Pod template labels: selector labels, common labels and the component's podLabels. */}}
{{- define "nodepulse.podLabels" -}}
{{ include "nodepulse.selectorLabels" . }}
app.kubernetes.io/part-of: nodepulse
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- with .podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Namespace of the agent and the controller. */}}
{{- define "nodepulse.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name }}
{{- end }}

{{/* The nodepulse image. */}}
{{- define "nodepulse.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Object names. */}}
{{- define "nodepulse.agentName" -}}
{{- printf "%s-agent" (include "nodepulse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "nodepulse.controllerName" -}}
{{- printf "%s-controller" (include "nodepulse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* DNS name of etcd member i; call with (dict "ctx" $ "pod" "etcd-0"). */}}
{{- define "nodepulse.etcdMemberHost" -}}
{{- $e := .ctx.Values.etcd -}}
{{- printf "%s.%s.%s.svc.%s" .pod $e.serviceName $e.namespace.name .ctx.Values.clusterDomain }}
{{- end }}

{{/* Scheme of etcd's client URLs. */}}
{{- define "nodepulse.etcdClientScheme" -}}
{{- if .Values.etcd.tls.client.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* Scheme of etcd's peer URLs. */}}
{{- define "nodepulse.etcdPeerScheme" -}}
{{- if .Values.etcd.tls.peer.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* --initial-cluster: every member's name and peer URL, from the headless Service's pod DNS names. */}}
{{- define "nodepulse.etcdInitialCluster" -}}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $pod := printf "%s-%d" $.Values.etcd.statefulSetName $i }}
{{- $host := include "nodepulse.etcdMemberHost" (dict "ctx" $ "pod" $pod) }}
{{- $members = append $members (printf "%s=%s://%s:%d" $pod (include "nodepulse.etcdPeerScheme" $) $host (int $.Values.etcd.peerPort)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* The etcd client URLs the agent and the controller use (comma-separated). */}}
{{- define "nodepulse.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $pod := printf "%s-%d" $.Values.etcd.statefulSetName $i }}
{{- $host := include "nodepulse.etcdMemberHost" (dict "ctx" $ "pod" $pod) }}
{{- $urls = append $urls (printf "%s://%s:%d" (include "nodepulse.etcdClientScheme" $) $host (int $.Values.etcd.clientPort)) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled is false: set etcd.external.endpoints to the client URLs of your etcd cluster" }}
{{- end }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Environment shared by the agent and the controller: etcd connection, logging, namespace. */}}
{{- define "nodepulse.commonEnv" -}}
- name: NODEPULSE_ETCD_ENDPOINTS
  value: {{ include "nodepulse.etcdEndpoints" . | quote }}
{{- if .Values.etcd.client.tls.enabled }}
- name: NODEPULSE_ETCD_CA_FILE
  value: /etc/nodepulse/etcd-tls/ca.crt
- name: NODEPULSE_ETCD_CERT_FILE
  value: /etc/nodepulse/etcd-tls/tls.crt
- name: NODEPULSE_ETCD_KEY_FILE
  value: /etc/nodepulse/etcd-tls/tls.key
{{- end }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/*
etcd user name and password of one component, from its Secret (never a literal value in the pod
spec); call with (dict "ctx" $ "component" "agent"|"controller"). Each component's Secret defaults
to etcd.client.auth.secretName; give the agent and the controller their own least-privilege users
(hack/etcd-roles.sh) with etcd.client.auth.agentSecretName / controllerSecretName.
*/}}
{{- define "nodepulse.etcdAuthEnv" -}}
{{- $auth := .ctx.Values.etcd.client.auth }}
{{- if $auth.enabled }}
{{- $secret := $auth.secretName }}
{{- if and (eq .component "agent") $auth.agentSecretName }}{{ $secret = $auth.agentSecretName }}{{ end }}
{{- if and (eq .component "controller") $auth.controllerSecretName }}{{ $secret = $auth.controllerSecretName }}{{ end }}
- name: NODEPULSE_ETCD_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: username
- name: NODEPULSE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: password
{{- end }}
{{- end }}

{{/* The etcd client TLS volume mount and volume, when enabled. */}}
{{- define "nodepulse.etcdTLSMount" -}}
{{- if .Values.etcd.client.tls.enabled }}
- name: etcd-tls
  mountPath: /etc/nodepulse/etcd-tls
  readOnly: true
{{- end }}
{{- end }}
{{/* Call with (dict "ctx" $ "component" "agent"|"controller"): with certificates the chart
generates, each component has its own client certificate. */}}
{{- define "nodepulse.etcdTLSVolume" -}}
{{- $v := .ctx.Values.etcd }}
{{- if $v.client.tls.enabled }}
- name: etcd-tls
  secret:
    {{- if and $v.enabled $v.tls.generate }}
    secretName: {{ printf "%s-%s" $v.client.tls.secretName .component }}
    {{- else }}
    secretName: {{ $v.client.tls.secretName }}
    {{- end }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The pod's user and group (podUser; each left out when null, for the platform to choose),
and with fsGroup=true the volumes' group. Call with (dict "ctx" $ "fsGroup" bool). */}}
{{- define "nodepulse.podUser" -}}
{{- $u := .ctx.Values.podUser -}}
{{- with $u.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with $u.runAsGroup }}
runAsGroup: {{ . }}
{{- if $.fsGroup }}
fsGroup: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Container security context of the nodepulse containers: non-root, nothing writable, no capabilities. */}}
{{- define "nodepulse.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
{{- include "nodepulse.podUser" (dict "ctx" . "fsGroup" false) }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* etcd's backend quota in bytes: etcd.quotaBackendBytes when set; else, on a volume, three
quarters of it (the database must stop taking writes before the disk is full: a full disk makes
etcd exit, while a full quota only raises the NOSPACE alarm; the rest holds the WAL and
snapshots), at most etcd's recommended 8 GiB; else etcd's default (empty). */}}
{{- define "nodepulse.etcdQuota" -}}
{{- $e := .Values.etcd -}}
{{- if $e.quotaBackendBytes -}}
{{- int64 $e.quotaBackendBytes -}}
{{- else if $e.persistence.enabled -}}
{{- $size := $e.persistence.size | toString -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $number := regexFind "^[0-9]+" $size -}}
{{- $unit := trimPrefix $number $size -}}
{{- if or (not $number) (and $unit (not (hasKey $units $unit))) -}}
{{- fail (printf "etcd.persistence.size %q: want a whole number with Ki, Mi, Gi, Ti, K, M, G or T (or set etcd.quotaBackendBytes)" $size) -}}
{{- end -}}
{{- $bytes := mul (int64 $number) (int64 (get $units $unit | default 1)) -}}
{{- min (div (mul $bytes 3) 4) 8589934592 -}}
{{- end -}}
{{- end }}
