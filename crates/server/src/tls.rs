//! HTTPS for the registry listener: a certificate chain and key from PEM files, reloaded without a
//! restart when the files change (checked every few seconds) or on SIGHUP; HTTP/2 and HTTP/1.1
//! negotiated by ALPN; optionally, client certificates verified against a CA (mTLS).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Where the TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// The certificate in use, swapped whole on reload.
struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadingCert")
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// A TLS acceptor whose certificate can be reloaded.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    cert: Arc<ReloadingCert>,
    acceptor: TlsAcceptor,
    /// Modification times of cert and key when last loaded.
    loaded: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("private key {}: {e}", files.key.display()))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private key {}: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not match {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(certified)
}

impl Tls {
    /// Loads the files and builds the acceptor. Errors name the file and the problem.
    pub fn load(files: TlsFiles) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(load_key(&files, &provider)?)),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("cannot read client CA {}: {e}", ca.display()))?
                {
                    roots
                        .add(c.map_err(|e| format!("client CA {}: {e}", ca.display()))?)
                        .map_err(|e| e.to_string())?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let loaded = RwLock::new((mtime(&files.cert), mtime(&files.key)));
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            files,
            provider,
            cert,
            loaded,
        })
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Loads the certificate and key again; on error the one in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let stamps = (mtime(&self.files.cert), mtime(&self.files.key));
        let key = load_key(&self.files, &self.provider)?;
        *self.cert.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = stamps;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads when the files' modification times change (checked every `every`) and on
    /// SIGHUP. Runs until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let signalled = tokio::select! {
                () = tokio::time::sleep(every) => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let now = (mtime(&self.files.cert), mtime(&self.files.key));
            let changed = now != *self.loaded.read().unwrap_or_else(|p| p.into_inner());
            if signalled || changed {
                if let Err(e) = self.reload() {
                    tracing::error!(error = %e, "TLS certificate not reloaded; keeping the previous one");
                }
            }
        }
    }
}
