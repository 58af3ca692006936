{{/*
Named templates of the vcpud chart.

Templates that take a "chart context" accept `.` inside this chart and, from a parent chart that
depends on vcpud, `.Subcharts.vcpud` (Helm >= 3.7): that context carries vcpud's own values
(the parent's overrides under `vcpud:` merged over this chart's defaults), Chart and Release.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "vcpud.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: RELEASE-NAME, or RELEASE when the release name already contains the chart name;
fullnameOverride replaces it. Truncated to 63 characters (DNS label limit).
*/}}
{{- define "vcpud.fullname" -}}
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

{{/* chart-version, as in the helm.sh/chart label. */}}
{{- define "vcpud.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: app.kubernetes.io/{name,instance,component}. They never change over a release's
life (selectors are immutable). Call with (dict "ctx" . "component" "daemon").
*/}}
{{- define "vcpud.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vcpud.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Standard labels of every object: the selector labels plus app.kubernetes.io/{version,managed-by,
part-of}, helm.sh/chart and commonLabels. Call with (dict "ctx" . "component" "daemon").
*/}}
{{- define "vcpud.labels" -}}
{{ include "vcpud.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: vcpud
helm.sh/chart: {{ include "vcpud.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The vcpud image: REGISTRY/REPOSITORY@DIGEST or REGISTRY/REPOSITORY:TAG (tag: appVersion). */}}
{{- define "vcpud.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "vcpud.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vcpud.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Fails on values the schema cannot express (mode is also an enum in values.schema.json). */}}
{{- define "vcpud.validate" -}}
{{- if not (has .Values.mode (list "daemonset" "sidecar")) }}
{{- fail (printf "mode must be daemonset or sidecar, not %q" (toString .Values.mode)) }}
{{- end }}
{{- if and (eq .Values.mode "daemonset") (not (include "vcpud.tlsSecretName" .)) }}
{{- fail "daemonset mode serves mTLS: set tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt) or certManager.enabled=true" }}
{{- end }}
{{- if and .Values.certManager.enabled (not .Values.certManager.issuerRef.name) }}
{{- fail "certManager.enabled needs certManager.issuerRef.name" }}
{{- end }}
{{- if and .Values.snapshots.enabled (has .Values.snapshots.dir (list "/run/vcpud" "/etc/vcpud/tls" "/etc/vcpud/migration-tls" "/dev/kvm")) }}
{{- fail (printf "snapshots.dir %s is a path the chart already mounts (socket, TLS or /dev/kvm): choose another, e.g. /var/lib/vcpud/snapshots" .Values.snapshots.dir) }}
{{- end }}
{{- if and .Values.stateDir.enabled (has .Values.stateDir.dir (list "/run/vcpud" "/etc/vcpud/tls" "/etc/vcpud/migration-tls" "/dev/kvm" .Values.snapshots.dir)) }}
{{- fail (printf "stateDir.dir %s is a path the chart already mounts (socket, TLS, /dev/kvm or snapshots.dir): choose another, e.g. /run/vcpud-state" .Values.stateDir.dir) }}
{{- end }}
{{- end }}

{{/* Whether the cert-manager Certificates are rendered: enabled and the API present. */}}
{{- define "vcpud.certManager" -}}
{{- if and .Values.certManager.enabled (.Capabilities.APIVersions.Has "cert-manager.io/v1") }}true{{ end }}
{{- end }}

{{/* The server TLS Secret of daemonset mode ("" when none is configured). */}}
{{- define "vcpud.tlsSecretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else if .Values.certManager.enabled }}
{{- printf "%s-tls" (include "vcpud.fullname" .) }}
{{- end }}
{{- end }}

{{/* The cert-manager client certificate's common name. */}}
{{- define "vcpud.clientCommonName" -}}
{{- default (printf "%s-client" (include "vcpud.fullname" .)) .Values.certManager.clientCertificate.commonName }}
{{- end }}

{{/* The helm test client Secret of daemonset mode ("" when none: no test is rendered). */}}
{{- define "vcpud.testClientSecretName" -}}
{{- if .Values.tests.clientSecret }}
{{- .Values.tests.clientSecret }}
{{- else if and .Values.certManager.enabled .Values.certManager.clientCertificate.enabled }}
{{- printf "%s-client-tls" (include "vcpud.fullname" .) }}
{{- end }}
{{- end }}

{{/* The client TLS Secret MigrateVm dials destinations with, daemonset mode ("" when none). */}}
{{- define "vcpud.migrationClientSecretName" -}}
{{- if eq .Values.mode "daemonset" }}
{{- if .Values.migration.clientSecret }}
{{- .Values.migration.clientSecret }}
{{- else if and .Values.certManager.enabled .Values.certManager.clientCertificate.enabled }}
{{- printf "%s-client-tls" (include "vcpud.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* --allow-client names: tls.allowedClients, plus the cert-manager client when that list is set. */}}
{{- define "vcpud.allowedClients" -}}
{{- $names := .Values.tls.allowedClients }}
{{- if and $names .Values.certManager.enabled .Values.certManager.clientCertificate.enabled }}
{{- $names = append $names (include "vcpud.clientCommonName" .) | uniq }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* DNS names of the daemonset-mode Service, for the server certificate. */}}
{{- define "vcpud.serviceDnsNames" -}}
{{- $svc := include "vcpud.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.tls.clusterDomain) }}
{{- if .Values.service.headless }}
{{- $names = append $names (printf "*.%s.%s.svc" $svc $ns) }}
{{- $names = append $names (printf "*.%s.%s.svc.%s" $svc $ns .Values.tls.clusterDomain) }}
{{- end }}
{{- toJson (concat $names .Values.certManager.extraDnsNames | uniq) }}
{{- end }}

{{/* The Unix socket path in sidecar mode ($XDG_RUNTIME_DIR/vcpud/vcpud.sock in the image). */}}
{{- define "vcpud.socketPath" -}}
/run/vcpud/vcpud.sock
{{- end }}

{{/* Name of the emptyDir that holds the socket, shared by vcpud and the app containers. */}}
{{- define "vcpud.socketVolumeName" -}}
vcpud-socket
{{- end }}

{{/* Name of the volume mounted at snapshots.dir (--snapshot-dir). */}}
{{- define "vcpud.snapshotVolumeName" -}}
vcpud-snapshots
{{- end }}

{{/* Name of the volume mounted at stateDir.dir (--state-dir). */}}
{{- define "vcpud.stateVolumeName" -}}
vcpud-state
{{- end }}

{{/*
vcpud's flags. Call with (dict "ctx" CHART_CONTEXT "mode" "daemonset"|"sidecar").
Health and metrics listen on 0.0.0.0: the kubelet probes and Prometheus reach the pod IP.
*/}}
{{- define "vcpud.args" -}}
{{- $v := .ctx.Values }}
{{- if eq .mode "daemonset" }}
- --listen=0.0.0.0:{{ $v.ports.grpc }}
- --tls-cert=/etc/vcpud/tls/tls.crt
- --tls-key=/etc/vcpud/tls/tls.key
- --tls-ca=/etc/vcpud/tls/ca.crt
{{- range (include "vcpud.allowedClients" .ctx | fromJsonArray) }}
- --allow-client={{ . }}
{{- end }}
{{- if include "vcpud.migrationClientSecretName" .ctx }}
- --migration-tls-ca=/etc/vcpud/migration-tls/ca.crt
- --migration-tls-cert=/etc/vcpud/migration-tls/tls.crt
- --migration-tls-key=/etc/vcpud/migration-tls/tls.key
{{- end }}
{{- else }}
- --listen=unix:{{ include "vcpud.socketPath" .ctx }}
- --socket-mode={{ $v.sidecar.socketMode }}
{{- end }}
- --health-listen=0.0.0.0:{{ $v.ports.health }}
{{- if $v.snapshots.enabled }}
- --snapshot-dir={{ $v.snapshots.dir }}
{{- end }}
{{- if $v.stateDir.enabled }}
- --state-dir={{ $v.stateDir.dir }}
{{- end }}
{{- if $v.metrics.enabled }}
- --metrics-listen=0.0.0.0:{{ $v.ports.metrics }}
{{- else }}
- --metrics-listen=
{{- end }}
- --log-level={{ $v.vcpud.logLevel }}
- --max-vms={{ $v.vcpud.limits.maxVms }}
- --max-vcpus-per-vm={{ $v.vcpud.limits.maxVcpusPerVm }}
- --max-memory-per-vm={{ $v.vcpud.limits.maxMemoryPerVm }}
- --max-memory-total={{ $v.vcpud.limits.maxMemoryTotal }}
- --max-message-bytes={{ $v.vcpud.maxMessageBytes }}
- --max-request-bytes-in-flight={{ $v.vcpud.maxRequestBytesInFlight }}
- --upload-stall-timeout={{ $v.vcpud.uploadStallTimeout }}
- --max-connections={{ $v.vcpud.maxConnections }}
- --handshake-timeout={{ $v.vcpud.handshakeTimeout }}
- --migration-stall-timeout={{ $v.vcpud.migrationStallTimeout }}
- --shutdown-grace-ms={{ $v.vcpud.shutdownGraceMs }}
{{- if $v.vcpud.exitOnKvmError }}
- --exit-on-kvm-error
{{- end }}
{{- range $v.vcpud.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* A gRPC probe on the plaintext health port. Call with (dict "ctx" . "probe" .Values.livenessProbe). */}}
{{- define "vcpud.grpcProbe" -}}
grpc:
  port: {{ .ctx.Values.ports.health }}
  {{- with .probe.service }}
  service: {{ . | quote }}
  {{- end }}
{{- with .probe.initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/*
The container securityContext: containerSecurityContext, except under the explicit fallback
kvm.privilegedHostPath, which overrides only what it must: privileged (the device cgroup then
admits the host's /dev/kvm) and allowPrivilegeEscalation (Kubernetes rejects privileged with
allowPrivilegeEscalation false). vcpud still runs as uid 10001 with a read-only root filesystem.
*/}}
{{- define "vcpud.containerSecurityContext" -}}
{{- $sc := deepCopy .Values.containerSecurityContext }}
{{- if .Values.kvm.privilegedHostPath }}
{{- $_ := set $sc "privileged" true }}
{{- $_ := set $sc "allowPrivilegeEscalation" true }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* resources with the KVM device-plugin resource added (not under the privileged fallback). */}}
{{- define "vcpud.resources" -}}
{{- $res := deepCopy .Values.resources }}
{{- if not .Values.kvm.privilegedHostPath }}
{{- $limits := default (dict) $res.limits }}
{{- $_ := set $limits .Values.kvm.resourceName (toString .Values.kvm.resourceCount) }}
{{- $_ := set $res "limits" $limits }}
{{- if $res.requests }}
{{- $_ := set $res.requests .Values.kvm.resourceName (toString .Values.kvm.resourceCount) }}
{{- end }}
{{- end }}
{{- if not $res.limits }}
{{- $_ := unset $res "limits" }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
The vcpud container. Call with (dict "ctx" CHART_CONTEXT "mode" "daemonset"|"sidecar").
*/}}
{{- define "vcpud.container" -}}
{{- $v := .ctx.Values }}
name: vcpud
image: {{ include "vcpud.image" .ctx }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  {{- include "vcpud.args" . | trim | nindent 2 }}
{{- with $v.vcpud.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  {{- if eq .mode "daemonset" }}
  - name: grpc
    containerPort: {{ $v.ports.grpc }}
    protocol: TCP
  {{- end }}
  - name: health
    containerPort: {{ $v.ports.health }}
    protocol: TCP
  {{- if $v.metrics.enabled }}
  - name: metrics
    containerPort: {{ $v.ports.metrics }}
    protocol: TCP
  {{- end }}
{{- if $v.startupProbe.enabled }}
startupProbe:
  {{- include "vcpud.grpcProbe" (dict "ctx" .ctx "probe" $v.startupProbe) | trim | nindent 2 }}
{{- end }}
{{- if $v.livenessProbe.enabled }}
livenessProbe:
  {{- include "vcpud.grpcProbe" (dict "ctx" .ctx "probe" $v.livenessProbe) | trim | nindent 2 }}
{{- end }}
{{- if $v.readinessProbe.enabled }}
readinessProbe:
  {{- include "vcpud.grpcProbe" (dict "ctx" .ctx "probe" $v.readinessProbe) | trim | nindent 2 }}
{{- end }}
resources:
  {{- include "vcpud.resources" .ctx | trim | nindent 2 }}
securityContext:
  {{- include "vcpud.containerSecurityContext" .ctx | trim | nindent 2 }}
volumeMounts:
  - name: {{ include "vcpud.socketVolumeName" .ctx }}
    mountPath: /run/vcpud
  {{- if eq .mode "daemonset" }}
  - name: tls
    mountPath: /etc/vcpud/tls
    readOnly: true
  {{- if include "vcpud.migrationClientSecretName" .ctx }}
  - name: migration-tls
    mountPath: /etc/vcpud/migration-tls
    readOnly: true
  {{- end }}
  {{- end }}
  {{- if $v.snapshots.enabled }}
  - name: {{ include "vcpud.snapshotVolumeName" .ctx }}
    mountPath: {{ $v.snapshots.dir }}
  {{- end }}
  {{- if $v.stateDir.enabled }}
  - name: {{ include "vcpud.stateVolumeName" .ctx }}
    mountPath: {{ $v.stateDir.dir }}
  {{- end }}
  {{- if $v.kvm.privilegedHostPath }}
  - name: kvm
    mountPath: /dev/kvm
  {{- end }}
{{- end }}

{{/*
vcpud.sidecar: the vcpud container as a native sidecar, for a pod template's initContainers.
Takes a chart context: `.` in this chart, `.Subcharts.vcpud` in a parent chart. The pod also needs
the volumes of "vcpud.socketVolume", the mount of "vcpud.socketVolumeMount" in each container that
calls vcpud, and a pod securityContext whose fsGroup is podSecurityContext.fsGroup (10001) so those
containers may use the socket ("vcpud.podSecurityContext" renders this chart's). Example:

  spec:
    securityContext:
      {{- include "vcpud.podSecurityContext" .Subcharts.vcpud | trim | nindent 6 }}
    initContainers:
      {{- include "vcpud.sidecar" .Subcharts.vcpud | trim | nindent 6 }}
    containers:
      - name: app
        env:
          - name: VCPUD_ADDR
            value: unix:/run/vcpud/vcpud.sock
        volumeMounts:
          {{- include "vcpud.socketVolumeMount" .Subcharts.vcpud | trim | nindent 10 }}
    volumes:
      {{- include "vcpud.socketVolume" .Subcharts.vcpud | trim | nindent 6 }}

restartPolicy: Always makes it a sidecar (Kubernetes >= 1.29): it starts before the app containers,
which start only once its startup probe passes (the socket is then bound), runs as long as the
pod, and stops after them.
*/}}
{{- define "vcpud.sidecar" -}}
- {{ include "vcpud.container" (dict "ctx" . "mode" "sidecar") | trim | indent 2 | trim }}
  restartPolicy: Always
{{- end }}

{{/*
Pod volumes the vcpud container needs in sidecar mode: the socket emptyDir, the snapshot volume
("vcpud.snapshotVolume", with snapshots.enabled), the state volume ("vcpud.stateVolume", with
stateDir.enabled) and /dev/kvm under the fallback. The snapshot
volume is part of it so that parent charts including only this template get every volume the
sidecar mounts.
*/}}
{{- define "vcpud.socketVolume" -}}
- name: {{ include "vcpud.socketVolumeName" . }}
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- with (include "vcpud.snapshotVolume" . | trim) }}
{{ . }}
{{- end }}
{{- with (include "vcpud.stateVolume" . | trim) }}
{{ . }}
{{- end }}
{{- if .Values.kvm.privilegedHostPath }}
- name: kvm
  hostPath:
    path: {{ .Values.kvm.hostPath }}
    type: CharDevice
{{- end }}
{{- end }}

{{/*
The snapshot volume (a one-item list; nothing with snapshots.enabled false): snapshots.volume under
the name the vcpud container mounts at snapshots.dir. Helm merges a user's snapshots.volume into
the default one, so a source given beside the default emptyDir would leave both keys: the other
source wins. Already included by "vcpud.socketVolume"; use it alone only for pods built without that.
*/}}
{{- define "vcpud.snapshotVolume" -}}
{{- if .Values.snapshots.enabled }}
{{- $source := .Values.snapshots.volume }}
{{- if gt (len $source) 1 }}
{{- $source = omit $source "emptyDir" }}
{{- end }}
- name: {{ include "vcpud.snapshotVolumeName" . }}
  {{- toYaml $source | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The state volume (a one-item list; nothing with stateDir.enabled false): stateDir.volume as
vcpud-state, another source given beside the default emptyDir winning as in "vcpud.snapshotVolume".
*/}}
{{- define "vcpud.stateVolume" -}}
{{- if .Values.stateDir.enabled }}
{{- $source := .Values.stateDir.volume }}
{{- if gt (len $source) 1 }}
{{- $source = omit $source "emptyDir" }}
{{- end }}
- name: {{ include "vcpud.stateVolumeName" . }}
  {{- toYaml $source | nindent 2 }}
{{- end }}
{{- end }}

{{/* The socket mount for an app container: /run/vcpud, socket /run/vcpud/vcpud.sock. */}}
{{- define "vcpud.socketVolumeMount" -}}
- name: {{ include "vcpud.socketVolumeName" . }}
  mountPath: /run/vcpud
{{- end }}

{{/*
The pod securityContext (podSecurityContext): non-root, fsGroup shared with the app containers,
and kvm.groupId among the supplementalGroups (the device plugin's /dev/kvm keeps the node's owner
and mode, so a 0660 root:kvm node needs the group).
*/}}
{{- define "vcpud.podSecurityContext" -}}
{{- $sc := deepCopy .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .Values.kvm.groupId) }}
{{- $groups := default (list) $sc.supplementalGroups }}
{{- $_ := set $sc "supplementalGroups" (append $groups (int64 .Values.kvm.groupId) | uniq) }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* imagePullSecrets, nodeSelector, tolerations, affinity, priorityClassName of the pods. */}}
{{- define "vcpud.podScheduling" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Component of the pods vcpud runs in (PodMonitor selector, labels). */}}
{{- define "vcpud.podComponent" -}}
{{- if eq .Values.mode "daemonset" }}daemon{{ else }}example-workload{{ end }}
{{- end }}
