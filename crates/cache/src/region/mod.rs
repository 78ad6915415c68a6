//! A region: pier nodes that act as one mirror.
//!
//! Each digest (and each tag) has an owner among the live nodes, chosen by rendezvous hashing
//! ([`ring`]); a node that does not hold a digest asks its owner, which does the one upstream
//! fetch for the whole region and streams it to every node that asks while it fills its own
//! tiers ([`origin`]). What comes from the upstream is also written, verified, to a shared object
//! store ([`shared`]), with tag records and repository links, so that any node, a new one with an
//! empty disk included, serves what the region holds even with the upstream down. Peers and the
//! shared store each work without the other. A dead peer or a dead store costs an extra fetch,
//! never a pull: every failure falls through to the next source.

mod members;
pub(crate) mod origin;
pub mod peer;
mod ring;
pub mod shared;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pier_metrics::Metrics;

pub use members::{Node, PeerSource};
pub use shared::{SharedStore, SharedStoreConfig};

use members::Members;
use peer::PeerClient;

/// The peers of this node.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's base URL as its peers reach it (`http://10.0.0.1:5000`).
    pub advertise: String,
    pub peers: PeerSource,
    /// What peer requests carry, and what this node requires of them.
    pub secret: String,
    /// Longest wait for a peer to accept a connection: a node that is down is skipped after it.
    pub timeout: Duration,
    /// Longest wait for a connected peer's answer, and between two chunks of its body. Longer
    /// than `timeout`: a live owner answers as fast as its own upstream, which may be slow, and
    /// giving up on it costs the region a second fetch. (A killed peer's connections reset at
    /// once; this bounds only a peer that hangs.)
    pub read_timeout: Duration,
    /// Extra CA certificates (PEM) for peers served over https.
    pub ca_file: Option<PathBuf>,
}

/// What makes a region; either part may be absent.
#[derive(Clone, Debug, Default)]
pub struct RegionConfig {
    pub cluster: Option<ClusterConfig>,
    pub shared_store: Option<SharedStoreConfig>,
}

/// Why a region could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cluster.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("cluster: cannot build the peer client: {0}")]
    PeerClient(String),
    #[error("shared_store: {0}")]
    SharedStore(String),
}

/// This node's view of its region.
pub struct Region {
    members: Option<Arc<Members>>,
    pub(crate) peers: Option<PeerClient>,
    secret: Option<String>,
    pub(crate) shared: Option<SharedStore>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Region {
    /// Sets the region up from its configuration; nothing is contacted yet.
    pub fn new(config: &RegionConfig, metrics: Arc<Metrics>) -> Result<Region, RegionError> {
        let (members, peers, secret) = match &config.cluster {
            Some(c) => {
                let ca = match &c.ca_file {
                    Some(path) => {
                        let pem = std::fs::read(path).map_err(|e| RegionError::CaFile {
                            path: path.clone(),
                            message: e.to_string(),
                        })?;
                        Some(reqwest::Certificate::from_pem(&pem).map_err(|e| {
                            RegionError::CaFile {
                                path: path.clone(),
                                message: e.to_string(),
                            }
                        })?)
                    }
                    None => None,
                };
                let client = PeerClient::new(c.secret.clone(), c.timeout, c.read_timeout, ca)
                    .map_err(RegionError::PeerClient)?;
                let members = Members::new(&c.advertise, c.peers.clone(), metrics.clone());
                (
                    Some(Arc::new(members)),
                    Some(client),
                    Some(c.secret.clone()),
                )
            }
            None => (None, None, None),
        };
        let shared = match &config.shared_store {
            Some(s) => {
                Some(SharedStore::new(s, metrics.clone()).map_err(RegionError::SharedStore)?)
            }
            None => None,
        };
        Ok(Region {
            members,
            peers,
            secret,
            shared,
            metrics,
        })
    }

    /// A region of this node and a shared store only (tests, benchmarks).
    pub fn with_shared_store(shared: SharedStore, metrics: Arc<Metrics>) -> Region {
        Region {
            members: None,
            peers: None,
            secret: None,
            shared: Some(shared),
            metrics,
        }
    }

    /// This region with `shared` as its shared store (tests: an in-memory store next to real
    /// peers).
    pub fn with_store(mut self, shared: SharedStore) -> Region {
        self.shared = Some(shared);
        self
    }

    /// Starts what runs in the background: re-resolving peers from DNS.
    pub async fn start(&self) {
        if let Some(m) = &self.members {
            m.refresh().await;
            m.spawn_refresh();
        }
    }

    /// Whether this node has peers configured (it then answers peer requests).
    pub fn has_peers(&self) -> bool {
        self.members.is_some()
    }

    /// Whether a peer request's secret is the region's. Compared in constant time; a node
    /// without peers accepts no peer request.
    pub fn accepts_secret(&self, presented: Option<&[u8]>) -> bool {
        let (Some(mine), Some(theirs)) = (&self.secret, presented) else {
            return false;
        };
        let mine = mine.as_bytes();
        if mine.len() != theirs.len() {
            return false;
        }
        mine.iter()
            .zip(theirs)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The live nodes in the order in which they own `key`; just this node without peers.
    pub fn owners(&self, key: &str) -> Vec<Node> {
        match &self.members {
            Some(m) => m.ranked(key),
            None => vec![Node::Me],
        }
    }

    pub(crate) fn mark_down(&self, peer: &str) {
        if let Some(m) = &self.members {
            m.mark_down(peer);
        }
    }
}
