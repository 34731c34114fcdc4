//! Mutual TLS with roles, in one process: a RouterControl server behind
//! [`crossfade_proto::server::serve`] and clients with every kind of
//! certificate, from the fleet's CA, from another CA, or none.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use crossfade_proto::tls::{Control, Role};
use crossfade_proto::v1;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use crossfade_proto::v1::router_control_server::{RouterControl, RouterControlServer};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

/// A RouterControl that answers every call: only the role check stands
/// between a caller and a success.
struct FakeRouterControl;

#[tonic::async_trait]
impl RouterControl for FakeRouterControl {
    async fn apply_table(
        &self,
        _: Request<v1::ApplyTableRequest>,
    ) -> Result<Response<v1::ApplyTableResponse>, Status> {
        Ok(Response::new(v1::ApplyTableResponse::default()))
    }

    async fn get_table(
        &self,
        _: Request<v1::GetTableRequest>,
    ) -> Result<Response<v1::GetTableResponse>, Status> {
        Ok(Response::new(v1::GetTableResponse::default()))
    }

    async fn get_stats(
        &self,
        _: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        Ok(Response::new(v1::GetStatsResponse::default()))
    }
}

fn policy(path: &str) -> &'static [Role] {
    match path {
        "/crossfade.v1.RouterControl/ApplyTable" => &[Role::Coordinator],
        _ => &[Role::Coordinator, Role::Operator],
    }
}

/// A CA in a directory, issuing certificates for 127.0.0.1.
struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `name`'s certificate and key, naming `roles`.
    fn issue(&self, name: &str, roles: &[Role]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = roles
            .iter()
            .map(|r| SanType::URI(r.uri().try_into().unwrap()))
            .chain([SanType::IpAddress([127, 0, 0, 1].into())])
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// `name`'s side of mutual TLS as a `role`, trusting `trusted`.
    fn control(&self, name: &str, role: Role, trusted: &Ca) -> Control {
        let (cert, key) = self.issue(name, &[role]);
        Control::mutual(role, &trusted.ca(), &cert, &key).unwrap()
    }
}

/// Serves the fake behind the router's role on 127.0.0.1; its address.
async fn serve(server: Control) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        crossfade_proto::server::serve(
            listener,
            RouterControlServer::new(FakeRouterControl),
            &server,
            policy,
            std::future::pending(),
        )
        .await
    });
    address
}

async fn dial(control: &Control, address: &str, peer: Role) -> Result<Channel, String> {
    let endpoint = Control::endpoint(address)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    control
        .connect(&endpoint, peer)
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn apply(channel: Channel) -> Result<(), Status> {
    RouterControlClient::new(channel)
        .apply_table(v1::ApplyTableRequest::default())
        .await
        .map(drop)
}

async fn read(channel: Channel) -> Result<(), Status> {
    RouterControlClient::new(channel)
        .get_table(v1::GetTableRequest {})
        .await
        .map(drop)
}

/// A call that died in a refused handshake: a transport error, never an
/// answer.
fn failed_handshake(result: Result<(), Status>) {
    let status = result.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn each_call_is_open_only_to_the_roles_of_its_policy() {
    let dir = std::env::temp_dir().join(format!("crossfade-mtls-{}", std::process::id()));
    let fleet = Ca::new(&dir.join("fleet"));
    let other = Ca::new(&dir.join("other"));
    let address = serve(fleet.control("router", Role::Router, &fleet)).await;

    // The coordinator may change the table; an operator may only read it.
    let coordinator = fleet.control("coordinator", Role::Coordinator, &fleet);
    let channel = dial(&coordinator, &address, Role::Router).await.unwrap();
    apply(channel.clone()).await.unwrap();
    read(channel).await.unwrap();
    let operator = fleet.control("operator", Role::Operator, &fleet);
    let channel = dial(&operator, &address, Role::Router).await.unwrap();
    read(channel.clone()).await.unwrap();
    let refused = apply(channel).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        "/crossfade.v1.RouterControl/ApplyTable is open to coordinator; this certificate names operator"
    );

    // An agent's certificate is from the CA, but no role of this service.
    let agent = fleet.control("agent", Role::Agent, &fleet);
    let channel = dial(&agent, &address, Role::Router).await.unwrap();
    assert_eq!(
        read(channel).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A certificate without a role is refused too.
    let (cert, key) = fleet.issue("nobody", &[]);
    let error = Control::mutual(Role::Operator, &fleet.ca(), &cert, &key).unwrap_err();
    assert!(error.0.contains("names no role `operator`"), "{error}");

    // A coordinator's certificate from another CA never gets a call through.
    let stranger = other.control("stranger", Role::Coordinator, &fleet);
    if let Ok(channel) = dial(&stranger, &address, Role::Router).await {
        // The handshake fails at the first read: a transport error.
        failed_handshake(apply(channel).await);
    }

    // TLS without a client certificate, and plain text, are refused.
    let anonymous = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(fleet.ca()).unwrap()))
                .domain_name("127.0.0.1"),
        )
        .unwrap();
    if let Ok(channel) = anonymous.connect().await {
        failed_handshake(apply(channel).await);
    }
    let plain = Endpoint::from_shared(format!("http://{address}")).unwrap();
    if let Ok(channel) = plain.connect().await {
        failed_handshake(read(channel).await);
    }

    // And the client checks the server: a router is not an agent.
    let error = dial(&coordinator, &address, Role::Agent).await.unwrap_err();
    assert!(
        error.contains("is not the agent it was dialled as: its certificate names router"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One HTTP/1.1 GET over TLS to `address` with `identity` (a certificate
/// and its key, or none), trusting `ca`: the status line, or why there is
/// none.
async fn https_get(
    address: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(&key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let exchange = async {
        let mut tls = connector
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer
            .lines()
            .next()
            .filter(|l| l.starts_with("HTTP/"))
            .map(str::to_owned)
            .ok_or_else(|| format!("no answer: {answer:?}"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The coordinator's REST listener beyond loopback: HTTPS that admits only
/// a certificate from the fleet CA naming an allowed role.
#[tokio::test]
async fn an_https_listener_admits_only_the_roles_it_names() {
    let dir = std::env::temp_dir().join(format!("crossfade-https-{}", std::process::id()));
    let fleet = Ca::new(&dir.join("fleet"));
    let other = Ca::new(&dir.join("other"));
    let (cert, key) = fleet.issue("coordinator", &[Role::Coordinator]);
    let tls = crossfade_proto::tls::ControlTls {
        ca: Some(fleet.ca()),
        cert: Some(cert),
        key: Some(key),
        ..Default::default()
    };
    let config = tls.https_server(&[Role::Operator]).unwrap().unwrap();
    let insecure = crossfade_proto::tls::ControlTls {
        insecure: true,
        ..Default::default()
    };
    assert!(insecure.https_server(&[Role::Operator]).unwrap().is_none());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = crossfade_common::Shutdown::new();
    let options = crossfade_common::http::ServeOptions {
        tls: Some(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(config))),
        ..Default::default()
    };
    // The server runs beside the clients, not spawned: it ends with them.
    let server =
        crossfade_common::http::serve(listener, &options, shutdown.clone(), |_request| async {
            crossfade_common::http::text(http::StatusCode::OK, "ok\n")
        });
    let clients = async {
        let operator = fleet.issue("operator", &[Role::Operator]);
        let answer = https_get(address, &fleet.ca(), Some(operator)).await;
        assert_eq!(answer.as_deref(), Ok("HTTP/1.1 200 OK"), "{answer:?}");
        // From the fleet CA, but not an operator.
        let router = fleet.issue("router", &[Role::Router]);
        assert!(https_get(address, &fleet.ca(), Some(router)).await.is_err());
        // No certificate at all.
        assert!(https_get(address, &fleet.ca(), None).await.is_err());
        // An operator of another CA.
        let stranger = other.issue("stranger", &[Role::Operator]);
        assert!(
            https_get(address, &fleet.ca(), Some(stranger))
                .await
                .is_err()
        );
        shutdown.trigger();
    };
    tokio::join!(server, clients);
    std::fs::remove_dir_all(&dir).unwrap();
}
