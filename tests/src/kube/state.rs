//! What the double knows: users, pods, denials, the request log and counters. One mutex guards
//! it; no lock is held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, SecondsFormat, Utc};

use super::{PodPhase, PodSpec, RequestRecord};
use crate::util::random_hex;

/// A pod as stored: what the test gave plus what the "cluster" assigned.
#[derive(Clone, Debug)]
pub(crate) struct Pod {
    pub spec: PodSpec,
    pub uid: String,
    /// The CRI sandbox id the kubelet names in port-forward errors (64 hex digits).
    pub sandbox_id: String,
    /// Network namespace path containerd names in port-forward errors.
    pub netns: String,
    pub resource_version: u64,
    pub created: DateTime<Utc>,
    pub ready_changed: DateTime<Utc>,
    pub ip: String,
}

impl Pod {
    pub(crate) fn set_ready(&mut self, ready: bool) {
        if self.spec.ready != ready {
            self.spec.ready = ready;
            self.ready_changed = Utc::now();
        }
    }
}

/// A namespace: it exists independently of its pods, as in the API.
#[derive(Clone, Debug)]
pub(crate) struct Namespace {
    pub name: String,
    pub uid: String,
    pub resource_version: u64,
    pub created: DateTime<Utc>,
}

/// A Secret as the double keeps it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredSecret {
    /// metadata.labels.
    pub labels: BTreeMap<String, String>,
    /// data, decoded.
    pub data: BTreeMap<String, Vec<u8>>,
}

/// One RBAC rule the test took away.
#[derive(Clone, Debug)]
pub(crate) struct Denial {
    pub namespace: String,
    pub verb: String,
    pub resource: String,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// token → user name.
    pub users: HashMap<String, String>,
    pub anonymous: bool,
    /// (namespace, name) → pod.
    pub pods: BTreeMap<(String, String), Pod>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// (namespace, name) → the Secret's labels and data (key → bytes).
    pub secrets: BTreeMap<(String, String), StoredSecret>,
    pub denials: Vec<Denial>,
    pub requests: Vec<RequestRecord>,
    pub next_seq: u64,
    /// The etcd revision: bumped on every change, reported by lists.
    pub revision: u64,
    pub next_ip: u32,
    pub port_forwards: u64,
    pub forwarded_connections: u64,
}

impl Inner {
    pub(crate) fn ensure_namespace(&mut self, name: &str) {
        if !self.namespaces.contains_key(name) {
            self.revision += 1;
            let ns = Namespace {
                name: name.to_string(),
                uid: uuid_v4(),
                resource_version: self.revision,
                created: Utc::now(),
            };
            self.namespaces.insert(name.to_string(), ns);
        }
    }

    pub(crate) fn denied(&self, namespace: &str, verb: &str, resource: &str) -> bool {
        self.denials
            .iter()
            .any(|d| d.namespace == namespace && d.verb == verb && d.resource == resource)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        let shared = Shared {
            inner: Mutex::new(Inner {
                revision: 1000,
                next_ip: 10,
                ..Inner::default()
            }),
        };
        // What every cluster has (kube-apiserver's system namespaces controller).
        for ns in ["default", "kube-node-lease", "kube-public", "kube-system"] {
            shared.lock().ensure_namespace(ns);
        }
        shared
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add_user(&self, name: &str) -> String {
        let token = random_hex(24);
        self.lock().users.insert(token.clone(), name.to_string());
        token
    }

    pub(crate) fn add_pod(&self, spec: PodSpec) {
        let mut inner = self.lock();
        inner.ensure_namespace(&spec.namespace);
        inner.revision += 1;
        inner.next_ip += 1;
        let now = Utc::now();
        let ip = format!("10.244.{}.{}", inner.next_ip / 250, inner.next_ip % 250 + 2);
        let pod = Pod {
            uid: uuid_v4(),
            sandbox_id: random_hex(32),
            netns: format!("/var/run/netns/cni-{}", uuid_v4()),
            resource_version: inner.revision,
            created: now,
            ready_changed: now,
            ip,
            spec,
        };
        inner
            .pods
            .insert((pod.spec.namespace.clone(), pod.spec.name.clone()), pod);
    }

    pub(crate) fn remove_pod(&self, namespace: &str, name: &str) -> bool {
        let mut inner = self.lock();
        inner.revision += 1;
        inner
            .pods
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// Applies `change` to the pod `namespace/name`, or to the only pod called `name`, and
    /// bumps its resourceVersion.
    pub(crate) fn update_pod(&self, name: &str, change: impl FnOnce(&mut Pod)) {
        let mut inner = self.lock();
        inner.revision += 1;
        let revision = inner.revision;
        let (namespace, name) = match name.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, name),
        };
        let mut matches = inner
            .pods
            .values_mut()
            .filter(|p| p.spec.name == name && namespace.is_none_or(|ns| p.spec.namespace == ns));
        let pod = matches
            .next()
            .unwrap_or_else(|| panic!("the Kubernetes double has no pod {name:?}"));
        change(pod);
        pod.resource_version = revision;
        assert!(
            matches.next().is_none(),
            "several namespaces have a pod {name:?}: name it as NAMESPACE/NAME"
        );
    }

    /// Whether the pod's sandbox network exists (the kubelet can forward into it).
    pub(crate) fn sandbox_running(phase: PodPhase) -> bool {
        matches!(phase, PodPhase::Running)
    }
}

/// A random RFC 4122 version-4 UUID, as the API server assigns to `metadata.uid`.
pub(crate) fn uuid_v4() -> String {
    let mut h = random_hex(16).into_bytes();
    h[12] = b'4';
    h[16] = b"89ab"[(h[16] % 4) as usize];
    let h = String::from_utf8(h).expect("hex is ASCII");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// RFC 3339 with seconds, as `metav1.Time` serialises.
pub(crate) fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}
