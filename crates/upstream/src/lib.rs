//! A client for one upstream registry.
//!
//! [`Upstream`] speaks the pull side of the distribution API to one configured registry: it
//! answers auth challenges (Bearer tokens, cached per scope until they expire, or Basic), follows
//! blob redirects without carrying the registry's credentials to another host, asks for byte
//! ranges so that a broken download can resume, and bounds every wait with a timeout.
//!
//! It only ever talks to the URL it was built with (and to the hosts that URL redirects to or
//! names as its token realm): pier is never an open proxy.

mod auth;
mod client;
mod error;

pub use auth::Challenge;
pub use client::{
    BlobBody, BlobResponse, Credentials, Manifest, ManifestHead, Upstream, UpstreamConfig,
};
pub use error::UpstreamError;
