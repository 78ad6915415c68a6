//! A client for one upstream registry.
//!
//! [`Upstream`] speaks the pull side of the distribution API to one configured registry: it
//! answers auth challenges (Bearer tokens, cached per scope until they expire or are refused, or
//! Basic), follows blob redirects without carrying the registry's credentials to another host,
//! asks for byte ranges so that a broken download can resume, and bounds every wait with a
//! timeout.
//!
//! It only ever talks to the URL it was built with (and to the hosts that URL redirects to or
//! names as its token realm): pier is never an open proxy. The configured credentials go only to
//! that URL and to token realms that are https or on its own origin.
//!
//! One module per job:
//! - `client`: the requests ([`Upstream::get_manifest`], [`Upstream::get_blob`], ...);
//! - `auth`: the auth session: challenges, the token cache, the realm policy, `Authorization`;
//! - `health`: the outage hold and the rate-limit budget;
//! - `wire`: reading headers and statuses;
//! - `search`: an upstream's search endpoint ([`SearchEndpoint`]), asked only when configured;
//! - `error`: [`UpstreamError`].

mod auth;
mod client;
mod error;
mod health;
mod search;
mod wire;

pub use auth::{Challenge, Credentials};
pub use client::{BlobBody, BlobResponse, Manifest, ManifestHead, Upstream, UpstreamConfig};
pub use error::{SetupError, TransportError, TransportKind, UpstreamError};
pub use search::{SearchEndpoint, SearchPage, SearchResult};
