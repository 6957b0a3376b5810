//! TLS, all of it rustls on the `ring` provider:
//! - the checks of every PEM file the config names ([`check_files`]), run by `check-config`,
//!   startup and reload;
//! - the PEM loaders that both startup and `check-config` use ([`read_cert_chain`],
//!   [`read_private_key`], [`read_ca_bundle`]); their errors never quote file contents;
//! - the client listener's certificate ([`ServerTls`]), swapped atomically on reload (SIGHUP) so
//!   open connections keep the one they were accepted with and new ones get the new one;
//! - the handshake with a deadline ([`accept`]) and the stream type plain and TLS connections
//!   share ([`ClientIo`]);
//! - the upstream client's trust roots ([`upstream_client_config`]).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, TlsConfig, invalid};

/// Why certificates, keys or trust roots could not be loaded. The texts name the file and never
/// quote its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    /// The chain or key was refused by rustls (unparsable leaf, unsupported algorithm).
    #[error("{0}")]
    Refused(String),
    #[error("the private key does not belong to the leaf certificate")]
    KeyMismatch,
    #[error("no system root certificates could be loaded ({0}); set upstream.ca_file")]
    NoSystemRoots(String),
}

/// The crypto provider of every TLS config the proxy builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default, for TLS configs built by libraries (redis-rs for
/// `rediss://`). rustls would pick it anyway while ring is the only provider compiled in; this
/// keeps it so should another dependency ever enable aws-lc-rs. A second call does nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A PEM error in words, without the bytes some variants carry (they could be key material).
fn describe(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        pem::Error::Io(e) => format!("read error: {e}"),
        pem::Error::NoItemsFound => "nothing of the expected kind in it".into(),
        pem::Error::SectionTooLarge => "a PEM section is too large".into(),
        _ => "not valid PEM".into(),
    }
}

fn pem_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, describe(&e)))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            format!("no PEM certificate (-----BEGIN CERTIFICATE-----) found; expected {what}"),
        ));
    }
    Ok(certs)
}

/// A certificate chain, leaf first (PEM `CERTIFICATE` blocks).
pub fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certificates(path, "the certificate chain, leaf first")
}

/// A private key: the first PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM block. It must be one ring
/// can use.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => pem_error(
            path,
            "no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found",
        ),
        e => pem_error(path, describe(&e)),
    })?;
    // rustls' errors here name the problem, never the key.
    provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| pem_error(path, format!("unusable private key: {e}")))?;
    Ok(key)
}

/// Trust anchors: every PEM `CERTIFICATE` in the file must be a parsable CA certificate.
pub fn read_ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(path, "CA certificates")?
        .into_iter()
        .enumerate()
    {
        roots
            .add(cert)
            .map_err(|e| pem_error(path, format!("certificate #{}: {e}", i + 1)))?;
    }
    Ok(roots)
}

/// Reads the files the config names (TLS certificate and key, CA bundles, Redis password) and checks that they
/// parse, so the proxy refuses to start, `check-config` fails and a reload is refused on a bad
/// one. Errors name the config key. [`Config::parse`] does not touch the filesystem.
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    fn named(key: &'static str) -> impl Fn(TlsError) -> ConfigError {
        move |e| invalid(key, e.to_string())
    }
    if let Some(tls) = &config.tls {
        let chain = read_cert_chain(&tls.cert_file).map_err(named("tls.cert_file"))?;
        let key = read_private_key(&tls.key_file).map_err(named("tls.key_file"))?;
        // A leaf that does not parse, or a key of another certificate.
        server_config(chain, key).map_err(|e| match e {
            TlsError::KeyMismatch => invalid(
                "tls.key_file",
                format!("{e} in tls.cert_file ({})", tls.cert_file.display()),
            ),
            e => invalid("tls.cert_file", e.to_string()),
        })?;
    }
    if let Some(ca) = &config.upstream.ca_file {
        read_ca_bundle(ca).map_err(named("upstream.ca_file"))?;
    }
    if let Some(ca) = &config.redis.ca_file {
        read_ca_bundle(ca).map_err(named("redis.ca_file"))?;
    }
    // Not TLS, but a file the config names all the same: the Sentinel/Cluster password.
    crate::config::check_password_files(config)
}

/// The listener's rustls config: the chain and key, ALPN `h2` then `http/1.1` (hyper-util's
/// auto builder serves both).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .with_no_client_auth()
        // Checks that the key belongs to the leaf certificate.
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            e => TlsError::Refused(format!("certificate refused: {e}")),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Loads `tls.cert_file` and `tls.key_file` into a server config.
pub fn load_server_config(cfg: &TlsConfig) -> Result<(ServerConfig, String), TlsError> {
    let chain = read_cert_chain(&cfg.cert_file)?;
    let key = read_private_key(&cfg.key_file)?;
    let fingerprint = fingerprint(&chain[0]);
    Ok((server_config(chain, key)?, fingerprint))
}

/// SHA-256 of a certificate (DER) in hex, as `openssl x509 -fingerprint -sha256` prints it
/// (without colons): public, and enough for an operator to tell which certificate is served.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The client listener's certificate, replaceable while serving.
pub struct ServerTls {
    files: TlsConfig,
    current: ArcSwap<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// Of the leaf certificate ([`fingerprint`]).
    fingerprint: String,
}

impl ServerTls {
    /// Loads the certificate and key named in the config.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let (config, fingerprint) = load_server_config(files)?;
        tracing::info!(
            cert_file = %files.cert_file.display(),
            sha256 = %fingerprint,
            "TLS certificate loaded"
        );
        Ok(ServerTls {
            files: files.clone(),
            current: ArcSwap::from_pointee(Loaded {
                config: Arc::new(config),
                fingerprint,
            }),
        })
    }

    /// Re-reads the files. On success new handshakes use them (connections already open keep
    /// theirs); on failure nothing changes and the error is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (config, fingerprint) = load_server_config(&self.files)?;
        // Swap first, then log: whoever reads the log line can rely on the new certificate.
        self.current.store(Arc::new(Loaded {
            config: Arc::new(config),
            fingerprint: fingerprint.clone(),
        }));
        tracing::info!(
            cert_file = %self.files.cert_file.display(),
            sha256 = %fingerprint,
            "TLS certificate reloaded"
        );
        Ok(())
    }

    /// An acceptor with the certificate in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().config.clone())
    }

    /// The SHA-256 fingerprint of the leaf certificate in force.
    pub fn fingerprint(&self) -> String {
        self.current.load().fingerprint.clone()
    }
}

/// A client connection, plain or TLS.
pub enum ClientIo<T> {
    Plain(T),
    Tls(Box<tokio_rustls::server::TlsStream<T>>),
}

/// Completes the TLS handshake (when `acceptor` is set) within `timeout`, so a client that never
/// finishes it cannot hold a connection slot. `None`: the connection is dropped (logged at debug,
/// with the peer and rustls' reason only).
pub async fn accept<T>(
    acceptor: Option<TlsAcceptor>,
    io: T,
    timeout: Duration,
    peer: SocketAddr,
) -> Option<ClientIo<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(acceptor) = acceptor else {
        return Some(ClientIo::Plain(io));
    };
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Some(ClientIo::Tls(Box::new(stream))),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
            None
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ClientIo::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_write(cx, data),
            ClientIo::Tls(io) => Pin::new(io).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            ClientIo::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(io) => io.is_write_vectored(),
            ClientIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_flush(cx),
            ClientIo::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ClientIo::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// The upstream client's rustls config. With `ca_file`, only its CAs are trusted; otherwise the
/// system's roots (rustls-native-certs: `SSL_CERT_FILE`/`SSL_CERT_DIR` or the OS store). For an
/// `http://` upstream (`https` false) no roots are loaded: the config is never used.
pub fn upstream_client_config(
    https: bool,
    ca_file: Option<&Path>,
) -> Result<ClientConfig, TlsError> {
    let roots = match (https, ca_file) {
        (_, Some(path)) => read_ca_bundle(path)?,
        (false, None) => RootCertStore::empty(),
        (true, None) => system_roots()?,
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none found".into());
        return Err(TlsError::NoSystemRoots(why));
    }
    for e in &found.errors {
        tracing::warn!(error = %e, "some system root certificates could not be loaded");
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    #[test]
    fn check_files_names_the_key() {
        let c = Config::parse(
            "upstream: {url: 'http://hs'}\ntls: {cert_file: /nonexistent/c, key_file: /nonexistent/k}",
            |_| None,
        )
        .unwrap();
        let e = check_files(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.cert_file: cannot read /nonexistent/c"),
            "{e}"
        );
        let c = Config::parse(
            "upstream: {url: 'https://hs', ca_file: /nonexistent/ca}",
            |_| None,
        )
        .unwrap();
        let e = check_files(&c).unwrap_err().to_string();
        assert!(e.starts_with("upstream.ca_file: cannot read"), "{e}");
        check_files(&Config::parse("upstream: {url: 'http://hs'}", |_| None).unwrap()).unwrap();
    }

    /// A self-signed certificate for 127.0.0.1: (cert PEM, key PEM, fingerprint).
    fn self_signed() -> (String, String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem(), fingerprint(cert.der()))
    }

    #[test]
    fn reload_swaps_and_a_failed_reload_keeps_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsConfig {
            cert_file: dir.path().join("c.pem"),
            key_file: dir.path().join("k.pem"),
        };
        let write = |(c, k, _): &(String, String, String)| {
            std::fs::write(&files.cert_file, c).unwrap();
            std::fs::write(&files.key_file, k).unwrap();
        };
        let (one, two) = (self_signed(), self_signed());
        write(&one);
        let tls = ServerTls::load(&files).unwrap();
        assert_eq!(tls.fingerprint(), one.2);
        write(&two);
        tls.reload().unwrap();
        assert_eq!(tls.fingerprint(), two.2);
        // Certificate of one, key of two.
        std::fs::write(&files.cert_file, &one.0).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::KeyMismatch)));
        std::fs::remove_file(&files.key_file).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        assert_eq!(tls.fingerprint(), two.2);
    }

    #[test]
    fn pem_errors_never_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        for text in [
            "-----BEGIN PRIVATE KEY-----\nSECRET*not*base64\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n",
            "-----BEGIN PRIVATE KEY SECRET\nU0VDUkVU\n-----END PRIVATE KEY-----\n",
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_private_key(&p).unwrap_err().to_string();
            assert!(!e.contains("SECRET") && !e.contains("U0VDUkVU"), "{e}");
            assert!(e.contains("k.pem"), "{e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_handshake_ends_at_the_deadline() {
        let (c, k, _) = self_signed();
        let chain = CertificateDer::pem_slice_iter(c.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(chain, key).unwrap()));
        // The client end stays open and silent.
        let (_client, server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let peer = "127.0.0.1:1".parse().unwrap();
        let r = accept(Some(acceptor), server, Duration::from_secs(30), peer).await;
        assert!(r.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }
}
