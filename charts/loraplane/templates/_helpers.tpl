{{/* Names, labels and images shared by every template. */}}
{{- define "loraplane.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplane.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "loraplane.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraplane.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{/* The restricted pod security context every loraplane container runs with. */}}
{{- define "loraplane.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "loraplane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The platform config with each family's empty trainerImage filled with the chart's. */}}
{{- define "loraplane.platformConfig" -}}
{{- $p := deepCopy .Values.platform -}}
{{- $families := list -}}
{{- range $p.families -}}
{{- $f := . -}}
{{- if not $f.trainerImage -}}
{{- $f = set $f "trainerImage" (include "loraplane.image" (dict "root" $ "name" $.Values.trainer.image)) -}}
{{- end -}}
{{- $families = append $families $f -}}
{{- end -}}
{{- $_ := set $p "families" $families -}}
{{- toYaml $p -}}
{{- end -}}
