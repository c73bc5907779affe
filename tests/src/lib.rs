//! Test harness for Soma Backup.
//!
//! Everything here is real, except Kubernetes and Qdrant (below): a throwaway PostgreSQL 15
//! cluster per test ([`PgCluster`]), a single-node Garage S3 server per test ([`Garage`]), and
//! the `soma-agent` / `kubectl-soma` binaries built by `cargo build --workspace --bins`
//! ([`Agent`], [`soma`]). Every server binds only to 127.0.0.1 on ports picked per test, in its
//! own temporary directory, so tests run in parallel. A missing server or binary makes the test
//! panic with the command that installs it.
//!
//! Kubernetes cannot run here either, so [`KubeDouble`] stands in for its API server (with the
//! kubelet's port-forward behind it), speaking the real wire protocol to `kubectl` and kube-rs.
//!
//! Qdrant cannot be installed here, so [`QdrantDouble`] stands in for it: a test double of the
//! Qdrant 1.18 REST API that documents which real behaviour each part follows, and [`QdrantCluster`]
//! for a distributed Qdrant (several nodes on their own loopback addresses, shards with replicas).
//!
//! Waiting is always "poll a real observable condition until a deadline" ([`poll_until`]), never a
//! sleep standing in for synchronisation.

pub mod agent;
pub mod cli;
pub mod db;
pub mod faults;
pub mod fixtures;
pub mod garage;
pub mod kube;
pub mod metrics;
pub mod pg;
pub mod pitr;
pub mod qdrant;
pub mod qdrant_cluster;
pub mod store;
pub mod tls;
mod util;

pub use agent::{Agent, AgentExit};
pub use cli::{CmdOutput, SomaChild, kubectl_soma, listed_ids, soma, soma_env, soma_spawn};
pub use db::{DbFingerprint, assert_same_database};
pub use garage::Garage;
pub use kube::{KubeDouble, PodPhase, PodSpec};
pub use pg::PgCluster;
pub use qdrant::QdrantDouble;
pub use qdrant_cluster::{ClusterCollection, ClusterLayout, QdrantCluster};
pub use store::TestStore;
pub use util::{bin_dir, bin_path, free_port, poll_until, random_hex};
