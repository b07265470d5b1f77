//! Mutual TLS for Herald's gRPC, with rustls (the ring provider tonic's `tls-ring` uses).
//!
//! Both ends are TLS 1.3 only, and the server requires a client certificate signed by the
//! configured CA. Certificate, key and CA come from PEM files and are reloaded when the
//! files change (cert-manager renews them in place): [`Reloading`] holds the material in
//! force behind an `ArcSwap` and is itself the rustls certificate resolver and verifier,
//! so a renewal reaches the next handshake without a restart and a half-written renewal
//! (a key that does not match the certificate yet) leaves the old material in force.
//!
//! [`incoming`] turns a TCP listener into handshaken TLS streams for tonic's
//! `serve_with_incoming*`, and [`Connector`] is the client side for
//! `Endpoint::connect_with_connector*`. The peer's identity (its role) is in [`identity`].

pub mod identity;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub use identity::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError, Role};

/// How often the certificate files are checked for a change. A renewal lands well before
/// the old certificate expires (cert-manager renews at two thirds of its life), so seconds
/// do not matter, and a few `stat`s every few seconds cost nothing.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a client may take over its TLS handshake before the connection is dropped, so
/// a peer that opens a socket and says nothing holds nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further accepted sockets wait for a slot.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// HTTP/2 over TLS, as gRPC requires.
const ALPN_H2: &[u8] = b"h2";

/// The three PEM files of one end: its certificate chain, its private key, and the CA
/// bundle its peers' certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The three files when all are set; `None` (plaintext) otherwise. The settings refuse
    /// a configuration that sets only some of them, so `None` never hides a mistake.
    pub fn all(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Option<Self> {
        Some(TlsFiles {
            cert: cert?.to_path_buf(),
            key: key?.to_path_buf(),
            ca: ca?.to_path_buf(),
        })
    }
}

/// Why the TLS material could not be used. Each names the file and what was wrong with it;
/// never any key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {reason}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {} holds no PEM {expected}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The material in force: what a handshake uses.
struct Material {
    certified: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
}

/// Size and modification time of the three files: a change in any means a reload.
type Stamps = [Option<(SystemTime, u64)>; 3];

/// Certificate, key and CA from [`TlsFiles`], reloaded on change. It is the certificate
/// resolver and peer verifier of both the server and the client configuration it builds.
pub struct Reloading {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Material>,
    /// The stamps of the material in force, and of the last set that failed to load (so
    /// a broken renewal is logged once, not every poll).
    stamps: Mutex<(Stamps, Option<Stamps>)>,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Reloading {
    /// Loads the files; an error names the file and why.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = stamps(&files);
        let material = load_material(&files, &provider)?;
        Ok(Arc::new(Reloading {
            files,
            provider,
            current: ArcSwap::from_pointee(material),
            stamps: Mutex::new((stamps, None)),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reloads when a file changed since the material in force was read. `Ok(true)` when
    /// new material is now in force; on an error the old material stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        let mut guard = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0 == now {
            return Ok(false);
        }
        match load_material(&self.files, &self.provider) {
            Ok(material) => {
                self.current.store(Arc::new(material));
                *guard = (now, None);
                Ok(true)
            }
            Err(e) => {
                guard.1 = Some(now);
                Err(e)
            }
        }
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until every other reference to `self` is
    /// gone. A failed reload is logged (once per set of files) and the old material stays.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let failed_before = this.stamps.lock().map(|g| g.1).unwrap_or(None);
                match this.reload_if_changed() {
                    Ok(true) => {
                        info!(cert = %this.files.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        if failed_before != Some(stamps(&this.files)) {
                            warn!(error = %e, "TLS files changed but cannot be loaded; keeping the certificate in force");
                        }
                    }
                }
            }
        })
    }

    /// A TLS 1.3 server configuration requiring a client certificate, speaking HTTP/2.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::clone(self) as Arc<dyn ClientCertVerifier>)
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS 1.3 client configuration presenting this end's certificate and verifying the
    /// server's against the CA, speaking HTTP/2.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            // Not "dangerous" in effect: the verifier is rustls' own WebPKI verifier, only
            // swapped when the CA file changes.
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(self) as Arc<dyn ServerCertVerifier>)
            .with_client_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesClientCert>);
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// The end-entity certificate in force (DER), for tests and diagnostics.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.current.load().certified.cert[0].clone()
    }
}

fn stamps(files: &TlsFiles) -> Stamps {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    [stamp(&files.cert), stamp(&files.key), stamp(&files.ca)]
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn load_material(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Material, TlsError> {
    let invalid = |what: &'static str, path: &Path, reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read("certificate", &files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate", &files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: files.cert.clone(),
            expected: "CERTIFICATE",
        });
    }
    // The key's parse error says what kind of PEM it wanted, never the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(&read("private key", &files.key)?).map_err(|e| {
        invalid(
            "private key",
            &files.key,
            format!("no usable PEM private key ({e})"),
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        invalid(
            "certificate",
            &files.cert,
            format!("does not go with the key {}: {e}", files.key.display()),
        )
    })?;
    let mut roots = RootCertStore::empty();
    let mut any = false;
    for ca in CertificateDer::pem_slice_iter(&read("CA bundle", &files.ca)?) {
        let ca = ca.map_err(|e| invalid("CA bundle", &files.ca, e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| invalid("CA bundle", &files.ca, e.to_string()))?;
        any = true;
    }
    if !any {
        return Err(TlsError::Empty {
            what: "CA bundle",
            path: files.ca.clone(),
            expected: "CERTIFICATE",
        });
    }
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
            .build()
            .map_err(|e| invalid("CA bundle", &files.ca, e.to_string()))?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(provider))
        .build()
        .map_err(|e| invalid("CA bundle", &files.ca, e.to_string()))?;
    Ok(Material {
        certified: Arc::new(certified),
        client_verifier,
        server_verifier,
    })
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().certified))
    }
}

impl ResolvesClientCert for Reloading {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Reloading {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional, and the swapped material cannot lend them out by
        // reference; Herald's clients have one certificate each anyway.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current
            .load()
            .client_verifier
            .supported_verify_schemes()
    }
}

impl ServerCertVerifier for Reloading {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current.load().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current
            .load()
            .server_verifier
            .supported_verify_schemes()
    }
}

/// Accepts on `listener` and yields each connection once its TLS handshake is done, for
/// tonic's `serve_with_incoming*`. Handshakes run concurrently (a slow client does not
/// hold up the others), each bounded by [`HANDSHAKE_TIMEOUT`]; a failed handshake is
/// logged at debug level and dropped. The accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, then go on.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // A response is several small HTTP/2 frames; Nagle against the peer's delayed
            // ACK would stall them.
            let _ = tcp.set_nodelay(true);
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The client side for tonic's `Endpoint::connect_with_connector*`: TCP to the URI's host
/// and port, then TLS with the given configuration, checking the server's certificate for
/// `server_name` (or the URI's host).
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
    connect_timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn new(
        config: Arc<ClientConfig>,
        server_name: Option<String>,
        connect_timeout: Duration,
    ) -> Self {
        Connector {
            config,
            server_name,
            connect_timeout,
        }
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
            let host = uri
                .host()
                .ok_or_else(|| bad(format!("endpoint {uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = this.server_name.clone().unwrap_or_else(|| host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|_| bad(format!("`{name}` is not a valid TLS server name")))?;
            let connecting = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                tokio_rustls::TlsConnector::from(Arc::clone(&this.config))
                    .connect(server_name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(this.connect_timeout, connecting)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS connection to {host}:{port} timed out"),
                    )
                })??;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A gRPC endpoint reached in plaintext or over mutual TLS, for the clients of
/// herald-ipam: it connects the same way either way.
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    endpoint: tonic::transport::Endpoint,
    tls: Option<Connector>,
}

impl ClientEndpoint {
    /// `url` is `http://` or `https://`; with `tls` (this end's material and the name the
    /// server's certificate must carry, by default the URL's host) the connection is
    /// mutual TLS whatever the scheme says. The connect timeout bounds TCP and the TLS
    /// handshake together.
    pub fn new(
        url: &str,
        tls: Option<(&Arc<Reloading>, Option<String>)>,
        connect_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let bad = |e: &dyn fmt::Display| TlsError::Config(format!("endpoint {url}: {e}"));
        let mut uri: http::Uri = url.parse().map_err(|e| bad(&e))?;
        let tls = match tls {
            Some((reloading, server_name)) => {
                // tonic would wrap an https:// connection in TLS of its own; the connector
                // already did.
                if uri.scheme_str() == Some("https") {
                    let mut parts = uri.into_parts();
                    parts.scheme = Some(http::uri::Scheme::HTTP);
                    uri = http::Uri::from_parts(parts).map_err(|e| bad(&e))?;
                }
                Some(Connector::new(
                    reloading.client_config()?,
                    server_name,
                    connect_timeout,
                ))
            }
            None => None,
        };
        let endpoint = tonic::transport::Endpoint::from(uri).connect_timeout(connect_timeout);
        Ok(ClientEndpoint { endpoint, tls })
    }

    /// The endpoint for a client of herald-ipam configured by files: mutual TLS with
    /// `files` (re-read when they change) when given, plaintext otherwise.
    pub fn from_files(
        url: &str,
        files: Option<TlsFiles>,
        server_name: Option<String>,
        connect_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let reloading = match files {
            Some(files) => {
                let reloading = Reloading::load(files)?;
                // Ends when the last connection's configuration is dropped.
                let _reload = reloading.watch();
                Some(reloading)
            }
            None => None,
        };
        Self::new(
            url,
            reloading.as_ref().map(|r| (r, server_name)),
            connect_timeout,
        )
    }

    /// Applies more of tonic's settings (timeouts, keepalive) to the endpoint.
    #[must_use]
    pub fn with(
        mut self,
        f: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Self {
        self.endpoint = f(self.endpoint);
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn uri(&self) -> &http::Uri {
        self.endpoint.uri()
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector(tls.clone()).await,
            None => self.endpoint.connect().await,
        }
    }

    /// Connects on first use, and again after the connection breaks.
    pub fn connect_lazy(&self) -> tonic::transport::Channel {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector_lazy(tls.clone()),
            None => self.endpoint.connect_lazy(),
        }
    }
}
