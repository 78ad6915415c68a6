//! Who is in the region: this node, its peers from a static list or a DNS name, and which of
//! them answered lately.
//!
//! A peer that fails a request is taken as down for a while and left out of the ranking, so a
//! dead node costs one failed request per node and interval, not one per pull. DNS names (a
//! Kubernetes headless Service: one address per ready pod) are resolved again periodically.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pier_metrics::Metrics;

use super::ring;

/// How long a peer that failed is left out.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Where the peers come from.
#[derive(Clone, Debug)]
pub enum PeerSource {
    /// Base URLs (`http://10.0.0.2:5000`).
    Static(Vec<String>),
    /// A name whose addresses are the peers, reached at `scheme://<address>:<port>`.
    Dns {
        name: String,
        port: u16,
        scheme: String,
        interval: Duration,
    },
}

/// A node of the region as a lookup ranks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// This node.
    Me,
    /// A peer, by base URL.
    Peer(String),
}

/// The region's membership as this node sees it.
pub struct Members {
    me: String,
    source: PeerSource,
    peers: RwLock<Vec<String>>,
    down: Mutex<HashMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

impl Members {
    /// `me` is this node's advertised base URL, as its peers list it.
    pub fn new(me: &str, source: PeerSource, metrics: Arc<Metrics>) -> Members {
        let me = normalise(me);
        let peers = match &source {
            PeerSource::Static(list) => list
                .iter()
                .map(|p| normalise(p))
                .filter(|p| *p != me)
                .collect(),
            PeerSource::Dns { .. } => Vec::new(),
        };
        let members = Members {
            me,
            source,
            peers: RwLock::new(peers),
            down: Mutex::new(HashMap::new()),
            metrics,
        };
        members.update_gauge();
        members
    }

    /// The live nodes, this one included, in the order in which they own `key`.
    pub fn ranked(&self, key: &str) -> Vec<Node> {
        let live = self.live_peers();
        ring::rank(
            key,
            live.iter().map(String::as_str).chain([self.me.as_str()]),
        )
        .into_iter()
        .map(|n| {
            if n == self.me {
                Node::Me
            } else {
                Node::Peer(n.to_string())
            }
        })
        .collect()
    }

    /// Peers not taken as down.
    pub fn live_peers(&self) -> Vec<String> {
        let now = Instant::now();
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| down.get(*p).is_none_or(|until| *until <= now))
            .cloned()
            .collect()
    }

    /// Leaves `peer` out of rankings for a while.
    pub fn mark_down(&self, peer: &str) {
        let newly = self
            .down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), Instant::now() + DOWN_FOR)
            .is_none_or(|until| until <= Instant::now());
        if newly {
            tracing::warn!(%peer, "peer unavailable; skipped for {}s", DOWN_FOR.as_secs());
        }
        self.update_gauge();
    }

    /// Resolves the DNS name again (nothing to do for a static list).
    pub async fn refresh(&self) {
        let PeerSource::Dns {
            name, port, scheme, ..
        } = &self.source
        else {
            return;
        };
        match tokio::net::lookup_host((name.as_str(), *port)).await {
            Ok(addrs) => {
                let mut found: Vec<String> = addrs
                    .map(|a| normalise(&format!("{scheme}://{a}")))
                    .filter(|p| *p != self.me)
                    .collect();
                found.sort();
                found.dedup();
                *self.peers.write().unwrap_or_else(|p| p.into_inner()) = found;
            }
            // Keep the last list: a DNS hiccup must not split the region.
            Err(e) => tracing::warn!(%name, error = %e, "cannot resolve peers"),
        }
        self.update_gauge();
    }

    /// Keeps a DNS-discovered membership current, for as long as the runtime runs.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let PeerSource::Dns { interval, .. } = self.source else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(members) = me.upgrade() else { return };
                members.refresh().await;
            }
        });
    }

    fn update_gauge(&self) {
        let live = self.live_peers().len();
        self.metrics
            .live_peers
            .set(i64::try_from(live).unwrap_or(i64::MAX));
    }
}

/// A base URL without a trailing slash, so that the same node is always the same string.
fn normalise(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn me_is_ranked_and_never_listed_as_a_peer() {
        let m = Members::new(
            "http://a:5000/",
            PeerSource::Static(vec!["http://a:5000".into(), "http://b:5000".into()]),
            Arc::new(Metrics::new()),
        );
        assert_eq!(m.live_peers(), vec!["http://b:5000".to_string()]);
        let ranked = m.ranked("sha256:00");
        assert_eq!(ranked.len(), 2);
        assert!(ranked.contains(&Node::Me));
    }

    #[tokio::test]
    async fn dns_names_the_peers_and_this_node_is_left_out() {
        // `localhost` resolves to loopback: each address is a peer at the advertised port.
        let m = Members::new(
            "http://10.9.9.9:5000",
            PeerSource::Dns {
                name: "localhost".into(),
                port: 5000,
                scheme: "http".into(),
                interval: std::time::Duration::from_secs(5),
            },
            Arc::new(Metrics::new()),
        );
        assert!(
            m.live_peers().is_empty(),
            "peers before the first resolution"
        );
        m.refresh().await;
        assert!(
            m.live_peers()
                .contains(&"http://127.0.0.1:5000".to_string()),
            "{:?}",
            m.live_peers()
        );
        // The node that advertises a resolved address does not count itself.
        let me = Members::new(
            "http://127.0.0.1:5000",
            PeerSource::Dns {
                name: "localhost".into(),
                port: 5000,
                scheme: "http".into(),
                interval: std::time::Duration::from_secs(5),
            },
            Arc::new(Metrics::new()),
        );
        me.refresh().await;
        assert!(!me
            .live_peers()
            .contains(&"http://127.0.0.1:5000".to_string()));
        // A name that does not resolve leaves the list as it was (here: empty), without failing.
        let gone = Members::new(
            "http://10.9.9.9:5000",
            PeerSource::Dns {
                name: "no-such-host.invalid".into(),
                port: 5000,
                scheme: "http".into(),
                interval: std::time::Duration::from_secs(5),
            },
            Arc::new(Metrics::new()),
        );
        gone.refresh().await;
        assert!(gone.live_peers().is_empty());
    }

    #[test]
    fn a_peer_marked_down_leaves_the_ranking() {
        let m = Members::new(
            "http://a:5000",
            PeerSource::Static(vec!["http://b:5000".into(), "http://c:5000".into()]),
            Arc::new(Metrics::new()),
        );
        m.mark_down("http://b:5000");
        assert_eq!(m.live_peers(), vec!["http://c:5000".to_string()]);
        for i in 0..50 {
            let ranked = m.ranked(&format!("k{i}"));
            assert!(!ranked.contains(&Node::Peer("http://b:5000".into())));
        }
    }
}
