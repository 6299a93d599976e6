//! TLS for `tls` and `wss` listeners: rustls server configuration from PEM files, mutual TLS
//! with a client CA, the client certificate's subject, and certificate reloading.
//!
//! The server configuration sits behind a lock as an `Arc` and is read once per accepted
//! connection, so a reload (SIGHUP, or a changed file seen by the watcher's once-a-second
//! poll) swaps it for new connections while established ones keep the session they have.
//! A reload that fails keeps the previous configuration and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig, ServerConnection};
use tokio_util::sync::CancellationToken;

/// How often the watcher looks at the files' modification times.
const POLL: Duration = Duration::from_secs(1);

/// Where a TLS listener's certificates come from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates for client certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Whether a client without a certificate is refused (with `client_ca`).
    pub require_client_cert: bool,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or key (for example a key that does not match).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA set cannot verify anything.
    #[error("client_ca: {0}")]
    Verifier(String),
}

fn pem_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE section"));
    }
    Ok(certs)
}

/// Builds the rustls server configuration: TLS 1.3 and 1.2, ring's cipher suites, and a
/// client certificate verifier when `client_ca` is set.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| pem_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(chain, key)?)
}

/// The system's CA bundle on Debian and its derivatives: what a bridge trusts when its
/// configuration names no `ca`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds a rustls client configuration (a bridge's connection to its remote): servers
/// whose certificate `ca` signs (PEM), TLS 1.3 and 1.2, and a client certificate when
/// `identity` (chain, key) is given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates(ca)?);
    if added == 0 {
        return Err(pem_error(ca, "no usable CA certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    Ok(match identity {
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject distinguished name, RFC 4514 form (`CN=device-7,O=Acme`).
    pub subject: String,
    /// The subject's Common Name, if it has one.
    pub common_name: Option<String>,
}

/// The client certificate of an established TLS session, if the client presented one
/// (rustls has verified it against the client CA by then).
pub fn client_cert(conn: &ServerConnection) -> Option<ClientCert> {
    use x509_cert::der::Decode;
    let der = conn.peer_certificates()?.first()?;
    let cert = match x509_cert::Certificate::from_der(der.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "client certificate subject unreadable");
            return None;
        }
    };
    let subject = cert.tbs_certificate().subject();
    Some(ClientCert {
        subject: subject.to_string(),
        common_name: subject
            .common_name()
            .ok()
            .flatten()
            .map(|cn| cn.value().into_owned()),
    })
}

/// Modification time and length of each file, to notice a change.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// A TLS acceptor whose configuration can be replaced while the listener runs.
#[derive(Debug)]
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Stamps>,
}

impl ReloadableTls {
    /// Loads the configuration; an error here stops the broker from starting.
    pub fn load(files: TlsFiles) -> Result<ReloadableTls, TlsError> {
        let stamps = stamps(&files);
        let config = server_config(&files)?;
        Ok(ReloadableTls {
            files,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Re-reads the files if `force` or if one of them changed since the last look.
    /// Returns whether a new configuration is in use.
    pub fn reload(&self, force: bool, listener: &str) -> bool {
        let now = stamps(&self.files);
        {
            let Ok(mut seen) = self.stamps.lock() else {
                return false;
            };
            if !force && *seen == now {
                return false;
            }
            *seen = now;
        }
        match server_config(&self.files) {
            Ok(config) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(config);
                }
                tracing::info!(listener, cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(listener, error = %e, "TLS certificates not reloaded; keeping the previous ones");
                false
            }
        }
    }

    /// Reloads on every change of `reload` (SIGHUP) and when the files change, until
    /// `shutdown`.
    pub fn spawn_watcher(
        self: Arc<Self>,
        listener: String,
        shutdown: CancellationToken,
        mut reload: tokio::sync::watch::Receiver<u64>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut signals_open = true;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let this = self.clone();
                        let name = listener.clone();
                        // File system calls and PEM parsing off the runtime's workers.
                        let _ = tokio::task::spawn_blocking(move || this.reload(false, &name)).await;
                    }
                    r = reload.changed(), if signals_open => {
                        if r.is_err() {
                            signals_open = false;
                            continue;
                        }
                        let this = self.clone();
                        let name = listener.clone();
                        let _ = tokio::task::spawn_blocking(move || this.reload(true, &name)).await;
                    }
                }
            }
        })
    }
}

fn stamps(files: &TlsFiles) -> Stamps {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}
