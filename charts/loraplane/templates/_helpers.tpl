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

{{/*
Egress ipBlocks for a list of CIDRs. The cloud metadata endpoint (169.254.169.254) is never
reachable: a CIDR that contains it gets it as an `except` (a /32 of it is refused). Integer
arithmetic on the dotted quad, since Helm has no CIDR functions.
*/}}
{{- define "loraplane.ipBlocks" -}}
{{- $meta := 2852039166 }}
{{- range . }}
{{- $parts := split "/" . }}
{{- $o := split "." $parts._0 }}
{{- $ip := add (mul (atoi $o._0) 16777216) (mul (atoi $o._1) 65536) (mul (atoi $o._2) 256) (atoi $o._3) }}
{{- $prefix := atoi $parts._1 }}
{{- $size := 1 }}
{{- range until (sub 32 $prefix | int) }}{{ $size = mul $size 2 }}{{ end }}
{{- $hasMeta := eq (div $ip $size) (div $meta $size) }}
{{- if and $hasMeta (eq $prefix 32) }}
{{- fail "networkPolicy: a /32 of the cloud metadata endpoint 169.254.169.254 may not be allowed" }}
{{- end }}
- ipBlock:
    cidr: {{ . | quote }}
    {{- if $hasMeta }}
    except: ["169.254.169.254/32"]
    {{- end }}
{{- end }}
{{- end }}

{{/*
The namespaces the API writes in: every tenant's and the Stripe order namespace. A JSON list:
`include "loraplane.apiNamespaces" . | fromJsonArray`.
*/}}
{{- define "loraplane.apiNamespaces" -}}
{{- $namespaces := list -}}
{{- range .Values.api.tenants -}}
{{- $namespaces = append $namespaces .namespace -}}
{{- end -}}
{{- $namespaces = append $namespaces .Values.api.stripe.namespace -}}
{{- uniq $namespaces | toJson -}}
{{- end -}}

{{/*
The namespaces jobs (and so trainer pods, their Secrets and claims) live in: `jobNamespaces`,
the operator's `watchNamespace` if it has one, and the API's namespaces. The trainer
NetworkPolicy and the operator's namespaced RBAC are rendered into each. A JSON list:
`include "loraplane.jobNamespaces" . | fromJsonArray`.
*/}}
{{- define "loraplane.jobNamespaces" -}}
{{- $namespaces := .Values.jobNamespaces | default list -}}
{{- with .Values.operator.watchNamespace -}}
{{- $namespaces = append $namespaces . -}}
{{- end -}}
{{- $namespaces = concat $namespaces (include "loraplane.apiNamespaces" . | fromJsonArray) -}}
{{- uniq $namespaces | toJson -}}
{{- end -}}
