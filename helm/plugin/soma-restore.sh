#!/bin/sh
# `helm soma-restore RELEASE [BACKUP_ID] [FLAGS]`: run `kubectl soma restore BACKUP_ID -n NS FLAGS`
# in the namespace of Helm release RELEASE. See plugin.yaml.
#
# Helm provides HELM_BIN (the helm binary that called us), HELM_NAMESPACE (-n, or the context's
# namespace), HELM_KUBECONTEXT (--kube-context) and KUBECONFIG (--kubeconfig).
set -eu

usage() {
  echo "usage: helm soma-restore RELEASE [BACKUP_ID] [kubectl-soma restore flags...]" >&2
  echo "       BACKUP_ID defaults to latest; e.g. helm soma-restore soma-backup latest -n soma --clean" >&2
  exit 2
}

[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; -*) echo "soma-restore: the release name comes first" >&2; usage ;; esac
release=$1
shift
backup_id=latest
if [ $# -ge 1 ]; then
  case "$1" in -*) ;; *) backup_id=$1; shift ;; esac
fi

helm=${HELM_BIN:-helm}
namespace=${HELM_NAMESPACE:-}

# The release's namespace: where Helm finds it — first the namespace we were given (or the
# context's), then, if it is not there, the only namespace that has a release of that name.
if [ -n "$namespace" ] && "$helm" status "$release" -n "$namespace" ${HELM_KUBECONTEXT:+"--kube-context=$HELM_KUBECONTEXT"} >/dev/null 2>&1; then
  release_ns=$namespace
else
  # `helm list -o yaml` prints one map per release, keys in alphabetical order, so each release's
  # namespace is a line "  namespace: NAME".
  found=$("$helm" list --all-namespaces --filter "^${release}\$" -o yaml ${HELM_KUBECONTEXT:+"--kube-context=$HELM_KUBECONTEXT"} |
    sed -n 's/^[ -] namespace: *//p')
  count=$(printf '%s' "$found" | grep -c . || true)
  if [ "$count" -eq 0 ]; then
    echo "soma-restore: no Helm release named $release${namespace:+ in namespace $namespace} or in any other namespace; check with: $helm list -A" >&2
    exit 1
  elif [ "$count" -gt 1 ]; then
    echo "soma-restore: releases named $release exist in several namespaces ($(printf '%s' "$found" | tr '\n' ' ')); choose one with -n NAMESPACE" >&2
    exit 2
  fi
  release_ns=$found
fi

if ! command -v kubectl-soma >/dev/null 2>&1; then
  echo "soma-restore: kubectl-soma is not on PATH (it is the kubectl soma plugin; see the Soma Backup README)" >&2
  exit 1
fi

echo "soma-restore: restoring $backup_id into namespace $release_ns (release $release)" >&2
exec kubectl-soma restore "$backup_id" -n "$release_ns" ${HELM_KUBECONTEXT:+--context "$HELM_KUBECONTEXT"} "$@"
