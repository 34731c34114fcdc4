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
