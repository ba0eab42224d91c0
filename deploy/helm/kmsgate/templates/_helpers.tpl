{{/* Names and labels shared by every manifest of the chart. */}}

{{- define "kmsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kmsgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kmsgate.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kmsgate.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kmsgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kmsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kmsgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kmsgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kmsgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kmsgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding one of the chart's secrets: the existing one named in values, or the chart's own. */}}
{{- define "kmsgate.secretName" -}}
{{- $s := index .root.Values.secrets .key -}}
{{- if $s.existingSecret }}{{ $s.existingSecret }}{{ else }}{{ include "kmsgate.fullname" .root }}-{{ .suffix }}{{ end }}
{{- end }}

{{/* SQLite keeps the store on the data volume: one replica only. */}}
{{- define "kmsgate.sqlite" -}}
{{- if and (not .Values.config.store.url) (not .Values.secrets.databaseUrl.existingSecret) (not .Values.secrets.databaseUrl.value) }}true{{ end }}
{{- end }}

{{- define "kmsgate.validate" -}}
{{- if include "kmsgate.sqlite" . }}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- fail "the embedded SQLite store serves one replica: set config.store.url (or secrets.databaseUrl) to PostgreSQL for replicaCount > 1 or autoscaling" }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.xks.enabled .Values.ingress.xks.passthrough (not .Values.tls.enabled) }}
{{- fail "ingress.xks.passthrough needs tls.enabled: with TLS passthrough kmsgate itself terminates TLS" }}
{{- end }}
{{- if and (not .Values.secrets.kek.existingSecret) (not .Values.secrets.kek.value) }}
{{- fail "the software backend's root key: set secrets.kek.existingSecret (recommended) or secrets.kek.value" }}
{{- end }}
{{- end }}
