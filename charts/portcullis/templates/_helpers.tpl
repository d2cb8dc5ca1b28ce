{{/* Names and labels shared by every template. */}}

{{- define "portcullis.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: portcullis-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "portcullis.labels" -}}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "portcullis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "portcullis.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "portcullis.gatewayImage" -}}
{{- default (include "portcullis.image" .) .Values.gatewayImage -}}
{{- end -}}

{{/* The names in imagePullSecrets, comma-separated: how the operator hands them to the gateways. */}}
{{- define "portcullis.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* Every gateway pod the operator creates (render/metadata.py's labels). */}}
{{- define "portcullis.gatewaySelectorLabels" -}}
app.kubernetes.io/name: portcullis-gateway
app.kubernetes.io/part-of: portcullis
{{- end -}}

{{/* The `helm test` pod: not selected by the operator's Service or Deployment. */}}
{{- define "portcullis.testLabels" -}}
app.kubernetes.io/name: portcullis-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
