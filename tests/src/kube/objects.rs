//! The JSON the API server sends: pods and pod lists (`k8s.io/api/core/v1`), `Status` errors
//! (`k8s.io/apimachinery/pkg/api/errors`), version and legacy discovery documents.

use serde_json::{Map, Value, json};

use super::state::{Namespace, Pod, timestamp};
use super::{Container, PodPhase, SERVER_VERSION};

/// The node every scheduled pod of the double runs on.
pub(crate) const NODE_NAME: &str = "soma-double-node";
const HOST_IP: &str = "172.18.0.2";

fn containers(pod: &Pod) -> Vec<Container> {
    if !pod.spec.containers.is_empty() {
        return pod.spec.containers.clone();
    }
    let mut ports: Vec<u16> = pod.spec.forward_to.keys().copied().collect();
    ports.sort_unstable();
    vec![Container {
        name: "main".to_string(),
        image: "soma/main:test".to_string(),
        ports,
    }]
}

fn condition(kind: &str, status: bool, at: &str) -> Value {
    json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": at,
    })
}

/// A pod; `with_type` adds `kind`/`apiVersion` (a single object has them, list items do not).
pub(crate) fn pod(pod: &Pod, with_type: bool) -> Value {
    let created = timestamp(pod.created);
    let ready_at = timestamp(pod.ready_changed);
    let scheduled = pod.spec.phase != PodPhase::Pending;
    let running = pod.spec.phase == PodPhase::Running;
    let ready = running && pod.spec.ready;
    let containers = containers(pod);

    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(pod.spec.name));
    metadata.insert("namespace".into(), json!(pod.spec.namespace));
    metadata.insert("uid".into(), json!(pod.uid));
    metadata.insert(
        "resourceVersion".into(),
        json!(pod.resource_version.to_string()),
    );
    metadata.insert("creationTimestamp".into(), json!(created));
    if !pod.spec.labels.is_empty() {
        metadata.insert("labels".into(), json!(pod.spec.labels));
    }
    if !pod.spec.annotations.is_empty() {
        metadata.insert("annotations".into(), json!(pod.spec.annotations));
    }

    let spec_containers: Vec<Value> = containers
        .iter()
        .map(|c| {
            let mut v = json!({
                "name": c.name,
                "image": c.image,
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            });
            if !c.ports.is_empty() {
                v["ports"] = c
                    .ports
                    .iter()
                    .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
                    .collect();
            }
            v
        })
        .collect();
    let mut spec = json!({
        "containers": spec_containers,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "priority": 0,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
    });

    let mut status = json!({"phase": pod.spec.phase.as_str(), "qosClass": "BestEffort"});
    if scheduled {
        spec["nodeName"] = json!(NODE_NAME);
        status["conditions"] = json!([
            condition("PodReadyToStartContainers", running, &created),
            condition("Initialized", true, &created),
            condition("Ready", ready, &ready_at),
            condition("ContainersReady", ready, &ready_at),
            condition("PodScheduled", true, &created),
        ]);
        status["hostIP"] = json!(HOST_IP);
        status["hostIPs"] = json!([{"ip": HOST_IP}]);
        status["podIP"] = json!(pod.ip);
        status["podIPs"] = json!([{"ip": pod.ip}]);
        status["startTime"] = json!(created);
        status["containerStatuses"] = containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let state = if running {
                    json!({"running": {"startedAt": created}})
                } else {
                    json!({"terminated": {
                        "exitCode": if pod.spec.phase == PodPhase::Failed { 1 } else { 0 },
                        "reason": if pod.spec.phase == PodPhase::Failed { "Error" } else { "Completed" },
                        "startedAt": created,
                        "finishedAt": created,
                    }})
                };
                json!({
                    "name": c.name,
                    "state": state,
                    "lastState": {},
                    "ready": ready,
                    "restartCount": 0,
                    "image": c.image,
                    "imageID": format!("docker.io/{}@sha256:{:064x}", c.image, i + 1),
                    "containerID": format!("containerd://{}{:02x}", &pod.sandbox_id[..62], i),
                    "started": running,
                })
            })
            .collect();
    } else {
        status["conditions"] = json!([{
            "type": "PodScheduled",
            "status": "False",
            "lastProbeTime": null,
            "lastTransitionTime": created,
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
        }]);
    }

    let mut out = Map::new();
    if with_type {
        out.insert("kind".into(), json!("Pod"));
        out.insert("apiVersion".into(), json!("v1"));
    }
    out.insert("metadata".into(), Value::Object(metadata));
    out.insert("spec".into(), spec);
    out.insert("status".into(), status);
    Value::Object(out)
}

/// A `PodList` at `revision`.
pub(crate) fn pod_list<'a>(pods: impl Iterator<Item = &'a Pod>, revision: u64) -> Value {
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": revision.to_string()},
        "items": pods.map(|p| pod(p, false)).collect::<Vec<_>>(),
    })
}

/// A namespace; `with_type` as for [`pod`].
pub(crate) fn namespace(ns: &Namespace, with_type: bool) -> Value {
    let mut v = json!({
        "metadata": {
            "name": ns.name,
            "uid": ns.uid,
            "resourceVersion": ns.resource_version.to_string(),
            "creationTimestamp": timestamp(ns.created),
            "labels": {"kubernetes.io/metadata.name": ns.name},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    });
    if with_type {
        v["kind"] = json!("Namespace");
        v["apiVersion"] = json!("v1");
    }
    v
}

/// A `NamespaceList` at `revision`.
pub(crate) fn namespace_list<'a>(nss: impl Iterator<Item = &'a Namespace>, revision: u64) -> Value {
    json!({
        "kind": "NamespaceList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": revision.to_string()},
        "items": nss.map(|n| namespace(n, false)).collect::<Vec<_>>(),
    })
}

/// A failure `Status` (`metav1.Status`).
pub(crate) fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        v["details"] = details;
    }
    v
}

/// `errors.NewNotFound(pods, name)`.
pub(crate) fn pod_not_found(name: &str) -> Value {
    not_found("pods", name)
}

/// `errors.NewNotFound(resource, name)` for a core resource.
pub(crate) fn not_found(resource: &str, name: &str) -> Value {
    status(
        404,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
        Some(json!({"name": name, "kind": resource})),
    )
}

/// `errors.NewForbidden` as `responsewriters.Forbidden` builds it for an RBAC denial.
pub(crate) fn forbidden(
    user: &str,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: &str,
    name: Option<&str>,
) -> Value {
    let full = match subresource {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    let scope = if namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{namespace}\"")
    };
    let reason =
        format!("User \"{user}\" cannot {verb} resource \"{full}\" in API group \"\" {scope}");
    let (message, details) = match name {
        Some(name) => (
            format!("{resource} \"{name}\" is forbidden: {reason}"),
            json!({"name": name, "kind": resource}),
        ),
        None => (
            format!("{resource} is forbidden: {reason}"),
            json!({"kind": resource}),
        ),
    };
    status(403, "Forbidden", &message, Some(details))
}

/// `responsewriters.Forbidden` for a non-resource path.
pub(crate) fn forbidden_path(user: &str, verb: &str, path: &str) -> Value {
    status(
        403,
        "Forbidden",
        &format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
        Some(json!({})),
    )
}

/// `/version` (`k8s.io/apimachinery/pkg/version.Info`).
pub(crate) fn version() -> Value {
    let minor = SERVER_VERSION
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .unwrap_or("0");
    json!({
        "major": "1",
        "minor": minor,
        "emulationMajor": "1",
        "emulationMinor": minor,
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "34",
        "gitVersion": SERVER_VERSION,
        "gitCommit": "66452049f3d692768c39c797b21b793dce80314e",
        "gitTreeState": "clean",
        "buildDate": "2025-12-17T12:32:07Z",
        "goVersion": "go1.25.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: `APIVersions`.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `/apis`: `APIGroupList` (the double serves only the core group).
pub(crate) fn api_group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
}

/// `/api/v1`: `APIResourceList` with pods and the pod subresources clients look for.
pub(crate) fn core_v1_resources() -> Value {
    let sub = |name: &str, kind: &str, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "pods",
                "singularName": "pod",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortNames": ["po"],
                "categories": ["all"],
                "storageVersionHash": "xPOwRZ+Yhw8=",
            },
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": false,
                "kind": "Namespace",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": ["ns"],
                "storageVersionHash": "Q3oi5N2YM8M=",
            },
            sub("pods/attach", "PodAttachOptions", &["create", "get"]),
            sub("pods/exec", "PodExecOptions", &["create", "get"]),
            sub("pods/log", "Pod", &["get"]),
            sub("pods/portforward", "PodPortForwardOptions", &["create", "get"]),
            sub("pods/status", "Pod", &["get", "patch", "update"]),
        ],
    })
}
