//! QUIC between Ed25519 identities (quinn + rustls, ALPN `hypha/1`).
//!
//! Each node presents a self-signed certificate whose subject public key is
//! its Ed25519 identity key. Both ends require a certificate. Verification
//! is never switched off: the TLS 1.3 handshake signature is checked against
//! the certificate's key (so the peer holds that key), and the key's SHA-256
//! is the peer's `NodeId`. A dialer names the `NodeId` it expects and aborts
//! the handshake if it reached anyone else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hypha_wire::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{node_id_of, Identity};
use crate::util::{lock, Tasks};

/// Errors setting up QUIC or reaching a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
}

/// Concurrent requests one peer may run on a connection: each request is
/// one bidirectional stream, and a node serves at most a few slots' worth.
pub const MAX_STREAMS_PER_PEER: u32 = 64;
/// A connection with no traffic (keep-alives included) for this long is
/// closed: the peer is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval while a connection is open, well inside the idle
/// timeout so a live but quiet peer is kept.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Idle timeout of a connection over a relayed path: short, so a lost
/// relay fails the requests on it within seconds. The dialer's value is
/// the connection's (QUIC takes the lower of the two ends').
pub const RELAYED_IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Keep-alive interval over a relayed path, well inside its idle timeout.
pub const RELAYED_KEEP_ALIVE: Duration = Duration::from_secs(2);

// A live peer's keep-alives arrive well inside the idle timeout, on both
// kinds of path, and a relayed connection gives up no later than a direct
// one.
const _: () = assert!(KEEP_ALIVE.as_millis() * 2 <= IDLE_TIMEOUT.as_millis());
const _: () = assert!(RELAYED_KEEP_ALIVE.as_millis() * 2 <= RELAYED_IDLE_TIMEOUT.as_millis());
const _: () = assert!(RELAYED_IDLE_TIMEOUT.as_millis() <= IDLE_TIMEOUT.as_millis());
// A relayed path carrying a live connection is never idle: its keep-alives
// come more often than the path's idle limit.
const _: () = assert!(RELAYED_KEEP_ALIVE.as_millis() < crate::net::paths::PATH_IDLE.as_millis());

/// Connection limits and timers.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    pub max_streams_per_peer: u32,
    pub idle_timeout: Duration,
    /// `None` lets a quiet connection run into the idle timeout.
    pub keep_alive: Option<Duration>,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_streams_per_peer: MAX_STREAMS_PER_PEER,
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: Some(KEEP_ALIVE),
        }
    }
}

impl TransportLimits {
    fn config(&self) -> Result<Arc<quinn::TransportConfig>, TransportError> {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(self.max_streams_per_peer.into());
        // Peers talk over bidirectional streams only.
        t.max_concurrent_uni_streams(0u32.into());
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout).map_err(tls_err)?,
        ));
        t.keep_alive_interval(self.keep_alive);
        Ok(Arc::new(t))
    }
}

/// A QUIC endpoint that accepts and dials authenticated peers.
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    /// The endpoint's socket, which answers STUN on the QUIC port.
    stun: Arc<crate::net::socket::StunSocket>,
    stun_responses:
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::net::socket::StunResponse>>>,
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    transport: Arc<quinn::TransportConfig>,
    /// For connections dialed over relayed paths.
    relayed_transport: Arc<quinn::TransportConfig>,
}

impl Endpoint {
    /// Binds a UDP socket and serves QUIC with `identity`'s certificate.
    pub fn bind(identity: &Identity, addr: SocketAddr) -> Result<Self, TransportError> {
        Self::bind_with(identity, addr, &TransportLimits::default())
    }

    /// [`Endpoint::bind`] with explicit limits; the endpoint owns the tasks
    /// of its relayed paths.
    pub fn bind_with(
        identity: &Identity,
        addr: SocketAddr,
        limits: &TransportLimits,
    ) -> Result<Self, TransportError> {
        Self::bind_in(identity, addr, limits, Tasks::new())
    }

    /// [`Endpoint::bind_with`], its relayed paths' tasks owned by `tasks`
    /// (a node's).
    pub fn bind_in(
        identity: &Identity,
        addr: SocketAddr,
        limits: &TransportLimits,
        tasks: Tasks,
    ) -> Result<Self, TransportError> {
        crate::util::install_crypto_provider();
        let transport = limits.config()?;
        let relayed_transport = TransportLimits {
            idle_timeout: limits.idle_timeout.min(RELAYED_IDLE_TIMEOUT),
            keep_alive: Some(
                limits
                    .keep_alive
                    .unwrap_or(RELAYED_KEEP_ALIVE)
                    .min(RELAYED_KEEP_ALIVE),
            ),
            ..limits.clone()
        }
        .config()?;
        let key_pkcs8 = ed25519_pkcs8(&identity.signing_key().to_bytes());
        let cert = self_signed(&key_pkcs8)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(Arc::new(PeerVerifier::new(None)))
            .with_single_cert(vec![cert.clone()], private_key(&key_pkcs8))
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![hypha_wire::ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(transport.clone());
        let bind_err = |source| TransportError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let (stun, responses) = crate::net::socket::StunSocket::new(
            runtime.wrap_udp_socket(socket).map_err(bind_err)?,
            tasks,
        );
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            stun.clone(),
            runtime,
        )
        .map_err(bind_err)?;
        Ok(Self {
            endpoint,
            stun,
            stun_responses: std::sync::Mutex::new(Some(responses)),
            cert,
            key_pkcs8,
            transport,
            relayed_transport,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The socket, to send STUN probes from the QUIC port.
    pub fn stun(&self) -> &Arc<crate::net::socket::StunSocket> {
        &self.stun
    }

    /// The relayed paths the endpoint's socket carries.
    pub fn paths(&self) -> &Arc<crate::net::paths::Paths> {
        &self.stun.paths
    }

    /// The binding responses this endpoint receives; the first caller
    /// takes them.
    pub fn take_stun_responses(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::net::socket::StunResponse>> {
        lock(&self.stun_responses).take()
    }

    /// The next incoming connection that completes its handshake, with the
    /// peer's id; `None` once the endpoint is closed. Handshakes run one at
    /// a time here; a server takes [`Endpoint::accept_incoming`] and runs
    /// [`Endpoint::handshake`] in a task per peer instead.
    pub async fn accept(&self) -> Option<Result<(quinn::Connection, NodeId), TransportError>> {
        let incoming = self.accept_incoming().await?;
        Some(Self::handshake(incoming).await)
    }

    /// The next connection attempt, before its handshake; `None` once the
    /// endpoint is closed.
    pub async fn accept_incoming(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Completes an incoming connection's handshake and names the peer.
    pub async fn handshake(
        incoming: quinn::Incoming,
    ) -> Result<(quinn::Connection, NodeId), TransportError> {
        let addr = incoming.remote_address();
        match incoming.await {
            Ok(conn) => match peer_id(&conn) {
                Some(id) => Ok((conn, id)),
                None => Err(TransportError::Connect {
                    addr,
                    reason: "peer presented no usable certificate".into(),
                }),
            },
            Err(e) => Err(TransportError::Connect {
                addr,
                reason: e.to_string(),
            }),
        }
    }

    /// Dials `addr`, expecting the node `expected`; anyone else fails the
    /// handshake.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        expected: NodeId,
    ) -> Result<quinn::Connection, TransportError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            // Not "dangerous" in effect: PeerVerifier checks the handshake
            // signature and pins the peer's key by its NodeId, which is what
            // a CA chain would otherwise stand in for.
            .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(Some(expected))))
            .with_client_auth_cert(vec![self.cert.clone()], private_key(&self.key_pkcs8))
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![hypha_wire::ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(if crate::net::addr::is_virtual(&addr) {
            self.relayed_transport.clone()
        } else {
            self.transport.clone()
        });
        let connecting = self
            .endpoint
            .connect_with(client, addr, "hypha")
            .map_err(|e| TransportError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        connecting.await.map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }

    /// Waits until every connection has finished closing.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// The id of the peer on an established connection.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let cert = certs.first()?;
    ed25519_key_of(cert).map(|k| node_id_of(&k))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410).
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut out = PREFIX.to_vec();
    out.extend_from_slice(seed);
    out
}

fn private_key(pkcs8: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()))
}

fn self_signed(pkcs8: &[u8]) -> Result<CertificateDer<'static>, TransportError> {
    let der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(tls_err)?;
    let params = rcgen::CertificateParams::new(vec!["hypha".to_owned()]).map_err(tls_err)?;
    let cert = params.self_signed(&key).map_err(tls_err)?;
    Ok(cert.der().clone())
}

/// The Ed25519 key in a certificate's subjectPublicKeyInfo, found by
/// walking the DER structure (the same field the TLS signature is checked
/// against), never by searching for bytes.
pub fn ed25519_key_of(cert: &[u8]) -> Option<[u8; 32]> {
    const SPKI_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let (_, cert_body, _) = der_tlv(cert, 0x30)?;
    let (_, mut tbs, _) = der_tlv(cert_body, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_tlv(tbs, 0xa0)?.2; // version
    }
    for tag in [0x02, 0x30, 0x30, 0x30, 0x30] {
        // serial, signature algorithm, issuer, validity, subject
        tbs = der_tlv(tbs, tag)?.2;
    }
    let (whole, _, _) = der_tlv(tbs, 0x30)?;
    let key = whole.strip_prefix(SPKI_PREFIX.as_slice())?;
    key.try_into().ok()
}

/// One DER element with the given tag: (whole element, contents, rest).
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        (
            len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    let (contents, after) = rest.split_at(len);
    Some((&input[..header + len], contents, after))
}

/// Checks a peer's certificate: it must carry an Ed25519 key, the handshake
/// must be signed by that key, and (when dialing) its id must be the one
/// expected.
#[derive(Debug)]
struct PeerVerifier {
    expected: Option<NodeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn new(expected: Option<NodeId>) -> Self {
        Self {
            expected,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let key = ed25519_key_of(cert).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        match self.expected {
            Some(want) if node_id_of(&key) != want => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(()),
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
