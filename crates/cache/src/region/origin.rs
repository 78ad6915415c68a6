//! Where a fill of a region node gets its bytes: the digest's owner, then the shared store, then
//! the upstream; and the upload of what came from the upstream to the shared store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt};
use pier_oci::Digest;
use pier_upstream::{BlobResponse, UpstreamError};

use super::members::Node;
use super::peer::PeerError;
use super::Region;
use crate::fill::Origin;
use crate::remote::UpstreamOrigin;

/// The source an attempt of the fill used.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Used {
    Peer(String),
    Shared,
    Upstream,
}

/// A fill's origin in a region. One per fill; `open` is called again, at the offset reached,
/// when an attempt broke: the source that broke is then skipped (a peer is also taken as down
/// for a while), so a node killed mid-stream costs a resume from the next source, never the pull.
pub(crate) struct RegionOrigin {
    pub region: Arc<Region>,
    pub upstream: Arc<UpstreamOrigin>,
    /// The upstream's configured name.
    pub upstream_name: Arc<str>,
    /// False for a request that came from a peer: this node is its owner, and asks no one else.
    pub ask_peers: bool,
    /// Whether the shared store may answer: only for a digest the repository is known to hold,
    /// as the store is keyed by digest alone.
    pub shared_allowed: bool,
    last: Arc<Mutex<Option<Used>>>,
    /// Every source an attempt of this fill used, in order.
    used: Arc<Mutex<Vec<Used>>>,
    shared_failed: Arc<AtomicBool>,
    from_upstream: Arc<AtomicBool>,
}

impl RegionOrigin {
    pub(crate) fn new(
        region: Arc<Region>,
        upstream: UpstreamOrigin,
        upstream_name: Arc<str>,
        ask_peers: bool,
        shared_allowed: bool,
    ) -> Self {
        RegionOrigin {
            region,
            upstream: Arc::new(upstream),
            upstream_name,
            ask_peers,
            shared_allowed,
            last: Arc::default(),
            used: Arc::default(),
            shared_failed: Arc::default(),
            from_upstream: Arc::default(),
        }
    }
}

impl Origin for RegionOrigin {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<BlobResponse, UpstreamError>> {
        let region = self.region.clone();
        let upstream = self.upstream.clone();
        let name = self.upstream_name.clone();
        let (ask_peers, shared_allowed) = (self.ask_peers, self.shared_allowed);
        let (last, used, shared_failed, from_upstream) = (
            self.last.clone(),
            self.used.clone(),
            self.shared_failed.clone(),
            self.from_upstream.clone(),
        );
        async move {
            let digest: &Digest = &upstream.digest;
            // Called again: the source of the last attempt broke.
            match last.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(Used::Peer(p)) => region.mark_down(&p),
                Some(Used::Shared) => shared_failed.store(true, Ordering::SeqCst),
                _ => {}
            }
            let first = offset == 0;
            let count = |result: &str| {
                if first {
                    region
                        .metrics
                        .region_lookups
                        .with_label_values(&[result])
                        .inc();
                }
            };
            let set_last = |u: Used| {
                used.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(u.clone());
                *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
            };
            if ask_peers {
                for node in region.owners(&digest.to_string()) {
                    let Node::Peer(peer) = node else { break };
                    let Some(client) = region.peers.as_ref() else {
                        break;
                    };
                    match client
                        .blob(
                            &peer,
                            &name,
                            &upstream.repo,
                            digest,
                            offset,
                            &region.metrics,
                        )
                        .await
                    {
                        Ok(resp) => {
                            count("owner_hit");
                            set_last(Used::Peer(peer));
                            return Ok(resp);
                        }
                        Err(PeerError::NotFound) => return Err(UpstreamError::NotFound),
                        Err(PeerError::Unavailable(why)) => {
                            tracing::debug!(%peer, %digest, %why, "owner unavailable; next");
                            region.mark_down(&peer);
                        }
                    }
                }
            }
            if shared_allowed && !shared_failed.load(Ordering::SeqCst) {
                if let Some(shared) = &region.shared {
                    if let Some(resp) = shared.blob(digest, offset).await {
                        count("shared_store_hit");
                        set_last(Used::Shared);
                        return Ok(resp);
                    }
                }
            }
            count("upstream");
            set_last(Used::Upstream);
            from_upstream.store(true, Ordering::SeqCst);
            upstream.open(offset).await
        }
        .boxed()
    }

    fn shares(&self) -> bool {
        self.region.shared.is_some() && self.from_upstream.load(Ordering::SeqCst)
    }

    /// Bytes that did not verify: every peer that sent some of them is left out for a while,
    /// and an object of the shared store that sent them all is removed (it is not the content
    /// of its key; the next fill goes to the upstream and shares the right bytes). Without
    /// this, a corrupt object or a lying peer would fail every fill of the digest.
    fn rejected(&self) -> BoxFuture<'static, ()> {
        let used = std::mem::take(&mut *self.used.lock().unwrap_or_else(|p| p.into_inner()));
        let (region, digest) = (self.region.clone(), self.upstream.digest.clone());
        async move {
            for u in &used {
                if let Used::Peer(p) = u {
                    tracing::warn!(peer = %p, %digest, "a peer sent bytes that do not verify");
                    region.mark_down(p);
                }
            }
            // Only when the store alone sent the bytes: mixed sources tell no culprit.
            if !used.is_empty() && used.iter().all(|u| *u == Used::Shared) {
                if let Some(shared) = &region.shared {
                    shared.remove_corrupt(&digest).await;
                }
            }
        }
        .boxed()
    }
}
