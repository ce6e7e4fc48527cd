{{- define "zerocopy.labels" -}}
app.kubernetes.io/name: zerocopy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "zerocopy.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "zerocopy.operatorImage" -}}
{{ printf "%s/zerocopy-operator:%s" .Values.image.registry (include "zerocopy.tag" .) }}
{{- end }}

{{- define "zerocopy.agentImage" -}}
{{ printf "%s/zerocopy-node-agent:%s" .Values.image.registry (include "zerocopy.tag" .) }}
{{- end }}

{{- define "zerocopy.agentMemory" -}}
{{ printf "%dMi" (add (mul (int .Values.agent.capacityGi) 1024) (int .Values.agent.overheadMi)) }}
{{- end }}
