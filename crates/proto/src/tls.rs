//! Mutual TLS on the control plane, with roles.
//!
//! One private CA signs every member of a fleet (`crossfade certs`); each
//! certificate names its role as the URI SAN `crossfade://role/ROLE`. A
//! server accepts only clients with a certificate from that CA, then each
//! call only from the roles its service's [`Policy`] lists; a client
//! accepts only a server whose certificate names the role it meant to call,
//! so a router's certificate cannot pose as an agent.
//!
//! Plain text is a choice, never a default: `insecure = true`, and beyond
//! the loopback interface also `insecure_remote = true`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crossfade_common::FieldError;
use futures_util::future::{Either, Ready, ready};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig};

/// What every role URI starts with.
pub const ROLE_URI_PREFIX: &str = "crossfade://role/";

/// How long a TLS handshake may take, on either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a [`Control::dial`]led channel takes to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a [`Control::dial`]led channel pings, and how long the answer
/// may take.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// A member's role, named in its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Calls agents and routers; serves the Coordinator API.
    Coordinator,
    /// Serves RouterControl; sends demand hints to the coordinator.
    Router,
    /// Serves the Agent API.
    Agent,
    /// A person or CI/CD calling the Coordinator API.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 4] = [Self::Coordinator, Self::Router, Self::Agent, Self::Operator];

    /// Its name, as certificates and commands spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Coordinator => "coordinator",
            Self::Router => "router",
            Self::Agent => "agent",
            Self::Operator => "operator",
        }
    }

    /// The URI SAN that names it.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|role| role.name() == s)
            .ok_or_else(|| "one of coordinator, router, agent, operator".to_owned())
    }
}

/// The roles a certificate (DER) names; none when it names none or does
/// not parse.
pub fn roles_of(certificate: &[u8]) -> Vec<Role> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Ok((_, certificate)) = X509Certificate::from_der(certificate) else {
        return Vec::new();
    };
    let Ok(Some(names)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI_PREFIX)?.parse().ok(),
            _ => None,
        })
        .collect()
}

/// `[control_tls]`, the same in every program's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlTls {
    /// The fleet CA's certificate (PEM): a peer must show a certificate it
    /// signed.
    pub ca: Option<PathBuf>,
    /// This program's certificate (PEM), naming its role.
    pub cert: Option<PathBuf>,
    /// This program's key (PEM); keep it 0600.
    pub key: Option<PathBuf>,
    /// Plain-text control calls, with no certificate and no role check.
    pub insecure: bool,
    /// Allows `insecure` on an address other than loopback.
    pub insecure_remote: bool,
}

impl ControlTls {
    /// Every problem, each naming its key under `section`. `listeners` are
    /// the control listeners (key, address): plain text on one that is not
    /// loopback needs `insecure_remote`.
    pub fn validate(&self, section: &str, listeners: &[(&str, SocketAddr)]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let files = [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)];
        if self.insecure {
            if files.iter().any(|(_, path)| path.is_some()) {
                errors.push(FieldError::new(
                    format!("{section}.insecure"),
                    "plain text and certificates exclude each other: remove ca, cert and key, or insecure",
                ));
            }
            for (key, address) in listeners {
                if !address.ip().is_loopback() && !self.insecure_remote {
                    errors.push(FieldError::new(
                        *key,
                        format!(
                            "`{address}` is not a loopback address: plain-text control calls there are open to the network; \
                             set {section}.ca, cert and key (see `crossfade certs`), or {section}.insecure_remote = true"
                        ),
                    ));
                }
            }
        } else {
            if self.insecure_remote {
                errors.push(FieldError::new(
                    format!("{section}.insecure_remote"),
                    "has no effect without insecure = true",
                ));
            }
            for (key, path) in files {
                if path.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                    errors.push(FieldError::new(
                        format!("{section}.{key}"),
                        "must name a PEM file (made by `crossfade certs`), or set insecure = true for plain text",
                    ));
                }
            }
        }
        errors
    }

    /// See [`Control::check_peer`].
    pub fn check_peer(&self, address: &str) -> Result<(), String> {
        check_plain_peer(address, !self.insecure || self.insecure_remote)
    }

    /// Checks a configured list of peers, `key`: each `host:port`, and
    /// allowed by [`ControlTls::check_peer`].
    pub fn check_peers(&self, key: &str, addresses: &[String]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            if !crossfade_common::net::is_host_port(address) {
                errors.push(FieldError::new(
                    format!("{key}[{i}]"),
                    format!("`{address}` must be host:port"),
                ));
            } else if let Err(refused) = self.check_peer(address) {
                errors.push(FieldError::new(format!("{key}[{i}]"), refused));
            }
        }
        errors
    }

    /// Reads the certificates for a program of `role`: its own certificate
    /// must name that role.
    pub fn load(&self, role: Role) -> Result<Control, TlsError> {
        if self.insecure {
            tracing::warn!(
                "control_tls.insecure: control calls go in plain text, with no certificate and no role check"
            );
            return Ok(Control::Insecure {
                remote: self.insecure_remote,
            });
        }
        let (ca, cert, key) = self.files()?;
        Control::mutual(role, &ca, &cert, &key)
    }

    /// The CA, certificate and key files, each of which must be set.
    fn files(&self) -> Result<(PathBuf, PathBuf, PathBuf), TlsError> {
        let path = |p: &Option<PathBuf>, key: &str| {
            p.clone()
                .ok_or_else(|| TlsError(format!("control_tls.{key} is not set")))
        };
        Ok((
            path(&self.ca, "ca")?,
            path(&self.cert, "cert")?,
            path(&self.key, "key")?,
        ))
    }
}

impl ControlTls {
    /// An HTTPS listener secured as the control calls are: this program's
    /// certificate, and a client certificate from the fleet CA that names
    /// one of `allowed` (checked in the handshake: a caller without one is
    /// refused before it sends a byte of HTTP). `None` with `insecure`.
    pub fn https_server(
        &self,
        allowed: &'static [Role],
    ) -> Result<Option<rustls::ServerConfig>, TlsError> {
        if self.insecure {
            return Ok(None);
        }
        let (ca, cert, key) = self.files()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = root_store(certificates(&read_pem(&ca)?, &ca)?, &ca)?;
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
        let chain = certificates(&read_pem(&cert)?, &cert)?;
        let private = private_key(&read_pem(&key)?, &key)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(Arc::new(RoleVerifier { inner, allowed }))
            .with_single_cert(chain, private)
            .map_err(|e| TlsError(format!("{} and {}: {e}", cert.display(), key.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(config))
    }
}

/// The bytes of a PEM file; the error names it.
fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("reading {}: {e}", path.display())))
}

/// The certificates in `pem` (read from `path`): at least one.
fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: not a PEM certificate: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in `pem` (read from `path`).
fn private_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| TlsError(format!("{}: not a PEM private key", path.display())))
}

/// The CA certificates (from `path`) as trust roots.
fn root_store(
    authorities: Vec<CertificateDer<'static>>,
    path: &Path,
) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for authority in authorities {
        roots
            .add(authority)
            .map_err(|e| TlsError(format!("{}: not a CA certificate: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The fleet CA's verification of a client certificate, and then the
/// role check: the certificate must name one of `allowed`.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    allowed: &'static [Role],
}

impl rustls::server::danger::ClientCertVerifier for RoleVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if roles_of(end_entity)
            .iter()
            .any(|r| self.allowed.contains(r))
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A certificate or key that cannot be used; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// How a program's control calls are secured, loaded and ready.
#[derive(Clone)]
pub enum Control {
    /// Plain text, no role checks; beyond loopback only when `remote`.
    Insecure {
        /// Whether peers beyond the loopback interface may be dialled.
        remote: bool,
    },
    /// Mutual TLS.
    Mutual(Arc<Mutual>),
}

/// A program's mutual-TLS material.
pub struct Mutual {
    server: ServerTlsConfig,
    client: TlsConnector,
}

impl fmt::Debug for Control {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Insecure { .. } => "Control::Insecure",
            Self::Mutual(_) => "Control::Mutual",
        })
    }
}

impl Control {
    /// Mutual TLS for a program of `role` from the fleet CA `ca` and its own
    /// certificate and key (PEM files).
    pub fn mutual(role: Role, ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        // One provider for the whole process (tonic's server side uses the
        // default): ring, the one this workspace builds.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_pem, cert_pem, key_pem) = (read_pem(ca)?, read_pem(cert)?, read_pem(key)?);
        let authorities = certificates(&ca_pem, ca)?;
        let chain = certificates(&cert_pem, cert)?;
        let private = private_key(&key_pem, key)?;
        let named = roles_of(&chain[0]);
        if !named.contains(&role) {
            return Err(TlsError(format!(
                "{}: names no role `{role}` (its roles: {}); issue one with `crossfade certs issue --role {role}`",
                cert.display(),
                list(&named)
            )));
        }

        let roots = root_store(authorities, ca)?;
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| {
            TlsError(format!(
                "{} and {} do not make a usable identity: {e}",
                cert.display(),
                key.display()
            ))
        })?;
        client.alpn_protocols = vec![b"h2".to_vec()];

        let server = ServerTlsConfig::new()
            .identity(Identity::from_pem(&cert_pem, &key_pem))
            .client_ca_root(Certificate::from_pem(&ca_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(Self::Mutual(Arc::new(Mutual {
            server,
            client: TlsConnector::from(Arc::new(client)),
        })))
    }

    /// Whether calls go in plain text.
    pub fn is_insecure(&self) -> bool {
        matches!(self, Self::Insecure { .. })
    }

    /// Refuses to dial `address` (`host:port`) in plain text beyond the
    /// loopback interface unless `insecure_remote` allows it: what goes
    /// there (a template's secrets) would cross the network in clear.
    pub fn check_peer(&self, address: &str) -> Result<(), String> {
        check_plain_peer(address, !matches!(self, Self::Insecure { remote: false }))
    }

    /// What the server side of a listener needs; `None` in plain text.
    pub(crate) fn server(&self) -> Option<ServerTlsConfig> {
        match self {
            Self::Insecure { .. } => None,
            Self::Mutual(mutual) => Some(mutual.server.clone()),
        }
    }

    /// The endpoint for `address` (`host:port`, or a URL whose scheme is
    /// ignored: TLS is this program's choice, not the address's), to be
    /// given its options and then dialled with [`Control::lazy`] or
    /// [`Control::connect`].
    pub fn endpoint(address: &str) -> Result<Endpoint, TlsError> {
        let bare = address
            .strip_prefix("http://")
            .or_else(|| address.strip_prefix("https://"))
            .unwrap_or(address);
        let bare = bare.strip_suffix('/').unwrap_or(bare);
        Endpoint::from_shared(format!("http://{bare}"))
            .map_err(|_| TlsError(format!("`{address}` is not host:port")))
    }

    /// A channel to the `peer` at `address` (checked when it was
    /// configured or added), dialled on first use, with a connect timeout
    /// and keep-alive pings: a peer that stops answering (a host that
    /// hangs) is noticed in seconds, not at the next write.
    pub fn dial(&self, address: &str, peer: Role) -> Channel {
        // The fallback, an address nothing listens on, is a bug guard.
        let endpoint = Self::endpoint(address)
            .unwrap_or_else(|_| Endpoint::from_static("http://127.0.0.1:1"))
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        self.lazy(&endpoint, peer)
    }

    /// A channel over `endpoint`, dialled on first use, to a server that
    /// must name `peer`.
    pub fn lazy(&self, endpoint: &Endpoint, peer: Role) -> Channel {
        match self {
            Self::Insecure { .. } => endpoint.connect_lazy(),
            Self::Mutual(mutual) => endpoint.connect_with_connector_lazy(Connector {
                tls: mutual.client.clone(),
                peer,
            }),
        }
    }

    /// A channel over `endpoint`, connected now, to a server that must
    /// name `peer`.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        peer: Role,
    ) -> Result<Channel, tonic::transport::Error> {
        match self {
            Self::Insecure { .. } => endpoint.connect().await,
            Self::Mutual(mutual) => {
                endpoint
                    .connect_with_connector(Connector {
                        tls: mutual.client.clone(),
                        peer,
                    })
                    .await
            }
        }
    }
}

/// Refuses `address` unless it is loopback or `allowed` (see
/// [`Control::check_peer`]).
fn check_plain_peer(address: &str, allowed: bool) -> Result<(), String> {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if allowed || loopback {
        return Ok(());
    }
    Err(format!(
        "`{address}` is not a loopback address: control calls in plain text would cross the network; \
         use certificates (control_tls.ca, cert and key) or control_tls.insecure_remote = true"
    ))
}

fn list(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "none".to_owned();
    }
    roles
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(", ")
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Dials TCP, then TLS, then checks that the server names `peer`.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    peer: Role,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, peer) = (self.tls.clone(), self.peer);
        Box::pin(async move {
            let host = uri.host().ok_or("the address has no host")?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or("the address has no port")?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| format!("`{host}` is neither a DNS name nor an IP address"))?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| format!("the TLS handshake with {host}:{port} timed out"))??;
            let named = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| roles_of(leaf))
                .unwrap_or_default();
            if !named.contains(&peer) {
                return Err(format!(
                    "{host}:{port} is not the {peer} it was dialled as: its certificate names {}",
                    list(&named)
                )
                .into());
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// Which roles may call a method, by the request's path
/// (`/package.Service/Method`). The standard health and reflection services
/// are open to every role.
pub type Policy = fn(&str) -> &'static [Role];

/// Checks each call's client certificate against a [`Policy`]; lets every
/// call through in plain text (`None`).
#[derive(Clone, Copy)]
pub(crate) struct AuthorizeLayer(pub(crate) Option<Policy>);

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            policy: self.0,
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    policy: Option<Policy>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.policy.map(|policy| authorize(&request, policy)) {
            Some(Err(status)) => Either::Left(ready(Ok(status.into_http()))),
            _ => Either::Right(self.inner.call(request)),
        }
    }
}

fn authorize<B>(request: &http::Request<B>, policy: Policy) -> Result<(), Status> {
    let path = request.uri().path();
    let allowed: &[Role] =
        if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
            &Role::ALL
        } else {
            policy(path)
        };
    let chain = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs);
    let Some(leaf) = chain.as_ref().and_then(|chain| chain.first()) else {
        return Err(Status::unauthenticated(
            "a client certificate from the fleet's CA is required",
        ));
    };
    let named = roles_of(leaf);
    if named.iter().any(|role| allowed.contains(role)) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{path} is open to {}; this certificate names {}",
        list(allowed),
        list(&named)
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plain_text_needs_its_flag_and_beyond_loopback_a_second_one() {
        let keys = |tls: &ControlTls, address: &str| -> Vec<String> {
            tls.validate("control_tls", &[("listen.control", addr(address))])
                .iter()
                .map(|e| e.key.clone())
                .collect()
        };
        let none = ControlTls::default();
        assert_eq!(
            keys(&none, "127.0.0.1:1"),
            ["control_tls.ca", "control_tls.cert", "control_tls.key"]
        );
        let insecure = ControlTls {
            insecure: true,
            ..ControlTls::default()
        };
        assert!(keys(&insecure, "127.0.0.1:1").is_empty());
        assert!(keys(&insecure, "[::1]:1").is_empty());
        assert_eq!(keys(&insecure, "0.0.0.0:1"), ["listen.control"]);
        let remote = ControlTls {
            insecure_remote: true,
            ..insecure.clone()
        };
        assert!(keys(&remote, "0.0.0.0:1").is_empty());
        let both = ControlTls {
            ca: Some("ca.pem".into()),
            ..insecure
        };
        assert_eq!(keys(&both, "127.0.0.1:1"), ["control_tls.insecure"]);
        let stray = ControlTls {
            insecure_remote: true,
            ..ControlTls::default()
        };
        assert!(keys(&stray, "127.0.0.1:1").contains(&"control_tls.insecure_remote".to_owned()));
    }

    #[test]
    fn plain_text_reaches_beyond_loopback_only_when_allowed() {
        let local = Control::Insecure { remote: false };
        for address in [
            "127.0.0.1:7002",
            "127.8.0.1:1",
            "[::1]:7002",
            "localhost:7002",
        ] {
            assert!(local.check_peer(address).is_ok(), "{address}");
        }
        for address in ["10.0.0.17:7002", "gpu-07:7002", "[fe80::1]:7002"] {
            let refused = local.check_peer(address).unwrap_err();
            assert!(refused.contains("insecure_remote"), "{refused}");
            assert!(
                Control::Insecure { remote: true }
                    .check_peer(address)
                    .is_ok()
            );
        }
    }

    #[test]
    fn roles_parse_from_their_names_only() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>(), Ok(role));
            assert_eq!(role.uri(), format!("crossfade://role/{role}"));
        }
        assert!("Operator".parse::<Role>().is_err());
        assert!(roles_of(b"not a certificate").is_empty());
    }

    #[test]
    fn an_endpoint_is_dialled_in_plain_http_whatever_the_scheme_given() {
        for given in [
            "127.0.0.1:7000",
            "http://127.0.0.1:7000",
            "https://127.0.0.1:7000/",
        ] {
            let endpoint = Control::endpoint(given).unwrap();
            assert_eq!(endpoint.uri().to_string(), "http://127.0.0.1:7000/");
        }
        assert!(Control::endpoint("a b").is_err());
    }
}
