{{/* Labels every object of one component carries; the first two also select its pods. */}}
{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "herald.labels" -}}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/part-of: herald
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "herald.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}
{{- end }}

{{/* The name herald-ipam's Service has in the cluster DNS, which its certificate carries. */}}
{{- define "herald.ipamHost" -}}
{{ printf "%s-ipam.%s.svc" .Release.Name .Release.Namespace }}
{{- end }}

{{- define "herald.ipamEndpoint" -}}
{{ printf "%s://%s:%v" (ternary "https" "http" .Values.tls.enabled) (include "herald.ipamHost" .) .Values.ipam.port }}
{{- end }}

{{/* Where each component's certificate, key and CA bundle are mounted (tls.crt, tls.key,
     ca.crt: the layout of cert-manager's Secrets and of `kubernetes.io/tls` ones). */}}
{{- define "herald.tlsDir" -}}
/etc/herald-tls
{{- end }}

{{/* The Secret holding one component's certificate: `.component` is ipam, watcher or
     speaker. */}}
{{- define "herald.tlsSecret" -}}
{{- $tls := .root.Values.tls }}
{{- if eq $tls.source "existingSecret" }}
{{- get $tls.existingSecrets .component }}
{{- else }}
{{- printf "%s-%s-tls" .root.Release.Name .component }}
{{- end }}
{{- end }}

{{/* The client side's settings for mutual TLS with herald-ipam (watcher and speaker). */}}
{{- define "herald.clientTlsSettings" -}}
{{- if .Values.tls.enabled -}}
tls_cert: {{ printf "%s/tls.crt" (include "herald.tlsDir" .) | quote }}
tls_key: {{ printf "%s/tls.key" (include "herald.tlsDir" .) | quote }}
tls_ca: {{ printf "%s/ca.crt" (include "herald.tlsDir" .) | quote }}
ipam_server_name: {{ include "herald.ipamHost" . | quote }}
{{- end }}
{{- end }}

{{/* The certificate volume of one component's pods (`.component` as for herald.tlsSecret).
     Group-readable only: the pods' fsGroup is the processes' group. */}}
{{- define "herald.tlsVolume" -}}
{{- if .root.Values.tls.enabled -}}
- name: tls
  secret:
    secretName: {{ include "herald.tlsSecret" . | quote }}
    defaultMode: 0440
    items:
      - { key: tls.crt, path: tls.crt }
      - { key: tls.key, path: tls.key }
      - { key: ca.crt, path: ca.crt }
{{- end }}
{{- end }}

{{- define "herald.tlsMount" -}}
{{- if .Values.tls.enabled -}}
- { name: tls, mountPath: {{ include "herald.tlsDir" . }}, readOnly: true }
{{- end }}
{{- end }}

{{/* The Pod Security "restricted" profile's pod-level fields. */}}
{{- define "herald.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile: { type: RuntimeDefault }
{{- end }}

{{/* The "restricted" profile's container fields; the root filesystem is read-only because
     nothing is written outside the mounted volumes. */}}
{{- define "herald.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: { drop: ["ALL"] }
{{- end }}
