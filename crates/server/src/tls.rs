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

/// Why TLS material could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or is not PEM.
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    /// The key is not one rustls can sign with, or does not match the certificate.
    #[error("private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// The client CA cannot verify client certificates.
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    /// rustls refused the configuration (no usable protocol versions).
    #[error("TLS configuration: {0}")]
    Config(String),
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

fn load_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &PathBuf, e: &dyn fmt::Display| TlsError::Read {
        what,
        path: path.clone(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read("certificate", &files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read("certificate", &files.cert, &e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| read("private key", &files.key, &e))?;
    let key_error = |message: String| TlsError::Key {
        path: files.key.clone(),
        message,
    };
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| key_error(format!("does not match {}: {e}", files.cert.display())))?;
    Ok(certified)
}

impl Tls {
    /// Loads the files and builds the acceptor. Errors name the file and the problem.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(load_key(&files, &provider)?)),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let ca_error = |e: &dyn fmt::Display| TlsError::ClientCa {
                    path: ca.clone(),
                    message: e.to_string(),
                };
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| TlsError::Read {
                    what: "client CA",
                    path: ca.clone(),
                    message: e.to_string(),
                })? {
                    roots
                        .add(c.map_err(|e| ca_error(&e))?)
                        .map_err(|e| ca_error(&e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| ca_error(&e))?;
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
    pub fn reload(&self) -> Result<(), TlsError> {
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
            // Reading the files is blocking: off the async workers.
            let tls = self.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let now = (mtime(&tls.files.cert), mtime(&tls.files.key));
                let changed = now != *tls.loaded.read().unwrap_or_else(|p| p.into_inner());
                if signalled || changed {
                    tls.reload()?;
                }
                Ok::<_, TlsError>(())
            })
            .await;
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; keeping the previous one");
                }
                Err(e) => tracing::error!(error = %e, "TLS certificate check failed"),
            }
        }
    }
}
