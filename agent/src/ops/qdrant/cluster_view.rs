//! What `status` and the metrics show of a distributed Qdrant: its peers, whether each answers,
//! and per collection how many replicas are active and which shards have none.

use std::time::Duration;

use futures::future::join_all;

use super::layout::{Nodes, describe_replicas};
use crate::engine::qdrant::{PeerId, Qdrant};

/// How long one peer or collection may take to answer a status question.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a whole status question may take: `status` must answer while Qdrant struggles.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Collections looked at per status question (the rest are counted, not listed).
const MAX_COLLECTIONS: usize = 200;

/// A distributed Qdrant as this agent's node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClusterView {
    /// This node's peer id.
    pub this: PeerId,
    /// Every peer: id, REST URL the agent uses, whether it answered.
    pub peers: Vec<(PeerId, String, bool)>,
    /// Per collection.
    pub collections: Vec<CollectionView>,
    /// Why some or all of it could not be read.
    pub error: Option<String>,
}

/// One collection's shards and replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CollectionView {
    /// Its name.
    pub name: String,
    /// Shards.
    pub shards: u32,
    /// Replicas over all shards.
    pub replicas: u32,
    /// Of which active.
    pub active: u32,
    /// Shards with no active replica.
    pub unavailable: Vec<u32>,
    /// `shard 3: peer 12 Dead, peer 40 Active` for every shard with a replica not active.
    pub not_active: Vec<String>,
}

impl ClusterView {
    /// Reads the cluster; `None` for a single node (or when `GET /cluster` itself fails on a
    /// server that never ran distributed — then the view carries the error).
    pub(crate) async fn read(q: &Qdrant) -> Option<ClusterView> {
        tokio::time::timeout(TOTAL_TIMEOUT, Self::read_unbounded(q))
            .await
            .unwrap_or_else(|_| Some(ClusterView::failed(timeout_note("the cluster's layout"))))
    }

    async fn read_unbounded(q: &Qdrant) -> Option<ClusterView> {
        let nodes = match tokio::time::timeout(ASK_TIMEOUT, Nodes::read(q)).await {
            Ok(Ok(nodes)) if !nodes.distributed => return None,
            Ok(Ok(nodes)) => nodes,
            Ok(Err(e)) => return Some(ClusterView::failed(e.to_string())),
            Err(_) => return Some(ClusterView::failed(timeout_note("GET /cluster"))),
        };
        let mut view = ClusterView {
            this: nodes.this.unwrap_or_default(),
            ..ClusterView::default()
        };
        let asks = nodes.peers.keys().map(|&peer| {
            let client = nodes.client(q, peer);
            async move {
                match client {
                    Ok(c) => {
                        let ok = matches!(
                            tokio::time::timeout(ASK_TIMEOUT, c.version()).await,
                            Ok(Ok(_))
                        );
                        (peer, c.url(), ok)
                    }
                    Err(e) => (peer, format!("(unusable peer URI: {e})"), false),
                }
            }
        });
        view.peers = join_all(asks).await;
        let names = match tokio::time::timeout(ASK_TIMEOUT, q.collections()).await {
            Ok(Ok(names)) => names,
            Ok(Err(e)) => {
                view.error = Some(e.to_string());
                return Some(view);
            }
            Err(_) => {
                view.error = Some(timeout_note("GET /collections"));
                return Some(view);
            }
        };
        if names.len() > MAX_COLLECTIONS {
            view.error = Some(format!(
                "{} collections: only the first {MAX_COLLECTIONS} are shown",
                names.len()
            ));
        }
        for name in names.into_iter().take(MAX_COLLECTIONS) {
            match tokio::time::timeout(ASK_TIMEOUT, q.collection_cluster(&name)).await {
                Ok(Ok(info)) => {
                    let mut c = CollectionView {
                        name,
                        ..CollectionView::default()
                    };
                    for (id, (_, replicas)) in info.shards() {
                        c.shards += 1;
                        c.replicas += replicas.len() as u32;
                        let active = replicas.iter().filter(|r| r.state.is_active()).count();
                        c.active += active as u32;
                        if active == 0 {
                            c.unavailable.push(id);
                        }
                        if active < replicas.len() || replicas.is_empty() {
                            c.not_active
                                .push(format!("shard {id}: {}", describe_replicas(&replicas)));
                        }
                    }
                    view.collections.push(c);
                }
                Ok(Err(e)) => {
                    view.error = Some(format!("collection {name}: {e}"));
                }
                Err(_) => view.error = Some(timeout_note(&format!("collection {name}"))),
            }
        }
        Some(view)
    }

    fn failed(error: String) -> ClusterView {
        ClusterView {
            error: Some(error),
            ..ClusterView::default()
        }
    }

    /// Shards with no active replica, over all collections.
    pub(crate) fn unavailable_shards(&self) -> usize {
        self.collections.iter().map(|c| c.unavailable.len()).sum()
    }

    /// Peers that did not answer.
    pub(crate) fn unreachable_peers(&self) -> usize {
        self.peers.iter().filter(|(_, _, ok)| !ok).count()
    }
}

fn timeout_note(what: &str) -> String {
    format!("{what}: Qdrant did not answer in time")
}
