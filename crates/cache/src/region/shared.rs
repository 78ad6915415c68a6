//! The region's shared object store (S3 or any store `object_store` speaks): verified content,
//! tag records and repository links that every node can read, a new one with an empty disk
//! included.
//!
//! ```text
//! <prefix>blobs/<alg>/<hex>                 verified content (manifests carry their media type)
//! <prefix>tags/<upstream>/<repo>/<name>     a tag's (or referrers') record, JSON
//! <prefix>links/<upstream>/<repo>/<alg>/<hex>   an empty object: the repository holds the digest
//! ```
//!
//! Content appears under its key only whole and verified: it is uploaded in parts while the
//! fill streams, and the upload is completed only after the fill's last byte, which the fill
//! releases only once the digest matched; otherwise it is aborted. S3 makes a completed
//! multipart upload visible atomically, so a node killed mid-upload leaves nothing under the
//! key. The store being slow or down never fails a pull: every caller treats an error as "not
//! there" and counts it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutOptions,
    PutPayload, WriteMultipart,
};
use pier_metrics::Metrics;
use pier_oci::{Digest, RepositoryName};
use pier_upstream::{BlobResponse, TransportError, TransportKind, UpstreamError};

use crate::store::{RecordName, TagRecord};

/// Parts of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once per blob: bounds the memory an upload holds.
const PARTS_IN_FLIGHT: usize = 2;
/// Longest wait to connect to the store, and for its next bytes. No limit on a whole request:
/// a big blob streams for as long as it takes, as long as it moves.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store is left alone after an error: a dead or black-holed store costs one
/// failed request per interval, not one (with its retries) per lookup.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Where the shared store is and how to reach it.
#[derive(Clone, Debug)]
pub struct SharedStoreConfig {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    pub bucket: String,
    /// Prepended to every key (`pier/`), so that a bucket can hold other things too.
    pub prefix: String,
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) rather than virtual-host style.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// The shared store, as this node uses it.
pub struct SharedStore {
    /// For lookups and reads, which clients wait for: short timeouts, one retry.
    store: Arc<dyn ObjectStore>,
    /// For writes, which run beside the fills: the client's own timeouts and retries.
    writer: Arc<dyn ObjectStore>,
    prefix: String,
    metrics: Arc<Metrics>,
    /// Until when the store is taken as down, after an error.
    down_until: Mutex<Option<Instant>>,
}

impl SharedStore {
    /// A client for the configured bucket. No request is made here.
    pub fn new(config: &SharedStoreConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        // The store's HTTP client takes the process's TLS provider: pier's, ring. (Installed
        // already, by this or another client, is as good.)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(config.endpoint.trim_end_matches('/'))
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.endpoint.starts_with("http://"));
        let writer = builder.clone().build().map_err(|e| e.to_string())?;
        // For reads, the defaults (30 s per whole request, 10 retries over up to 3 minutes)
        // would make a dead store stall every lookup for minutes, and cut a blob that takes
        // longer to read off mid-stream.
        let reader = builder
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_allow_http(config.endpoint.starts_with("http://"))
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_read_timeout(READ_TIMEOUT)
                    .with_timeout_disabled(),
            )
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 1,
                retry_timeout: READ_TIMEOUT,
            })
            .build()
            .map_err(|e| e.to_string())?;
        let mut shared = Self::with_store(Arc::new(reader), &config.prefix, metrics);
        shared.writer = Arc::new(writer);
        Ok(shared)
    }

    /// Over any object store (tests use the in-memory one).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, metrics: Arc<Metrics>) -> Self {
        let mut prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        SharedStore {
            writer: store.clone(),
            store,
            prefix,
            metrics,
            down_until: Mutex::new(None),
        }
    }

    fn path(&self, rest: &str) -> Path {
        Path::from(format!("{}{rest}", self.prefix))
    }

    fn blob_path(&self, digest: &Digest) -> Path {
        self.path(&format!(
            "blobs/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    fn record_path(&self, upstream: &str, repo: &RepositoryName, name: RecordName<'_>) -> Path {
        let name = match name {
            RecordName::Tag(t) => format!("tag-{t}"),
            RecordName::Referrers(d) => format!("referrers-{}-{}", d.algorithm().as_str(), d.hex()),
        };
        self.path(&format!("tags/{upstream}/{repo}/{name}"))
    }

    fn link_path(&self, upstream: &str, repo: &RepositoryName, digest: &Digest) -> Path {
        self.path(&format!(
            "links/{upstream}/{repo}/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    fn failed(&self, op: &str, e: &dyn std::fmt::Display) {
        self.metrics
            .shared_store_errors
            .with_label_values(&[op])
            .inc();
        if matches!(op, "get" | "head") {
            tracing::warn!(op, error = %e, "shared store failed; lookups skipped for {}s", DOWN_FOR.as_secs());
            *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + DOWN_FOR);
        } else {
            tracing::warn!(op, error = %e, "shared store");
        }
    }

    /// Whether the store may be asked: lookups are not, for a while after one failed (writes
    /// run beside the fills and are always tried).
    fn up(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|until| until <= Instant::now())
    }

    /// A blob from `offset` on, if the store has it.
    pub(crate) async fn blob(&self, digest: &Digest, offset: u64) -> Option<BlobResponse> {
        if !self.up() {
            return None;
        }
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let got = match self.store.get_opts(&self.blob_path(digest), options).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return None,
            Err(e) => {
                self.failed("get", &e);
                return None;
            }
        };
        let total = got.meta.size;
        let start = got.range.start;
        let metrics = self.metrics.clone();
        let body = got
            .into_stream()
            .inspect_ok(move |b| {
                metrics
                    .shared_store_bytes
                    .with_label_values(&["read"])
                    .inc_by(b.len() as u64)
            })
            .map_err(|e| {
                UpstreamError::Transport(TransportError::new(
                    TransportKind::Other,
                    format!("shared store body broke: {e}"),
                ))
            })
            .boxed();
        Some(BlobResponse {
            start,
            total: Some(total),
            body,
        })
    }

    /// Removes a blob whose bytes, read back whole, did not hash to its digest.
    pub(crate) async fn remove_corrupt(&self, digest: &Digest) {
        tracing::warn!(%digest, "shared store object does not verify; removed");
        self.metrics
            .shared_store_errors
            .with_label_values(&["corrupt"])
            .inc();
        match self.writer.delete(&self.blob_path(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => self.failed("delete", &e),
        }
    }

    /// A blob's size, if the store has it.
    pub(crate) async fn size(&self, digest: &Digest) -> Option<u64> {
        if !self.up() {
            return None;
        }
        match self.store.head(&self.blob_path(digest)).await {
            Ok(meta) => Some(meta.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                self.failed("head", &e);
                None
            }
        }
    }

    /// A manifest and its media type, if the store has it.
    pub(crate) async fn manifest(&self, digest: &Digest) -> Option<(Bytes, String)> {
        if !self.up() {
            return None;
        }
        let got = match self.store.get(&self.blob_path(digest)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return None,
            Err(e) => {
                self.failed("get", &e);
                return None;
            }
        };
        let media_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string())?;
        let bytes = match got.bytes().await {
            Ok(b) => b,
            Err(e) => {
                self.failed("get", &e);
                return None;
            }
        };
        self.metrics
            .shared_store_bytes
            .with_label_values(&["read"])
            .inc_by(bytes.len() as u64);
        // The store is shared, not trusted: what does not verify is not there.
        digest.verifies(&bytes).then_some((bytes, media_type))
    }

    /// Stores a verified manifest with its media type.
    pub(crate) async fn put_manifest(&self, digest: &Digest, bytes: Bytes, media_type: &str) {
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_string().into());
        let len = bytes.len() as u64;
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        match self
            .writer
            .put_opts(&self.blob_path(digest), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => self
                .metrics
                .shared_store_bytes
                .with_label_values(&["written"])
                .inc_by(len),
            Err(e) => self.failed("put", &e),
        }
    }

    /// Uploads a blob as `stream` yields it, in parts, and completes the upload only when the
    /// stream ended without error (the fill's stream holds its last byte back until the digest
    /// verified); aborts it otherwise. Returns whether the blob is now in the store.
    pub(crate) async fn upload(
        &self,
        digest: &Digest,
        mut stream: BoxStream<'static, std::io::Result<Bytes>>,
    ) -> bool {
        let upload = match self.writer.put_multipart(&self.blob_path(digest)).await {
            Ok(u) => u,
            Err(e) => {
                self.failed("put", &e);
                return false;
            }
        };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut written = 0u64;
        while let Some(item) = stream.next().await {
            let chunk = match item {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "fill failed; shared upload aborted");
                    let _ = writer.abort().await;
                    return false;
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                self.failed("put", &e);
                let _ = writer.abort().await;
                return false;
            }
            written += chunk.len() as u64;
            writer.put(chunk);
        }
        if written == 0 {
            // S3 completes no upload without parts: the empty blob goes in one put.
            let _ = writer.abort().await;
            return match self
                .writer
                .put(&self.blob_path(digest), PutPayload::default())
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    self.failed("put", &e);
                    false
                }
            };
        }
        match writer.finish().await {
            Ok(_) => {
                self.metrics
                    .shared_store_bytes
                    .with_label_values(&["written"])
                    .inc_by(written);
                true
            }
            Err(e) => {
                self.failed("put", &e);
                false
            }
        }
    }

    /// A tag's (or referrers') record, if the store has one.
    pub(crate) async fn record(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
    ) -> Option<TagRecord> {
        if !self.up() {
            return None;
        }
        let path = self.record_path(upstream, repo, name);
        let bytes = match self.store.get(&path).await {
            Ok(g) => g.bytes().await,
            Err(e) => Err(e),
        };
        match bytes {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                self.failed("get", &e);
                None
            }
        }
    }

    /// Writes a tag's (or referrers') record. Nodes merge what they read, newest answer per
    /// accept set winning, so a lost race costs at most one more revalidation.
    pub(crate) async fn put_record(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
        record: &TagRecord,
    ) {
        let Ok(json) = serde_json::to_vec(record) else {
            return;
        };
        let path = self.record_path(upstream, repo, name);
        if let Err(e) = self.writer.put(&path, PutPayload::from(json)).await {
            self.failed("put", &e);
        }
    }

    /// Whether the region linked `digest` to the repository.
    pub(crate) async fn is_linked(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> bool {
        if !self.up() {
            return false;
        }
        match self
            .store
            .head(&self.link_path(upstream, repo, digest))
            .await
        {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => {
                self.failed("head", &e);
                false
            }
        }
    }

    /// Records links for the region.
    pub(crate) async fn put_links(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        digests: &[Digest],
    ) {
        for d in digests {
            if let Err(e) = self
                .writer
                .put(&self.link_path(upstream, repo, d), PutPayload::default())
                .await
            {
                self.failed("put", &e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use object_store::memory::InMemory;

    fn store() -> (SharedStore, Arc<InMemory>) {
        let mem = Arc::new(InMemory::new());
        let shared = SharedStore::with_store(mem.clone(), "pier/", Arc::new(Metrics::new()));
        (shared, mem)
    }

    fn chunks(data: &[u8], fail_at_end: bool) -> BoxStream<'static, std::io::Result<Bytes>> {
        let mut items: Vec<std::io::Result<Bytes>> = data
            .chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        if fail_at_end {
            items.push(Err(std::io::Error::other("digest mismatch")));
        }
        stream::iter(items).boxed()
    }

    #[tokio::test]
    async fn an_upload_completes_only_when_its_stream_ends_well() {
        let (shared, mem) = store();
        let data = vec![7u8; 12 << 20];
        let digest = Digest::sha256_of(&data);
        assert!(!shared.upload(&digest, chunks(&data, true)).await);
        assert!(
            mem.head(&shared.blob_path(&digest)).await.is_err(),
            "a failed fill left an object"
        );
        assert!(shared.upload(&digest, chunks(&data, false)).await);
        let resp = shared.blob(&digest, 5).await.expect("stored");
        assert_eq!((resp.start, resp.total), (5, Some(data.len() as u64)));
        let body: Vec<Bytes> = resp.body.try_collect().await.expect("body");
        assert_eq!(body.concat(), data[5..]);
    }

    #[tokio::test]
    async fn a_manifest_that_does_not_verify_is_not_there() {
        let (shared, mem) = store();
        let bytes = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let digest = Digest::sha256_of(&bytes);
        shared
            .put_manifest(
                &digest,
                bytes.clone(),
                "application/vnd.oci.image.manifest.v1+json",
            )
            .await;
        let (got, media_type) = shared.manifest(&digest).await.expect("stored");
        assert_eq!(
            (got, media_type.as_str()),
            (bytes, "application/vnd.oci.image.manifest.v1+json")
        );
        // Someone with write access to the bucket swaps the bytes: pier does not take them.
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, "application/json".into());
        mem.put_opts(
            &shared.blob_path(&digest),
            PutPayload::from_static(b"{}"),
            PutOptions {
                attributes,
                ..PutOptions::default()
            },
        )
        .await
        .expect("put");
        assert!(shared.manifest(&digest).await.is_none());
    }

    #[tokio::test]
    async fn records_and_links_round_trip_per_repository() {
        let (shared, _) = store();
        let repo = RepositoryName::parse("library/app").expect("name");
        let other = RepositoryName::parse("library/other").expect("name");
        let tag = pier_oci::Tag::parse("1.0").expect("tag");
        let digest = Digest::sha256_of(b"x");
        let record = TagRecord {
            answers: vec![crate::store::TagAnswer::new(
                pier_oci::AcceptSet::ALL,
                &digest,
                "application/vnd.oci.image.index.v1+json",
                std::time::SystemTime::now(),
            )],
        };
        shared
            .put_record("docker.io", &repo, RecordName::Tag(&tag), &record)
            .await;
        assert_eq!(
            shared
                .record("docker.io", &repo, RecordName::Tag(&tag))
                .await,
            Some(record)
        );
        assert_eq!(
            shared
                .record("docker.io", &other, RecordName::Tag(&tag))
                .await,
            None
        );
        shared
            .put_links("docker.io", &repo, std::slice::from_ref(&digest))
            .await;
        assert!(shared.is_linked("docker.io", &repo, &digest).await);
        assert!(!shared.is_linked("docker.io", &other, &digest).await);
        assert!(!shared.is_linked("ghcr.io", &repo, &digest).await);
    }
}
