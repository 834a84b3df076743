{{- define "prefect-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "prefect-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "prefect-operator.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "prefect-operator.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "prefect-operator.labels" -}}
app.kubernetes.io/name: {{ include "prefect-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "prefect-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prefect-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "prefect-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "prefect-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "prefect-operator.leaderElection" -}}
{{- if kindIs "bool" .Values.leaderElection.enabled -}}
{{- .Values.leaderElection.enabled -}}
{{- else -}}
{{- gt (int .Values.replicaCount) 1 -}}
{{- end -}}
{{- end -}}

{{/*
The one list of what the operator may do with the resources it reconciles. Used for
the ClusterRole (all namespaces) and for each Role (watchNamespaces), never written
twice. Secrets and ConfigMaps: get only, for the credentials a resource references.
*/}}
{{- define "prefect-operator.rules" -}}
- apiGroups: ["prefect.io"]
  resources: ["prefectdeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["prefect.io"]
  resources: ["prefectdeployments/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["prefect.io"]
  resources: ["prefectdeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets", "configmaps"]
  verbs: ["get"]
{{- end -}}
