//! The attacks of issue 13 on the control plane, repeated against real
//! programs running with mutual TLS (certificates from `crossfade certs`):
//! every call without the right role is refused and changes nothing, and
//! the coordinator and an operator still do their work.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crossfade_e2e::{TempDir, binary, free_port, wait_for};
use crossfade_proto::tls::{Control, Role};
use crossfade_proto::v1::{
    self, agent_client::AgentClient, coordinator_client::CoordinatorClient,
    router_control_client::RouterControlClient,
};
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// Runs `crossfade ARGS`; fails the test when it fails.
fn crossfade(args: &[&str]) -> String {
    let output = Command::new(binary("crossfade").unwrap())
        .args(args)
        .env_remove("CROSSFADE_COORDINATOR")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "crossfade {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The fleet's certificates, made as a user makes them.
struct Certs(PathBuf);

impl Certs {
    fn new(dir: &Path) -> Self {
        let dir = dir.join("certs");
        crossfade(&["certs", "init", "--dir", dir.to_str().unwrap()]);
        Self(dir)
    }

    fn issue(&self, role: Role, name: &str) -> [PathBuf; 3] {
        crossfade(&[
            "certs",
            "issue",
            "--dir",
            self.0.to_str().unwrap(),
            "--role",
            role.name(),
            "--name",
            name,
            "--san",
            "127.0.0.1",
        ]);
        [
            self.0.join("ca.pem"),
            self.0.join(format!("{name}.pem")),
            self.0.join(format!("{name}.key")),
        ]
    }

    /// `[control_tls]` for a program of `role`.
    fn env(&self, role: Role, name: &str) -> Vec<(String, String)> {
        let files = self.issue(role, name);
        ["CA", "CERT", "KEY"]
            .iter()
            .zip(files)
            .map(|(key, path)| {
                (
                    format!("CROSSFADE_CONTROL_TLS__{key}"),
                    path.display().to_string(),
                )
            })
            .chain([("CROSSFADE_CONTROL_TLS__INSECURE".into(), "false".into())])
            .collect()
    }

    /// A caller's side, as `role`.
    fn control(&self, role: Role, name: &str) -> Control {
        let [ca, cert, key] = self.issue(role, name);
        Control::mutual(role, &ca, &cert, &key).unwrap()
    }
}

async fn dial(control: &Control, address: SocketAddr, peer: Role) -> Channel {
    let endpoint = Control::endpoint(&address.to_string())
        .unwrap()
        .timeout(Duration::from_secs(10));
    control.connect(&endpoint, peer).await.unwrap()
}

/// A call without a client certificate: plain text to a TLS port.
async fn plain(address: SocketAddr) -> Channel {
    Control::endpoint(&address.to_string())
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
}

/// A plain-text call dies in the handshake: never an answer.
fn failed_handshake<T: std::fmt::Debug>(result: Result<T, tonic::Status>) {
    let status = result.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::Unknown | Code::Unavailable | Code::Internal | Code::Cancelled
        ),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_role_no_control_call_goes_through() {
    let dir = TempDir::new().unwrap();
    let certs = Certs::new(dir.path());

    // An agent, a router and a coordinator, each with its own certificate.
    let host = Host::new();
    let agent_env = certs.env(Role::Agent, "gpu-1");
    let env: Vec<(&str, &str)> = agent_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let agent = host.start(&env, "");
    let _reaper = EngineReaper(host.state_dir());
    let [ca, cert, key] = certs.issue(Role::Router, "router");
    let router_control = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let router_config = dir.path().join("router.toml");
    std::fs::write(
        &router_config,
        format!(
            "[listen]\npublic = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\ncontrol = \"{router_control}\"\n[control_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            free_port().unwrap(),
            free_port().unwrap(),
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let _router = spawn_router(&router_config, router_control);
    let [ca, cert, key] = certs.issue(Role::Coordinator, "coordinator");
    let api = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let coordinator_config = dir.path().join("coordinator.toml");
    std::fs::write(
        &coordinator_config,
        format!(
            "agents = [\"{}\"]\nrouters = [\"{router_control}\"]\n[listen]\napi = \"{api}\"\nadmin = \"127.0.0.1:{}\"\n[store]\npath = \"{}\"\n[control_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            agent.control,
            free_port().unwrap(),
            dir.path().join("state.json").display(),
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("crossfade-coordinator").unwrap());
    command
        .arg("--config")
        .arg(&coordinator_config)
        .env("RUST_LOG", "warn");
    let _coordinator = crossfade_e2e::Process::spawn("crossfade-coordinator", command).unwrap();
    crossfade_e2e::wait_for_port(api, Duration::from_secs(20)).unwrap();

    let operator = certs.control(Role::Operator, "operator");
    let router_cert = certs.control(Role::Router, "rogue-router");
    let agent_cert = certs.control(Role::Agent, "rogue-agent");

    // The agent: Apply (an engine with LD_PRELOAD, the epoch fence at its
    // maximum) from no certificate, an operator or a router is refused.
    let mut spec = spec("dep-evil", "org/evil", "");
    spec.template.as_mut().unwrap().env.push(v1::EnvVar {
        name: "LD_PRELOAD".into(),
        source: Some(v1::env_var::Source::Value("/tmp/evil.so".into())),
        ..Default::default()
    });
    let apply = v1::ApplyRequest {
        spec: Some(spec),
        coordinator_epoch: u64::MAX,
        ..Default::default()
    };
    failed_handshake(
        AgentClient::new(plain(agent.control).await)
            .apply(apply.clone())
            .await,
    );
    for control in [&operator, &router_cert] {
        let mut client = AgentClient::new(dial(control, agent.control, Role::Agent).await);
        refused(client.apply(apply.clone()).await, Code::PermissionDenied);
        refused(
            client
                .drain(v1::DrainRequest {
                    coordinator_epoch: u64::MAX,
                    ..Default::default()
                })
                .await,
            Code::PermissionDenied,
        );
    }
    // Nothing changed: an operator may read that much.
    let mut reader = AgentClient::new(dial(&operator, agent.control, Role::Agent).await);
    let status = reader
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .engine
            .as_ref()
            .is_none_or(|e| e.deployment_id.is_empty()),
        "{status:?}"
    );
    assert!(status.coordinator_epoch < u64::MAX, "{status:?}");

    // The router: a table from anyone but the coordinator is refused.
    let hijack = v1::ApplyTableRequest {
        table: Some(v1::RoutingTable {
            version: u64::MAX,
            ..Default::default()
        }),
        coordinator_epoch: u64::MAX,
    };
    failed_handshake(
        RouterControlClient::new(plain(router_control).await)
            .apply_table(hijack.clone())
            .await,
    );
    for control in [&operator, &agent_cert] {
        let mut client =
            RouterControlClient::new(dial(control, router_control, Role::Router).await);
        refused(
            client.apply_table(hijack.clone()).await,
            Code::PermissionDenied,
        );
    }
    let table = RouterControlClient::new(dial(&operator, router_control, Role::Router).await)
        .get_table(v1::GetTableRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        table.table.as_ref().is_none_or(|t| t.version < u64::MAX),
        "{table:?}"
    );

    // The coordinator: changes only from an operator.
    failed_handshake(
        CoordinatorClient::new(plain(api).await)
            .list_workers(v1::ListWorkersRequest::default())
            .await,
    );
    for control in [&router_cert, &agent_cert] {
        let mut client = CoordinatorClient::new(dial(control, api, Role::Coordinator).await);
        refused(
            client
                .remove_router(v1::RemoveRouterRequest {
                    control_address: router_control.to_string(),
                })
                .await,
            Code::PermissionDenied,
        );
        refused(
            client
                .add_worker(v1::AddWorkerRequest {
                    control_address: "127.0.0.1:9".into(),
                })
                .await,
            Code::PermissionDenied,
        );
    }

    // Demand hints: a router's alone; anyone else is refused.
    let demand = v1::ReportDemandRequest {
        endpoint: "chat".into(),
        router_id: "router".into(),
    };
    for control in [&operator, &agent_cert] {
        let mut client = CoordinatorClient::new(dial(control, api, Role::Coordinator).await);
        refused(
            client.report_demand(demand.clone()).await,
            Code::PermissionDenied,
        );
    }
    let mut as_router = CoordinatorClient::new(dial(&router_cert, api, Role::Coordinator).await);
    refused(as_router.report_demand(demand).await, Code::NotFound);

    // The coordinator reaches the agent over mutual TLS, and an operator
    // reads it, with the CLI too.
    let mut client = CoordinatorClient::new(dial(&operator, api, Role::Coordinator).await);
    let workers = wait_for("the agent to report", Duration::from_secs(30), || {
        let workers = futures_block(client.list_workers(v1::ListWorkersRequest::default()));
        Ok(workers
            .workers
            .iter()
            .all(|w| w.reachable && w.status.is_some())
            .then_some(workers))
    })
    .unwrap();
    assert_eq!(workers.workers.len(), 1, "{workers:?}");
    let routers = futures_block(client.list_routers(v1::ListRoutersRequest {}));
    assert_eq!(routers.routers.len(), 1, "{routers:?}");
    let [ca, cert, key] = certs.issue(Role::Operator, "cli");
    let listed = crossfade(&[
        "--coordinator",
        &format!("https://{api}"),
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "-o",
        "json",
        "workers",
    ]);
    assert!(listed.contains(&agent.control.to_string()), "{listed}");
}

/// Runs a call on the test's runtime from inside a blocking poll.
fn futures_block<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(call))
        .unwrap()
        .into_inner()
}

/// With the official `openai` client over TLS, HTTP/1.1 then HTTP/2: a
/// valid key is served; a wrong or revoked one gets 401. Prints one line
/// per call.
const OPENAI_WITH_KEYS: &str = r#"
import ssl, sys
import httpx, openai
base, ca, good, revoked = sys.argv[1:5]
context = ssl.create_default_context(cafile=ca)
for http2 in (False, True):
    http = httpx.Client(http2=http2, verify=context)
    client = openai.OpenAI(base_url=base, api_key=good, http_client=http, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    print(raw.http_response.http_version, raw.parse().model, flush=True)
for key in (good[:-1] + ("0" if good[-1] != "0" else "1"), revoked):
    client = openai.OpenAI(base_url=base, api_key=key, http_client=httpx.Client(verify=context), max_retries=0)
    try:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        print("served", flush=True)
    except openai.AuthenticationError as e:
        print(e.status_code, e.code, flush=True)
"#;

/// `vllm:request_success_total` of the fake engine at `addr`, summed.
fn served(addr: SocketAddr) -> f64 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read as _, Write as _};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_public_port_serves_the_openai_client_over_tls_only_with_a_valid_key() {
    let Some(python) = crossfade_e2e::python_for_test() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let certs = Certs::new(dir.path());
    let [ca, cert, key] = certs.issue(Role::Router, "public");
    let keys = dir.path().join("api-keys.toml");
    let keys_arg = keys.to_str().unwrap();
    let good = crossfade(&["keys", "add", "--file", keys_arg, "--name", "sdk"]);
    let revoked = crossfade(&["keys", "add", "--file", keys_arg, "--name", "old"]);
    crossfade(&["keys", "revoke", "--file", keys_arg, "old"]);
    let (_engine, engine) = crossfade_e2e::start_fake_vllm("org/model", &["chat"], &[]).unwrap();

    let public = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\npublic = \"{public}\"\nadmin = \"127.0.0.1:{}\"\ncontrol = \"127.0.0.1:{}\"\n\
             [control_tls]\ninsecure = true\n[public_tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\napi_keys = \"{}\"\n\
             [[endpoint]]\nname = \"chat\"\n[[endpoint.deployment]]\nid = \"v1\"\nweight = 1\nworkers = [\"{engine}\"]\n",
            free_port().unwrap(),
            free_port().unwrap(),
            cert.display(),
            key.display(),
            keys.display(),
        ),
    )
    .unwrap();
    let router = spawn_router(&config, public);

    let base = format!("https://{public}/v1");
    let lines = crossfade_e2e::run_python(
        &python,
        OPENAI_WITH_KEYS,
        &[
            base.as_ref(),
            ca.as_os_str(),
            good.trim().as_ref(),
            revoked.trim().as_ref(),
        ],
    )
    .unwrap();
    assert_eq!(
        lines,
        [
            "HTTP/1.1 chat",
            "HTTP/2 chat",
            "401 invalid_api_key",
            "401 invalid_api_key"
        ],
    );
    // Only the two valid calls reached the engine.
    assert_eq!(served(engine), 2.0);

    // A renewed certificate, read on SIGHUP: new connections get it, an
    // open HTTP/2 connection goes on.
    let mut client = std::process::Command::new(&python)
        .args(["-c", TLS_RELOAD, &public.to_string()])
        .arg(&ca)
        .arg(good.trim())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(client.stdout.take().unwrap()));
    let before = lines.next().unwrap().unwrap();
    let [renewed_cert, renewed_key] = {
        let [_, cert, key] = certs.issue(Role::Router, "public-renewed");
        [cert, key]
    };
    std::fs::copy(renewed_cert, &cert).unwrap();
    std::fs::copy(renewed_key, &key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &router.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(500));
    use std::io::Write as _;
    writeln!(client.stdin.as_mut().unwrap()).unwrap();
    let after = lines.next().unwrap().unwrap();
    assert!(client.wait().unwrap().success());
    // "CERTIFICATE STATUS LOCAL-PORT"
    let fields = |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let (before, after) = (fields(&before), fields(&after));
    assert_ne!(before[0], after[0], "the certificate was not renewed");
    assert_eq!((before[1].as_str(), after[1].as_str()), ("200", "200"));
    assert_eq!(before[2], after[2], "the open connection was dropped");
}

/// Prints the certificate a new connection gets, the status of a call on
/// one HTTP/2 connection, and that connection's local port; then waits for
/// a line on stdin and does it again.
const TLS_RELOAD: &str = r#"
import hashlib, socket, ssl, sys
import httpx
address, ca, key = sys.argv[1:4]
host, port = address.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
def certificate():
    with socket.create_connection((host, int(port))) as tcp:
        with context.wrap_socket(tcp, server_hostname=host) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()[:16]
client = httpx.Client(http2=True, verify=context, headers={"authorization": "Bearer " + key})
def call():
    r = client.post(f"https://{address}/v1/chat/completions",
                    json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return f"{r.status_code} {r.extensions['network_stream'].get_extra_info('client_addr')[1]}"
print(certificate(), call(), flush=True)
sys.stdin.readline()
print(certificate(), call(), flush=True)
"#;
