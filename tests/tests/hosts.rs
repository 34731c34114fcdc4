//! Several hosts: the coordinator, two routers and four agents, each in its
//! own container on a private Docker network, promote an endpoint under
//! streaming load while the two hosts that serve its old deployment are
//! lost, one cut off the network, the other killed.
//!
//! What the design allows (DESIGN §4, "a worker not heard from within a
//! heartbeat bound is lost: it leaves every table and its replica is
//! replaced"): requests that were on a lost host, or were sent to it before
//! the routers dropped it, may fail, and only as a router says a worker
//! failed (a stream ended by an error event, a 502 or 504); once the routers
//! have dropped the lost hosts, nothing fails; no request served by a
//! healthy host fails; the promotion goes on with the healthy workers and
//! succeeds.
//!
//! The lost hosts are exactly the old deployment's, the healthy ones the
//! new deployment's and an idle one, so a request's deployment says which
//! kind of host served it; the routers' own counts, per worker, say the
//! same of the errors they answered themselves. The killed host is found
//! lost at once (its status stream ends); the one cut off only when the
//! coordinator's heartbeat bound (8 s) passes without a word from it, and
//! meanwhile the routers still send to it.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossfade_e2e::{TempDir, binary};
use crossfade_proto::v1::{
    self, coordinator_client::CoordinatorClient, router_control_client::RouterControlClient,
};
use http::StatusCode;
use support::engine_answers;
use support::hosts::{Container, Image, Network, Run};
use support::last_status;
use support::load::{Load, Outcome, Record, listing};
use tonic::transport::{Channel, Endpoint};

const AGENTS: usize = 4;
const ROUTERS: usize = 2;
const API_PORT: u16 = 7000;
const ROUTER_CONTROL_PORT: u16 = 7001;
const AGENT_CONTROL_PORT: u16 = 7002;
const PUBLIC_PORT: u16 = 8080;
const GATE_PORT: u16 = 8000;
/// The wait after each step. Longer than the coordinator's heartbeat bound
/// (8 s) and the test's reaction, so that the hosts lost during the first
/// wait are usually found lost before the next step would retire one of
/// them anyway (either is a lost host leaving the tables); short, because
/// the promotion waits it three times.
const STABILIZATION_SECONDS: u32 = 12;
/// Streaming clients, spread over the routers.
const CLIENTS: usize = 6;

/// The engine's knobs: quick to load; with [`MAX_TOKENS`], streams of about
/// a quarter second, so that some are in flight on the lost hosts when they
/// go.
const KNOBS: &[(&str, &str)] = &[
    ("FAKE_VLLM_LOAD_TIME", "300ms"),
    ("FAKE_VLLM_TOKENS_PER_SECOND", "50"),
];
const MAX_TOKENS: u32 = 12;
/// Every call to the coordinator or a router answers within this.
const CALL_BOUND: Duration = Duration::from_secs(10);

fn agent_alias(i: usize) -> String {
    format!("agent-{i}")
}

fn gate_of(i: usize) -> String {
    format!("agent-{i}:{GATE_PORT}")
}

fn control_of(i: usize) -> String {
    format!("agent-{i}:{AGENT_CONTROL_PORT}")
}

/// The configurations, baked into the image: the peers are named by their
/// network aliases, which are the same in every run. Listeners bind every
/// address of the container; control calls are plain text on the private
/// network (`insecure_remote`), as the configuration allows explicitly.
fn configurations() -> Vec<(String, String)> {
    let plain = "[control_tls]\ninsecure = true\ninsecure_remote = true\n";
    let mut files = Vec::new();
    for i in 0..AGENTS {
        files.push((
            format!("/etc/crossfade/agent-{i}.toml"),
            format!(
                r#"worker_id = "host-{i}"
advertise_gate = "{gate}"
{plain}
[listen]
gate = "0.0.0.0:{GATE_PORT}"
control = "0.0.0.0:{AGENT_CONTROL_PORT}"
admin = "127.0.0.1:9402"

[engine]
command = "/fake-vllm"
port = 8100
state_dir = "/tmp/crossfade-agent"
probe_interval = "100ms"
metrics_interval = "200ms"
stop_timeout = "5s"

[gpu]
probe = "fake"
poll_interval = "1s"
"#,
                gate = gate_of(i),
            ),
        ));
    }
    for j in 0..ROUTERS {
        // Short upstream bounds: a stream from a host that went silent, or
        // a request sent on a connection to it, ends in seconds.
        files.push((
            format!("/etc/crossfade/router-{j}.toml"),
            format!(
                r#"router_id = "router-{j}"
{plain}
[coordinator]
api = ["coordinator:{API_PORT}"]

[listen]
public = "0.0.0.0:{PUBLIC_PORT}"
control = "0.0.0.0:{ROUTER_CONTROL_PORT}"
admin = "127.0.0.1:9401"

[upstream]
connect_timeout = "1s"
response_header_timeout = "5s"
idle_chunk_timeout = "3s"
"#
            ),
        ));
    }
    let agents: Vec<String> = (0..AGENTS)
        .map(|i| format!("\"{}\"", control_of(i)))
        .collect();
    let routers: Vec<String> = (0..ROUTERS)
        .map(|j| format!("\"router-{j}:{ROUTER_CONTROL_PORT}\""))
        .collect();
    files.push((
        "/etc/crossfade/coordinator.toml".into(),
        format!(
            r#"agents = [{}]
routers = [{}]
router_ack_timeout = "10s"
{plain}
[listen]
api = "0.0.0.0:{API_PORT}"
admin = "127.0.0.1:9403"

[store]
path = "/tmp/coordinator-state.json"
"#,
            agents.join(", "),
            routers.join(", ")
        ),
    ));
    files
}

/// Dropped in this order: the containers, then the network they are on,
/// then the image they run.
struct Fleet {
    agents: Vec<Container>,
    routers: Vec<Container>,
    coordinator: Container,
    network: Network,
    _image: Image,
    _dir: TempDir,
    /// The routers' public listeners, published on 127.0.0.1.
    publics: Vec<SocketAddr>,
    /// The routers' control listeners, published on 127.0.0.1.
    controls: Vec<SocketAddr>,
    /// The coordinator's API, published on 127.0.0.1.
    api: SocketAddr,
}

impl Fleet {
    fn start() -> Self {
        let began = Instant::now();
        support::hosts::remove_leftovers();
        let dir = TempDir::new().unwrap();
        let binaries: Vec<_> = [
            "crossfade-agent",
            "crossfade-router",
            "crossfade-coordinator",
            "fake-vllm",
        ]
        .iter()
        .map(|name| binary(name).unwrap())
        .collect();
        let built = Instant::now();
        // One image per run: two runs at once do not share (and remove)
        // each other's.
        let prefix = crossfade_e2e::unique_name("crossfade-hosts");
        let image = Image::build(
            dir.path(),
            &format!(
                "crossfade-hosts:e2e-{}",
                prefix.trim_start_matches("crossfade-hosts-")
            ),
            &binaries,
            &configurations(),
            &[&format!("LABEL {}", support::hosts::LABEL)],
        );
        eprintln!(
            "binaries ready in {:?}, image built in {:?}",
            built - began,
            built.elapsed()
        );
        let network = Network::create(&prefix);
        let run = |alias: &str, publish: &[u16], env: &[(&str, &str)], command: &[&str]| {
            Container::run(
                &format!("{prefix}-{alias}"),
                &network,
                &image,
                &Run {
                    alias,
                    publish,
                    env,
                    command,
                },
            )
        };
        // The programs' log filter (`E2E_HOSTS_LOG`, else warnings): their
        // output is shown when the test fails.
        let filter = std::env::var("E2E_HOSTS_LOG").unwrap_or_else(|_| "warn".into());
        let log = [("RUST_LOG", filter.as_str())];
        let agent_env: Vec<(&str, &str)> = KNOBS.iter().copied().chain(log).collect();
        let coordinator = run(
            "coordinator",
            &[API_PORT],
            &log,
            &[
                "/crossfade-coordinator",
                "--config",
                "/etc/crossfade/coordinator.toml",
            ],
        );
        let routers: Vec<Container> = (0..ROUTERS)
            .map(|j| {
                run(
                    &format!("router-{j}"),
                    &[PUBLIC_PORT, ROUTER_CONTROL_PORT],
                    &log,
                    &[
                        "/crossfade-router",
                        "--config",
                        &format!("/etc/crossfade/router-{j}.toml"),
                    ],
                )
            })
            .collect();
        // The agent passes its environment (the fake engine's knobs) on to
        // the engine it starts.
        let agents: Vec<Container> = (0..AGENTS)
            .map(|i| {
                run(
                    &agent_alias(i),
                    &[],
                    &agent_env,
                    &[
                        "/crossfade-agent",
                        "--config",
                        &format!("/etc/crossfade/agent-{i}.toml"),
                    ],
                )
            })
            .collect();
        Self {
            publics: routers.iter().map(|r| r.published(PUBLIC_PORT)).collect(),
            controls: routers
                .iter()
                .map(|r| r.published(ROUTER_CONTROL_PORT))
                .collect(),
            api: coordinator.published(API_PORT),
            agents,
            routers,
            coordinator,
            network,
            _image: image,
            _dir: dir,
        }
    }

    async fn try_client(&self) -> Result<CoordinatorClient<Channel>, String> {
        Ok(CoordinatorClient::new(channel(self.api).await?))
    }

    async fn client(&self) -> CoordinatorClient<Channel> {
        self.try_client().await.unwrap()
    }

    async fn endpoint(&self) -> v1::Endpoint {
        self.client()
            .await
            .get_endpoint(v1::GetEndpointRequest {
                name: "chat".into(),
                event_limit: 200,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Each router's routes for `chat`, or why they could not be read.
    async fn tables(&self) -> Result<Vec<Routes>, String> {
        let mut tables = Vec::new();
        for control in &self.controls {
            let table = RouterControlClient::new(channel(*control).await?)
                .get_table(v1::GetTableRequest {})
                .await
                .map_err(|e| format!("router at {control}: {e}"))?
                .into_inner()
                .table
                .unwrap_or_default();
            let chat = table
                .endpoints
                .into_iter()
                .find(|e| e.name == "chat")
                .map(|e| {
                    e.deployments
                        .into_iter()
                        .map(|d| Route {
                            deployment: d.id,
                            weight: d.weight,
                            gates: d.workers.into_iter().map(|w| w.address).collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            tables.push(chat);
        }
        Ok(tables)
    }

    /// Waits until every router's routes for `chat` satisfy `check`.
    async fn wait_tables(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Routes) -> bool,
    ) -> Vec<Routes> {
        wait(what, timeout, async || {
            let tables = self.tables().await?;
            if tables.iter().all(&check) {
                Ok(tables)
            } else {
                Err(format!("{tables:#?}"))
            }
        })
        .await
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for container in std::iter::once(&self.coordinator)
                .chain(&self.routers)
                .chain(&self.agents)
            {
                eprintln!("--- {} ---\n{}", container.name, container.logs(40));
            }
        }
    }
}

/// A gRPC channel to `address`, every call on it bounded by [`CALL_BOUND`].
async fn channel(address: SocketAddr) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(CALL_BOUND)
        .timeout(CALL_BOUND)
        .connect()
        .await
        .map_err(|e| format!("{address}: {e}"))
}

/// One deployment of `chat` in a router's table.
#[derive(Debug, Clone)]
struct Route {
    deployment: String,
    weight: u32,
    gates: BTreeSet<String>,
}

type Routes = Vec<Route>;

/// The gates `deployment` has in `routes`.
fn gates<'r>(routes: &'r Routes, deployment: &str) -> Option<&'r BTreeSet<String>> {
    routes
        .iter()
        .find(|r| r.deployment == deployment)
        .map(|r| &r.gates)
}

/// Polls `check` every 100 ms until it gives a value, for at most
/// `timeout`; then fails, saying what was awaited and the last answer.
async fn wait<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "waited {timeout:?} for {what}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn template(model: &str) -> v1::Template {
    v1::Template {
        runtime: v1::EngineRuntime::Unspecified as i32,
        model: model.into(),
        ..Default::default()
    }
}

/// Why a failed request is not one the loss of the hosts explains, if it
/// is not. The old deployment ran on the lost hosts only, the new one on
/// healthy hosts only.
fn unexplained(
    r: &Record,
    old: &str,
    new: &str,
    cut_at: Instant,
    gone_at: Instant,
) -> Option<&'static str> {
    if r.ended < cut_at {
        return Some("failed before any host was lost");
    }
    if r.started >= gone_at {
        return Some("started after the routers dropped the lost hosts");
    }
    if r.deployment.as_deref() == Some(new) {
        return Some("answered by the healthy hosts' deployment");
    }
    match r.outcome() {
        // A stream on a lost host, ended by the router with an error event
        // when the host went silent or its connection broke.
        Outcome::Broken(code)
            if r.deployment.as_deref() == Some(old)
                && ["upstream_failed", "upstream_idle_timeout"].contains(&code.as_str()) =>
        {
            None
        }
        // Sent to a lost host that never answered (a kept-alive connection
        // to the host that was cut off) or whose connection broke: the
        // router cannot know that the engine did not see it, so it does not
        // retry. These name no deployment; the routers' counts (below)
        // show that none was a healthy host's.
        Outcome::Answered(StatusCode::BAD_GATEWAY, code) if code == "upstream_error" => None,
        Outcome::Answered(StatusCode::GATEWAY_TIMEOUT, code) if code == "upstream_timeout" => None,
        _ => Some("not a router's account of a worker that failed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_succeeds_while_the_old_deployments_hosts_are_cut_off_and_killed() {
    if !engine_answers() {
        return;
    }
    let began = Instant::now();
    let fleet = tokio::task::block_in_place(Fleet::start);
    let up_at = Instant::now();

    // Every agent reports to the coordinator (the containers start in any
    // order; Docker's port proxy accepts before the program listens).
    wait(
        "the agents to report",
        Duration::from_secs(60),
        async || {
            let workers = fleet
                .try_client()
                .await?
                .list_workers(v1::ListWorkersRequest::default())
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .workers;
            let reporting = workers.iter().filter(|w| w.reachable && w.status.is_some());
            if reporting.count() == AGENTS {
                Ok(())
            } else {
                Err(format!("{workers:#?}"))
            }
        },
    )
    .await;
    fleet
        .wait_tables("the routers to answer", Duration::from_secs(30), |_| true)
        .await;

    // Two replicas; a promotion surges one at a time, after one extra old
    // replica (the overhead): after its first step, the old deployment
    // runs on two hosts and the candidate on a third, one host is idle,
    // and it waits the stabilization time.
    let mut client = fleet.client().await;
    client
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            template: Some(template("org/v1")),
            scaling: Some(v1::ScalingSettings {
                min_replicas: 2,
                max_replicas: 2,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 60,
            }),
            promotion_settings: Some(v1::PromotionSettingsUpdate {
                rolling_deploy: Some(true),
                max_surge_percent: Some(50),
                replica_overhead_percent: Some(50),
                stabilization_time_seconds: Some(STABILIZATION_SECONDS),
                drain_timeout_seconds: Some(30),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let created = wait(
        "the first deployment",
        Duration::from_secs(60),
        async || {
            let endpoint = fleet.endpoint().await;
            match last_status(&endpoint) {
                Some(v1::PromotionStatus::Succeeded) => Ok(endpoint),
                _ => Err(format!("{endpoint:#?}")),
            }
        },
    )
    .await;
    let old = created.active_deployment.unwrap().id;
    fleet
        .wait_tables("two hosts in every table", Duration::from_secs(30), |t| {
            gates(t, &old).is_some_and(|g| g.len() == 2)
        })
        .await;

    let load = Load::start(&fleet.publics, CLIENTS, "chat", MAX_TOKENS);
    wait_completed(&load, "the load to flow", began, None, 10).await;
    let promotion = client
        .promote(v1::PromoteRequest {
            endpoint: "chat".into(),
            target: Some(v1::promote_request::Target::Template(template("org/v2"))),
            settings: None,
        })
        .await
        .unwrap()
        .into_inner();
    let new = promotion.deployment_id.clone();
    let split = fleet
        .wait_tables(
            "two old hosts and one new in every table",
            Duration::from_secs(60),
            |t| {
                gates(t, &old).is_some_and(|g| g.len() == 2)
                    && gates(t, &new).is_some_and(|g| g.len() == 1)
            },
        )
        .await;
    let split_at = Instant::now();
    let old_gates = gates(&split[0], &old).unwrap().clone();
    assert!(
        split.iter().all(|t| gates(t, &old) == Some(&old_gates)),
        "{split:#?}"
    );
    let (lost, healthy): (Vec<usize>, Vec<usize>) =
        (0..AGENTS).partition(|i| old_gates.contains(&gate_of(*i)));
    // The hosts about to be lost serve.
    wait_completed(
        &load,
        "the old deployment to serve",
        split_at,
        Some(&old),
        4,
    )
    .await;

    // The old deployment's hosts are lost: one cut off the network, the
    // other killed.
    let cut_at = Instant::now();
    tokio::task::block_in_place(|| {
        fleet.agents[lost[0]].disconnect(&fleet.network);
        fleet.agents[lost[1]].kill();
    });
    // The routers stop sending to them: within the coordinator's heartbeat
    // bound (8 s) and a table's round trip.
    let lost_gates: BTreeSet<String> = lost.iter().map(|i| gate_of(*i)).collect();
    fleet
        .wait_tables(
            "the routers to drop the lost hosts",
            Duration::from_secs(30),
            |t| t.iter().all(|r| r.gates.is_disjoint(&lost_gates)),
        )
        .await;
    let gone_at = Instant::now();

    // The promotion goes on with the healthy hosts, and succeeds.
    let done = wait(
        "the promotion to end",
        Duration::from_secs(120),
        async || {
            let endpoint = fleet.endpoint().await;
            match (&endpoint.last_promotion, last_status(&endpoint)) {
                (Some(p), Some(_)) if p.id == promotion.promotion_id => Ok(endpoint),
                _ => Err(format!("{endpoint:#?}")),
            }
        },
    )
    .await;
    let ended_at = Instant::now();
    let last = done.last_promotion.as_ref().unwrap();
    assert_eq!(last.status(), v1::PromotionStatus::Succeeded, "{done:#?}");
    assert_eq!(last.percent_traffic_to_new_version, 100, "{done:#?}");
    assert_eq!(done.active_deployment.as_ref().unwrap().id, new);
    // Each lost host is recorded as lost: as a replica taken out of the
    // table, or, when a step had already taken it out to retire it, as a
    // worker whose part in the step moves elsewhere.
    let lost_events: Vec<String> = done
        .events
        .iter()
        .filter(|e| ["replica-lost", "worker-lost"].contains(&e.kind.as_str()))
        .map(|e| format!("{}: {}", e.kind, e.message))
        .collect();
    for i in &lost {
        assert!(
            lost_events
                .iter()
                .any(|e| e.contains(&format!(": {} ", control_of(*i)))),
            "no event says {} was lost: {:#?}",
            control_of(*i),
            done.events
        );
    }
    // Its replicas run on the two healthy hosts, and only there.
    let healthy_gates: BTreeSet<String> = healthy.iter().map(|i| gate_of(*i)).collect();
    fleet
        .wait_tables(
            "the new deployment alone, on the healthy hosts",
            Duration::from_secs(30),
            |t| {
                let routed: Vec<&Route> = t.iter().filter(|r| r.weight > 0).collect();
                routed.len() == 1 && routed[0].deployment == new && routed[0].gates == healthy_gates
            },
        )
        .await;
    wait_completed(
        &load,
        "the new deployment to serve",
        ended_at,
        Some(&new),
        10,
    )
    .await;
    let records = load.stop().await;

    // Nothing failed that the loss of the hosts does not explain.
    let failed: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome() != Outcome::Complete)
        .collect();
    let mut wrong = String::new();
    for r in &failed {
        if let Some(why) = unexplained(r, &old, &new, cut_at, gone_at) {
            write!(wrong, "{why}:\n{}", listing([*r], began)).unwrap();
        }
    }
    assert!(wrong.is_empty(), "{wrong}");
    // And no router counts a failed attempt at a healthy host (through
    // the whole run: a worker's counts are kept by its address), nor a
    // failed request of the new deployment. A draining gate's refusal,
    // retried elsewhere, is no failure.
    let failures = |c: &v1::RequestCounts| {
        c.server_errors + c.upstream_unreachable + c.upstream_timeouts + c.aborted_streams
    };
    for control in &fleet.controls {
        let stats = RouterControlClient::new(channel(*control).await.unwrap())
            .get_stats(v1::GetStatsRequest {
                since: None,
                endpoint: "chat".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let deployment = stats
            .endpoints
            .iter()
            .flat_map(|e| &e.deployments)
            .find(|d| d.deployment_id == new)
            .unwrap_or_else(|| panic!("no counts of {new}: {stats:#?}"));
        let counts = deployment.requests.unwrap_or_default();
        assert!(
            counts.total > 0 && counts.success == counts.total,
            "router {}: {counts:#?}",
            stats.router_id
        );
        let workers: BTreeSet<&str> = deployment
            .workers
            .iter()
            .map(|w| w.address.as_str())
            .collect();
        assert_eq!(workers, healthy_gates.iter().map(String::as_str).collect());
        for worker in &deployment.workers {
            let counts = worker.requests.unwrap_or_default();
            assert!(
                counts.success > 0 && failures(&counts) == 0,
                "router {}, healthy host {}: {counts:#?}",
                stats.router_id,
                worker.address
            );
        }
    }

    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for r in &failed {
        let key = format!(
            "{:?} {}",
            r.outcome(),
            r.deployment.as_deref().unwrap_or("-")
        );
        *kinds.entry(key).or_default() += 1;
    }
    eprintln!(
        "fleet up in {:?}; {} requests, {} failed, each explained: {kinds:?}; \
         {lost_events:?}; the routers dropped the lost hosts {:?} after the cut; \
         the promotion ended {:?} after it; {:?} in all",
        up_at - began,
        records.len(),
        failed.len(),
        gone_at - cut_at,
        ended_at - cut_at,
        began.elapsed()
    );
}

/// Waits until `count` requests that started at `since` or later completed
/// (answered by `deployment` when one is named).
async fn wait_completed(
    load: &Load,
    what: &str,
    since: Instant,
    deployment: Option<&str>,
    count: usize,
) {
    wait(what, Duration::from_secs(20), async || {
        match load.completed(since, deployment) {
            done if done >= count => Ok(()),
            done => Err(format!("{done} of {count} requests")),
        }
    })
    .await;
}
