//! Secrets in the Kubernetes double: only `get`, which is all kubectl soma asks for (the agent
//! token named by a pod's `soma.dev/token-secret` annotation).

use std::sync::Arc;

use hyper::{Method, Response, StatusCode};

use super::objects;
use super::server::{ANONYMOUS, Body, json, status};
use super::state::Shared;

/// `GET /api/v1/namespaces/NS/secrets/NAME`, as the API server answers it: RBAC first (a denied
/// `get` on `secrets` is 403 whether or not the Secret exists), then 404 or the Secret with its
/// `data` base64-encoded. Only `get` is served: it is all kubectl soma asks for.
pub(super) fn get(
    shared: &Arc<Shared>,
    method: &Method,
    ns: &str,
    name: &str,
    user: &str,
) -> Response<Body> {
    use base64::Engine as _;
    if method != Method::GET {
        return status(objects::status(
            405,
            "MethodNotAllowed",
            "the Kubernetes double serves only get on secrets",
            None,
        ));
    }
    let inner = shared.lock();
    if user == ANONYMOUS || inner.denied(ns, "get", "secrets") {
        return status(objects::forbidden(
            user,
            "get",
            "secrets",
            None,
            ns,
            Some(name),
        ));
    }
    match inner.secrets.get(&(ns.to_string(), name.to_string())) {
        None => status(objects::not_found("secrets", name)),
        Some(secret) => json(
            StatusCode::OK,
            &serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": ns, "labels": secret.labels},
                "type": "Opaque",
                "data": secret.data
                    .iter()
                    .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v).into()))
                    .collect::<serde_json::Map<_, _>>(),
            }),
        ),
    }
}
