//! TLS on the gRPC links and the HTTP API (README, "Security"): [`TlsConfig`], the PEM files of
//! `--tls-cert`, `--tls-key` and `--tls-ca`, read and checked once where the command line is
//! parsed, then turned into tonic's rustls configurations by the servers ([`TlsConfig::server`])
//! and the clients ([`endpoint`]), and into the HTTPS acceptor of the gateway's port
//! ([`TlsConfig::https_acceptor`]).
//!
//! Which side speaks TLS is decided by URLs, never guessed: a client dials `https://` with TLS
//! (verifying the server against the CA of `--tls-ca`, or the system's roots without it) and
//! `http://` without; a server with a certificate and key accepts only TLS. A cluster is all-TLS or
//! all-plain: workers call each other (and the coordinator's gateway calls them) over `https://`
//! exactly when they hold a certificate themselves ([`peer_url`]).
//!
//! A client and a server that disagree fail at once rather than hang: [`explain`] turns the
//! transport's error into what to change (`https://` and `--tls-ca`, or `http://`, or the CA), by
//! looking at rustls' error or, for a plaintext client, at the first bytes the server answers.
//! The private key is never printed (`Debug` shows the files' names only).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a TLS handshake may take, both sides: a peer that stops half-way is given up on
/// instead of holding the connection (and the client's command) forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the PEM files of a [`TlsConfig`] were refused: each error names the file (or flag).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {}: {what}", path.display())]
    NotPem { flag: &'static str, path: PathBuf, what: String },
    #[error("--tls-key {} is not the key of the certificate in --tls-cert {}: {why}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf, why: String },
    #[error("{given} is given without {missing}: a server needs both its certificate and its key")]
    Half { given: &'static str, missing: &'static str },
    #[error("bad URL {url}: {why}")]
    Url { url: String, why: String },
}

/// This process's TLS material: its certificate chain and key (serving TLS) and the CA its
/// clients verify servers against (`None`: the system's roots). Checked when loaded: every file is
/// PEM with what it should hold, and the key is the certificate's.
#[derive(Clone)]
pub struct TlsConfig {
    identity: Option<Identity>,
    /// The same certificate and key for the HTTP API (rustls directly: axum has no TLS of its own).
    https: Option<Arc<rustls::ServerConfig>>,
    /// Mutual TLS: the CA that must have signed the certificate every client of the gRPC port
    /// presents (`--tls-client-ca`); `None`: clients are not asked for one.
    client_ca: Option<Certificate>,
    ca: Option<Certificate>,
    /// The files, for `Debug` and errors.
    files: Vec<PathBuf>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("files", &self.files).finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.into(), source })
}

/// The certificates of a PEM file (at least one).
fn certificates(flag: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let not_pem = |what: String| TlsError::NotPem { flag, path: path.into(), what };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(not_pem("holds no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Reads `--tls-cert`, `--tls-key` and `--tls-ca` (each optional; cert and key together).
    /// `None` when none is given: plain TCP, and the system's roots for `https://` URLs.
    pub fn from_pem_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<TlsConfig>, TlsError> {
        let (identity, https) = match (cert, key) {
            (None, None) => (None, None),
            (Some(_), None) => return Err(TlsError::Half { given: "--tls-cert", missing: "--tls-key" }),
            (None, Some(_)) => return Err(TlsError::Half { given: "--tls-key", missing: "--tls-cert" }),
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
                let chain = certificates("--tls-cert", cert, &cert_pem)?;
                let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NotPem {
                    flag: "--tls-key",
                    path: key.into(),
                    what: format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
                })?;
                // The pair must match now: rustls would otherwise find out at the first handshake,
                // in a log line of the server while its clients see a closed connection.
                let mismatch = |why: String| TlsError::KeyMismatch { cert: cert.into(), key: key.into(), why };
                let signing =
                    rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| mismatch(e.to_string()))?;
                let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
                certified.keys_match().map_err(|e| mismatch(e.to_string()))?;
                let https = https_server(chain, der).map_err(|e| mismatch(e.to_string()))?;
                (Some(Identity::from_pem(cert_pem, key_pem)), Some(https))
            }
        };
        let files: Vec<PathBuf> = [cert, key, ca].into_iter().flatten().map(Path::to_path_buf).collect();
        let ca = match ca {
            None => None,
            Some(path) => {
                let pem = read("--tls-ca", path)?;
                certificates("--tls-ca", path, &pem)?;
                Some(Certificate::from_pem(pem))
            }
        };
        if identity.is_none() && ca.is_none() {
            return Ok(None);
        }
        Ok(Some(TlsConfig { identity, https, ca, client_ca: None, files }))
    }

    /// Mutual TLS (`--tls-client-ca`): this process's gRPC port then accepts only clients whose
    /// certificate the CA in `path` signed. Its own clients always present its certificate when it
    /// holds one. Errors: the file (as the others), or no certificate to serve TLS with.
    pub fn require_client_certificates(mut self, path: &Path) -> Result<TlsConfig, TlsError> {
        if !self.serves() {
            return Err(TlsError::Half { given: "--tls-client-ca", missing: "--tls-cert and --tls-key" });
        }
        let pem = read("--tls-client-ca", path)?;
        certificates("--tls-client-ca", path, &pem)?;
        self.client_ca = Some(Certificate::from_pem(pem));
        self.files.push(path.to_path_buf());
        Ok(self)
    }

    /// Whether this process serves TLS (it holds a certificate and its key).
    pub fn serves(&self) -> bool {
        self.identity.is_some()
    }

    /// The server side (`None` without a certificate): only TLS is accepted, and a handshake that
    /// does not finish within [`HANDSHAKE_TIMEOUT`] is dropped.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let config = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
        Some(match self.client_ca.clone() {
            Some(ca) => config.client_ca_root(ca),
            None => config,
        })
    }

    /// The HTTPS side of the HTTP API (`None` without a certificate): HTTP/2 or HTTP/1.1 by ALPN.
    pub fn https_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.https.clone().map(tokio_rustls::TlsAcceptor::from)
    }

    /// The client side: verifies servers against `--tls-ca` (or the system's roots without it).
    pub fn client(&self) -> ClientTlsConfig {
        client(Some(self))
    }
}

/// rustls' server configuration of the HTTP API: the checked certificate and key, ring's
/// cryptography (as tonic's), TLS 1.2 and 1.3, and ALPN offering HTTP/2 then HTTP/1.1 (what
/// curl, httpx and the `openai` client ask for).
fn https_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    // ring, as tonic's `tls-ring` (rustls now prefers aws-lc-rs, whose C build this project avoids).
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client(tls: Option<&TlsConfig>) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
    // A server that asks for a client certificate (mutual TLS) gets this process's own.
    if let Some(identity) = tls.and_then(|t| t.identity.clone()) {
        config = config.identity(identity);
    }
    match tls.and_then(|t| t.ca.clone()) {
        Some(ca) => config.ca_certificate(ca),
        None => config.with_native_roots(),
    }
}

/// A tonic endpoint for `url`: with TLS for `https://` (verified against `tls`'s CA, or the system's
/// roots), plain for `http://`. Connecting is the caller's (it picks the timeouts).
pub fn endpoint(url: &str, tls: Option<&TlsConfig>) -> Result<Endpoint, TlsError> {
    let bad = |why: String| TlsError::Url { url: url.to_string(), why };
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
    if url.starts_with("https://") {
        return endpoint.tls_config(client(tls)).map_err(|e| bad(e.to_string()));
    }
    Ok(endpoint)
}

/// The URL of another worker's port at `address` (`host:port`): `https://` when `tls` serves TLS
/// (a cluster is all-TLS or all-plain), `http://` otherwise.
pub fn peer_url(address: &str, tls: Option<&TlsConfig>) -> String {
    match tls {
        Some(t) if t.serves() => format!("https://{address}"),
        _ => format!("http://{address}"),
    }
}

/// The rustls error somewhere in `error`'s chain of sources (tonic wraps it in an `io::Error`).
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = r.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        next = e.source();
    }
    None
}

/// What to change when a connection to `url` (the `what`: "the coordinator") failed with `error`
/// because one side speaks TLS and the other does not, or the server's certificate is not trusted;
/// `None` for other failures (nothing listens, a refusal, ...). For an `http://` URL it connects
/// once more and reads what the server answers (a TLS alert: it speaks TLS), bounded by 3 s.
pub async fn explain(what: &str, url: &str, error: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<String> {
    if let Some(e) = rustls_error(error) {
        return Some(match e {
            rustls::Error::InvalidCertificate(why) => format!(
                "{what} at {url} presented a certificate that is not trusted ({why:?}): pass --tls-ca with the CA \
                 that signed it"
            ),
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => format!(
                "{what} at {url} requires a client certificate (mutual TLS): pass --tls-cert and --tls-key with \
                 one that its --tls-client-ca signed"
            ),
            rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::DecryptError,
            ) => format!(
                "{what} at {url} refused this client's certificate (mutual TLS): it must be signed by the CA of its \
                 --tls-client-ca"
            ),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!("{what} at {url} does not speak TLS: use http:// (or give it --tls-cert and --tls-key)")
            }
            e => format!("the TLS handshake with {what} at {url} failed: {e}"),
        });
    }
    plaintext_to_tls(what, url).await
}

/// For an `http://` URL: what to change when the server there speaks TLS (`None`: it does not, or
/// the URL is not `http://`). A plaintext client's connection to a TLS server "succeeds" (HTTP/2
/// sends its preface without waiting for an answer) and only its first call fails, with an HTTP/2
/// protocol error that names nothing; so clients ask this once when they connect (one more
/// connection, answered at once by either kind of server), bounded by 3 s.
pub async fn plaintext_to_tls(what: &str, url: &str) -> Option<String> {
    let authority = url.strip_prefix("http://")?.split('/').next()?;
    if speaks_tls(authority).await {
        return Some(format!("{what} at {url} speaks TLS: use https:// and --tls-ca"));
    }
    None
}

/// For an `https://` URL, when this client holds no certificate of its own: what to change when
/// the server there asks for one (mutual TLS). Over TLS 1.3 such a client's handshake "succeeds"
/// and only its first call fails, with a transport error that names nothing; so clients without a
/// certificate ask this once when they connect: one more handshake (verified against `tls`'s CA;
/// `None` without one), an HTTP/2 preface, and the server's answer, an alert or its settings,
/// bounded by 3 s.
pub async fn client_certificate_missing(what: &str, url: &str, tls: Option<&TlsConfig>) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = url.strip_prefix("https://")?.split('/').next()?;
    let tls = tls.filter(|t| t.identity.is_none())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.ca.as_ref()?.get_ref()).flatten() {
        roots.add(cert).ok()?;
    }
    #[allow(deprecated)] // ring, as above
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host).trim_matches(['[', ']']);
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.ok()?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.ok()?;
        let mut first = [0u8; 1];
        let refused = match stream.read(&mut first).await {
            Err(e) => matches!(
                e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired))
            ),
            Ok(_) => false,
        };
        Some(refused)
    };
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Some(true)) => Some(format!(
            "{what} at {url} requires a client certificate (mutual TLS): pass --tls-cert and --tls-key with one \
             that its --tls-client-ca signed"
        )),
        _ => None,
    }
}

/// Whether the server at `authority` answers an HTTP/2 preface with a TLS record (rustls sends a
/// fatal alert before it closes a connection that does not start with a handshake).
async fn speaks_tls(authority: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut first = [0u8; 3];
        stream.read_exact(&mut first).await.ok()?;
        // A TLS record: alert (21) or handshake (22), protocol version 3.x.
        Some(matches!(first, [21 | 22, 3, _]))
    };
    tokio::time::timeout(Duration::from_secs(3), probe).await.ok().flatten().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pems {
        dir: tempfile::TempDir,
    }

    impl Pems {
        fn new() -> Pems {
            let dir = tempfile::tempdir().unwrap();
            let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            std::fs::write(dir.path().join("cert.pem"), a.cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), a.signing_key.serialize_pem()).unwrap();
            std::fs::write(dir.path().join("other-key.pem"), b.signing_key.serialize_pem()).unwrap();
            std::fs::write(dir.path().join("garbage.pem"), "not a pem file\n").unwrap();
            Pems { dir }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn load(
        pems: &Pems,
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
    ) -> Result<Option<TlsConfig>, TlsError> {
        let (cert, key, ca) = (cert.map(|c| pems.path(c)), key.map(|k| pems.path(k)), ca.map(|c| pems.path(c)));
        TlsConfig::from_pem_files(cert.as_deref(), key.as_deref(), ca.as_deref())
    }

    #[test]
    fn pem_files_are_checked_and_errors_name_them() {
        let pems = Pems::new();
        assert!(load(&pems, None, None, None).unwrap().is_none());
        let tls = load(&pems, Some("cert.pem"), Some("key.pem"), Some("cert.pem")).unwrap().unwrap();
        assert!(tls.serves() && tls.server().is_some());
        let debug = format!("{tls:?}");
        assert!(debug.contains("key.pem") && !debug.contains("PRIVATE"), "{debug}");
        let client_only = load(&pems, None, None, Some("cert.pem")).unwrap().unwrap();
        assert!(!client_only.serves() && client_only.server().is_none());

        let err = |cert, key, ca| load(&pems, cert, key, ca).unwrap_err().to_string();
        let missing = err(Some("nope.pem"), Some("key.pem"), None);
        assert!(missing.starts_with("cannot read --tls-cert ") && missing.contains("nope.pem"), "{missing}");
        let garbage = err(Some("garbage.pem"), Some("key.pem"), None);
        assert!(garbage.starts_with("--tls-cert ") && garbage.contains("garbage.pem: holds no"), "{garbage}");
        let garbage = err(Some("cert.pem"), Some("garbage.pem"), None);
        assert!(
            garbage.starts_with("--tls-key ") && garbage.contains("garbage.pem: holds no PEM private key"),
            "{garbage}"
        );
        let garbage = err(None, None, Some("garbage.pem"));
        assert!(garbage.starts_with("--tls-ca ") && garbage.contains("garbage.pem"), "{garbage}");
        let key_as_cert = err(Some("key.pem"), Some("key.pem"), None);
        assert!(key_as_cert.contains("key.pem: holds no `BEGIN CERTIFICATE`"), "{key_as_cert}");
        let mismatch = err(Some("cert.pem"), Some("other-key.pem"), None);
        assert!(mismatch.contains("other-key.pem is not the key of the certificate in --tls-cert"), "{mismatch}");
        assert!(mismatch.contains("cert.pem"), "{mismatch}");
        assert!(err(Some("cert.pem"), None, None).contains("--tls-cert is given without --tls-key"));
        assert!(err(None, Some("key.pem"), None).contains("--tls-key is given without --tls-cert"));
    }

    #[test]
    fn peers_are_dialled_over_tls_exactly_when_this_side_serves_it() {
        let pems = Pems::new();
        let serving = load(&pems, Some("cert.pem"), Some("key.pem"), None).unwrap();
        let client_only = load(&pems, None, None, Some("cert.pem")).unwrap();
        assert_eq!(peer_url("10.0.0.1:7000", serving.as_ref()), "https://10.0.0.1:7000");
        assert_eq!(peer_url("10.0.0.1:7000", client_only.as_ref()), "http://10.0.0.1:7000");
        assert_eq!(peer_url("10.0.0.1:7000", None), "http://10.0.0.1:7000");
        assert!(endpoint("https://127.0.0.1:1", client_only.as_ref()).is_ok());
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
        assert!(endpoint("not a url", None).unwrap_err().to_string().starts_with("bad URL not a url"));
    }
}
