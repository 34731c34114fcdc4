//! `crossfade-coordinator` driving real agents (each supervising a
//! `fake-vllm`) and a real router: an endpoint is created, then promoted
//! step by step under a load of streaming requests, and no request fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossfade_e2e::{Process, TempDir, binary, free_port, wait_for_port};
use crossfade_proto::v1::{self, coordinator_client::CoordinatorClient};
use http::StatusCode;
use tonic::transport::Channel;

use support::streams::no_failures;
use support::*;

/// Dropped in this order: the coordinator (so it starts nothing more),
/// the agents, then their engines (which outlive agents by design), the
/// router, and last the directories that hold the engines' state files.
struct Fleet {
    coordinator: Option<Process>,
    coordinator_config: std::path::PathBuf,
    agents: Vec<Agent>,
    _reapers: Vec<EngineReaper>,
    /// (process, config, control address) of each router.
    routers: Vec<(Option<Process>, std::path::PathBuf, SocketAddr)>,
    hosts: Vec<Host>,
    /// The routers' public addresses.
    publics: Vec<SocketAddr>,
    /// The routers' `/metrics`.
    router_admins: Vec<SocketAddr>,
    api: SocketAddr,
    /// The coordinator's `/metrics`.
    admin: SocketAddr,
    /// The coordinator's REST API and dashboard.
    http: SocketAddr,
    _dir: TempDir,
    /// One fleet at a time: each is a dozen processes, and these machines
    /// have two cores.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static FLEETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

const KNOBS: &[(&str, &str)] = &[
    ("FAKE_VLLM_LOAD_TIME", "300ms"),
    ("FAKE_VLLM_TOKENS_PER_SECOND", "100"),
    ("FAKE_VLLM_MAX_TOKENS", "8"),
];

fn start_fleet(workers: usize) -> Fleet {
    // A test that failed still leaves the lock usable.
    let one_at_a_time = FLEETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = TempDir::new().unwrap();
    let hosts: Vec<Host> = (0..workers).map(|_| Host::new()).collect();
    let reapers = hosts.iter().map(|h| EngineReaper(h.state_dir())).collect();
    // CROSSFADE_E2E_RUNTIME=container: every engine a container.
    let keys = if container_mode() {
        container_keys()
    } else {
        String::new()
    };
    let agents: Vec<Agent> = hosts.iter().map(|h| h.start(KNOBS, &keys)).collect();

    let api = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    // Two routers: every table must reach both before a worker drains.
    let routers: Vec<(Process, SocketAddr, SocketAddr, SocketAddr)> =
        (0..2).map(|i| start_router(&dir, i, api)).collect();
    let router_admins = routers.iter().map(|r| r.3).collect();
    let routers_list: Vec<String> = routers.iter().map(|r| format!("\"{}\"", r.2)).collect();
    let router_configs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("router-{i}.toml")))
        .collect();

    let admin = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let config = dir.path().join("coordinator.toml");
    let agents_list: Vec<String> = agents
        .iter()
        .map(|a| format!("\"{}\"", a.control))
        .collect();
    std::fs::write(
        &config,
        format!(
            "agents = [{}]\nrouters = [{}]\nrouter_ack_timeout = \"60s\"\n[control_tls]\ninsecure = true\n[listen]\napi = \"{api}\"\nadmin = \"{admin}\"\nhttp = \"{http}\"\n[store]\npath = \"{}\"\n",
            agents_list.join(", "),
            routers_list.join(", "),
            dir.path().join("state.json").display()
        ),
    )
    .unwrap();
    let coordinator = start_coordinator(&config, api);
    Fleet {
        hosts,
        agents,
        _reapers: reapers,
        publics: routers.iter().map(|r| r.1).collect(),
        router_admins,
        routers: routers
            .into_iter()
            .zip(router_configs)
            .map(|((process, _, control, _), config)| (Some(process), config, control))
            .collect(),
        coordinator: Some(coordinator),
        coordinator_config: config,
        api,
        admin,
        http,
        _dir: dir,
        _one_at_a_time: one_at_a_time,
    }
}

/// A router with an empty table, `router-{i}`, that reports demand to the
/// coordinator at `api`: (process, public, control, admin).
fn start_router(
    dir: &TempDir,
    i: usize,
    api: SocketAddr,
) -> (Process, SocketAddr, SocketAddr, SocketAddr) {
    let [public, control, admin] =
        [0; 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())));
    let config = dir.path().join(format!("router-{i}.toml"));
    std::fs::write(
        &config,
        format!(
            "router_id = \"router-{i}\"\n[coordinator]\napi = [\"{api}\"]\n[control_tls]\ninsecure = true\n[listen]\npublic = \"{public}\"\nadmin = \"{admin}\"\ncontrol = \"{control}\"\n",
        ),
    )
    .unwrap();
    (spawn_router(&config, control), public, control, admin)
}

fn start_coordinator(config: &std::path::Path, api: SocketAddr) -> Process {
    let mut command = Command::new(binary("crossfade-coordinator").unwrap());
    command.arg("--config").arg(config).env(
        "RUST_LOG",
        std::env::var("E2E_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let coordinator = Process::spawn("crossfade-coordinator", command).unwrap();
    wait_for_port(api, Duration::from_secs(20)).unwrap();
    coordinator
}

impl Fleet {
    /// SIGKILL, then a new coordinator on the same store.
    fn kill_and_restart_coordinator(&mut self, down_for: Duration) {
        drop(self.coordinator.take());
        std::thread::sleep(down_for);
        self.coordinator = Some(start_coordinator(&self.coordinator_config, self.api));
    }

    async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(format!("http://{}", self.api))
            .await
            .unwrap()
    }

    /// Every worker the coordinator knows.
    async fn workers(&self) -> Vec<v1::Worker> {
        self.client()
            .await
            .list_workers(v1::ListWorkersRequest {
                endpoint: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .workers
    }

    /// Polls the endpoint until `check` holds; returns every promotion
    /// percentage seen on the way.
    async fn wait_endpoint(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&v1::Endpoint) -> bool,
    ) -> (v1::Endpoint, Vec<u32>) {
        let mut client = self.client().await;
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let endpoint = client
                .get_endpoint(v1::GetEndpointRequest {
                    name: "chat".into(),
                    event_limit: 100,
                })
                .await
                .unwrap()
                .into_inner();
            if let Some(p) = &endpoint.in_progress_promotion
                && seen.last() != Some(&p.percent_traffic_to_new_version)
            {
                seen.push(p.percent_traffic_to_new_version);
            }
            if check(&endpoint) {
                return (endpoint, seen);
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last: {endpoint:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Six clients streaming back to back through the routers until `stop`.
fn load(publics: &[SocketAddr], stop: &Arc<AtomicBool>) -> streams::Outcomes {
    streams::streaming(publics, 6, stop)
}

async fn create_chat(fleet: &Fleet, settings: v1::PromotionSettingsUpdate) -> String {
    fleet
        .client()
        .await
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            aliases: vec![],
            template: Some(template("org/v1")),
            scaling: Some(v1::ScalingSettings {
                min_replicas: 2,
                max_replicas: 2,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 60,
            }),
            promotion_settings: Some(settings),
            selector: None,
        })
        .await
        .unwrap();
    let (created, _) = fleet
        .wait_endpoint("the first deployment", Duration::from_secs(60), |e| {
            last_status(e) == Some(v1::PromotionStatus::Succeeded)
        })
        .await;
    created.active_deployment.as_ref().unwrap().id.clone()
}

async fn promote_v2(fleet: &Fleet) -> v1::PromoteResponse {
    promote(fleet, "org/v2").await
}

/// Promotes a template of `model`, waiting while the last promotion still
/// retires replicas (the coordinator refuses until then).
async fn promote(fleet: &Fleet, model: &str) -> v1::PromoteResponse {
    let mut client = fleet.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client
            .promote(v1::PromoteRequest {
                endpoint: "chat".into(),
                target: Some(v1::promote_request::Target::Template(template(model))),
                settings: None,
            })
            .await;
        match answer {
            Ok(answer) => return answer.into_inner(),
            Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                assert!(e.message().contains("still retiring"), "{}", e.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("promote {model}: {e}"),
        }
    }
}

/// Promotes the kept deployment `id` back (a rollback), waiting while the
/// last promotion still retires replicas.
async fn promote_back(fleet: &Fleet, id: &str) -> v1::PromoteResponse {
    let mut client = fleet.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .promote(v1::PromoteRequest {
                endpoint: "chat".into(),
                target: Some(v1::promote_request::Target::DeploymentId(id.to_owned())),
                settings: None,
            })
            .await
        {
            Ok(answer) => return answer.into_inner(),
            Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("rollback to {id}: {e}"),
        }
    }
}

/// The agent's own runtime; in container mode, the fake engine's knobs
/// travel in the template, as a container's environment is only that.
fn template(model: &str) -> v1::Template {
    let env = if container_mode() {
        KNOBS
            .iter()
            .map(|(name, value)| v1::EnvVar {
                name: (*name).into(),
                source: Some(v1::env_var::Source::Value((*value).into())),
                ..Default::default()
            })
            .collect()
    } else {
        Vec::new()
    };
    v1::Template {
        runtime: v1::EngineRuntime::Unspecified as i32,
        model: model.into(),
        vllm_args: "--max-model-len 4096".into(),
        env,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_surge_promotion_under_load_fails_no_request() {
    let fleet = start_fleet(4);
    let v1_id = create_chat(
        &fleet,
        v1::PromotionSettingsUpdate {
            rolling_deploy: Some(true),
            max_surge_percent: Some(50),
            ..Default::default()
        },
    )
    .await;
    // Routers have the table: a request goes through.
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v1 as chat]"), "{body}");

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let promoted = promote_v2(&fleet).await;
    let (done, seen) = fleet
        .wait_endpoint("the promotion", Duration::from_secs(90), |e| {
            last_status(e).is_some()
                && e.last_promotion.as_ref().unwrap().id == promoted.promotion_id
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let last = done.last_promotion.as_ref().unwrap();
    assert_eq!(last.status(), v1::PromotionStatus::Succeeded, "{done:#?}");
    assert_eq!(last.percent_traffic_to_new_version, 100);
    assert!(
        seen.iter().any(|p| *p > 0 && *p < 100),
        "no intermediate step seen: {seen:?}"
    );
    assert_eq!(
        done.active_deployment.as_ref().unwrap().id,
        promoted.deployment_id
    );
    assert!(
        done.events.iter().any(|e| e.kind == "step-done"),
        "{:#?}",
        done.events
    );
    let (total, v2) = no_failures(outcomes, "org/v2").await;
    assert!(total > 20, "only {total} requests");
    assert!(v2 > 0, "no request reached v2");
    let (_, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert!(body.contains("[org/v2 as chat]"), "{body}");

    // The old deployment is kept for a promotion back.
    let history = fleet
        .client()
        .await
        .history(v1::HistoryRequest {
            endpoint: "chat".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let old = history.deployments.iter().find(|d| d.id == v1_id).unwrap();
    assert_eq!(old.state(), v1::DeploymentState::Kept);
    // Both promotions: the one just done, then the first deployment's.
    assert_eq!(history.promotions.len(), 2);
    assert_eq!(history.promotions[0].id, promoted.promotion_id);

    let metrics = admin_get(fleet.admin, "/metrics").await;
    for line in [
        "crossfade_coordinator_promotion_status{endpoint=\"chat\",status=\"succeeded\"} 1",
        "crossfade_coordinator_candidate_traffic_percent{endpoint=\"chat\"} 100",
        "crossfade_coordinator_promotions_total{outcome=\"succeeded\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    assert!(metrics.contains("crossfade_coordinator_step_duration_seconds_bucket"));

    // Every metric the Grafana dashboard queries is one these programs
    // export.
    let mut exported = metrics;
    for admin in fleet
        .router_admins
        .iter()
        .chain(fleet.agents.iter().map(|a| &a.admin))
    {
        exported.push_str(&admin_get(*admin, "/metrics").await);
    }
    let families: BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/crossfade.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                queried += 1;
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(f)))
                    .unwrap_or(name);
                assert!(
                    families.contains(family),
                    "panel {:?} queries {name}, which no program exports: {families:?}",
                    panel["title"]
                );
            }
        }
    }
    assert!(queried > 15, "{queried} metric names in the dashboard");

    // A rollback is a promotion of the kept deployment, watched as it goes.
    let mut watch = fleet
        .client()
        .await
        .watch_endpoint(v1::WatchEndpointRequest {
            name: "chat".into(),
            event_limit: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.active_deployment.unwrap().id, promoted.deployment_id);
    let back = promote_back(&fleet, &v1_id).await;
    assert_eq!(back.deployment_id, v1_id);
    assert!(back.promotion.as_ref().unwrap().rollback);
    let watched = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let update = watch.message().await.unwrap().unwrap();
            if update.in_progress_promotion.is_none()
                && update
                    .last_promotion
                    .as_ref()
                    .is_some_and(|p| p.id == back.promotion_id)
            {
                return update;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        watched.last_promotion.unwrap().status(),
        v1::PromotionStatus::Succeeded
    );
    assert_eq!(watched.active_deployment.unwrap().id, v1_id);
    let (_, _, body) = chat(fleet.publics[1], "chat", false).await;
    assert!(body.contains("[org/v1 as chat]"), "{body}");

    // An out-of-range setting is refused, naming it.
    let refused = fleet
        .client()
        .await
        .update_promotion_settings(v1::UpdatePromotionSettingsRequest {
            name: "chat".into(),
            settings: Some(v1::PromotionSettingsUpdate {
                max_surge_percent: Some(60),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "`settings.max_surge_percent`: must be within 0..=50, got 60"
    );
    assert_eq!(fleet.agents.len(), fleet.hosts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_promotion_finishes_it_after_a_restart() {
    let mut fleet = start_fleet(4);
    create_chat(
        &fleet,
        v1::PromotionSettingsUpdate {
            rolling_deploy: Some(true),
            max_surge_percent: Some(50),
            stabilization_time_seconds: Some(2),
            ..Default::default()
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    // The promotion is started as an operator's CI job would:
    // `crossfade promote --watch`, which must ride out the restart and exit
    // 0 when the promotion succeeds.
    let dir = TempDir::new().unwrap();
    let template_file = dir.path().join("v2.toml");
    let mut toml = String::from("model = \"org/v2\"\nvllm_args = \"--max-model-len 4096\"\n");
    if container_mode() {
        toml.push_str("[env]\n");
        for (name, value) in KNOBS {
            toml.push_str(&format!("{name} = \"{value}\"\n"));
        }
    }
    std::fs::write(&template_file, toml).unwrap();
    let stdout_file = dir.path().join("watch.out");
    let stderr_file = dir.path().join("watch.err");
    let mut watch = Command::new(binary("crossfade").unwrap())
        .args([
            "--coordinator",
            &format!("http://{}", fleet.api),
            "-o",
            "json",
        ])
        .args([
            "promote",
            "chat",
            "--watch",
            "--timeout",
            "150s",
            "--template",
        ])
        .arg(&template_file)
        .stdout(std::fs::File::create(&stdout_file).unwrap())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let (started, _) = fleet
        .wait_endpoint("the first step", Duration::from_secs(60), |e| {
            e.in_progress_promotion
                .as_ref()
                .is_some_and(|p| p.percent_traffic_to_new_version == 50)
        })
        .await;
    let promotion_id = started.in_progress_promotion.unwrap().id;
    // kill -9 in the middle of the promotion; routers keep their table.
    fleet.kill_and_restart_coordinator(Duration::from_millis(500));
    let (done, _) = fleet
        .wait_endpoint(
            "the promotion after the restart",
            Duration::from_secs(90),
            |e| last_status(e).is_some(),
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let last = done.last_promotion.as_ref().unwrap();
    assert_eq!(last.id, promotion_id);
    assert_eq!(last.status(), v1::PromotionStatus::Succeeded, "{done:#?}");
    // The split's history came through the restart: 0 % at the start, the
    // first step's 50 % (before the kill), 100 % at the end, in time order.
    let percents: Vec<u32> = last
        .split_history
        .iter()
        .map(|p| p.percent_traffic_to_new_version)
        .collect();
    assert_eq!(percents, [0, 50, 100], "{:#?}", last.split_history);
    let times: Vec<i64> = last
        .split_history
        .iter()
        .map(|p| {
            p.at.as_ref()
                .map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
        })
        .collect();
    assert!(times.is_sorted(), "{:#?}", last.split_history);
    // The watch ends with the promotion, 0 for SUCCEEDED, having said it
    // lost and found the coordinator.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = watch.kill();
            panic!("`crossfade promote --watch` did not exit after the promotion ended");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&stderr_file).unwrap();
    let stdout = std::fs::read_to_string(&stdout_file).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("reconnected to the coordinator"),
        "{stderr}"
    );
    let final_view: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(final_view["last_promotion"]["id"], promotion_id.as_str());
    assert_eq!(final_view["last_promotion"]["status"], "SUCCEEDED");
    assert_eq!(last.percent_traffic_to_new_version, 100);
    let (total, _) = no_failures(outcomes, "org/v2").await;
    assert!(total > 20, "only {total} requests");
    let (_, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert!(body.contains("[org/v2 as chat]"), "{body}");
}

fn rolling(surge: u32, unavailable: u32, stabilization: u32) -> v1::PromotionSettingsUpdate {
    v1::PromotionSettingsUpdate {
        rolling_deploy: Some(true),
        max_surge_percent: Some(surge),
        max_unavailable_percent: Some(unavailable),
        stabilization_time_seconds: Some(stabilization),
        ..Default::default()
    }
}

/// One of the five promotion controls, as a call on a client.
type ControlCall = fn(
    &mut CoordinatorClient<Channel>,
    v1::PromotionControlRequest,
) -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<tonic::Response<v1::Promotion>, tonic::Status>>
            + Send
            + '_,
    >,
>;

async fn control(fleet: &Fleet, which: ControlCall) -> v1::Promotion {
    let mut client = fleet.client().await;
    which(
        &mut client,
        v1::PromotionControlRequest {
            endpoint: "chat".into(),
            promotion_id: String::new(),
            reason: "test".into(),
        },
    )
    .await
    .unwrap()
    .into_inner()
}

async fn at_half(fleet: &Fleet) {
    fleet
        .wait_endpoint("the first step", Duration::from_secs(60), |e| {
            e.in_progress_promotion
                .as_ref()
                .is_some_and(|p| p.percent_traffic_to_new_version == 50)
        })
        .await;
}

async fn ended(fleet: &Fleet, id: &str) -> v1::Promotion {
    let (done, _) = fleet
        .wait_endpoint("the end of the promotion", Duration::from_secs(90), |e| {
            last_status(e).is_some() && e.last_promotion.as_ref().unwrap().id == id
        })
        .await;
    done.last_promotion.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_promotion_updates_in_place_under_load() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(0, 50, 1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    let promoted = promote_v2(&fleet).await;
    let (_, seen) = fleet
        .wait_endpoint("the promotion", Duration::from_secs(90), |e| {
            last_status(e).is_some()
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let last = ended(&fleet, &promoted.promotion_id).await;
    assert_eq!(last.status(), v1::PromotionStatus::Succeeded);
    assert!(seen.contains(&50), "{seen:?}");
    let (total, v2) = no_failures(outcomes, "org/v2").await;
    assert!(total > 20 && v2 > 0, "{total} requests, {v2} on v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_resume_goes_on_and_cancel_returns_all_traffic() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);

    // Pause holds the split; cancel ramps it back down.
    let first = promote_v2(&fleet).await;
    at_half(&fleet).await;
    let paused = control(&fleet, |c, r| Box::pin(c.pause_promotion(r))).await;
    assert_eq!(paused.status(), v1::PromotionStatus::Paused);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = fleet
        .client()
        .await
        .get_endpoint(v1::GetEndpointRequest {
            name: "chat".into(),
            event_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let held = held.in_progress_promotion.unwrap();
    assert_eq!(held.status(), v1::PromotionStatus::Paused);
    assert_eq!(
        (held.percent_traffic_to_new_version, held.current_step),
        (50, paused.current_step)
    );
    let canceling = control(&fleet, |c, r| Box::pin(c.cancel_promotion(r))).await;
    assert_eq!(canceling.status(), v1::PromotionStatus::RampingDown);
    let canceled = ended(&fleet, &first.promotion_id).await;
    assert_eq!(canceled.status(), v1::PromotionStatus::Canceled);
    assert_eq!(canceled.percent_traffic_to_new_version, 0);

    // Resume goes on to the end.
    let second = promote_v2(&fleet).await;
    at_half(&fleet).await;
    control(&fleet, |c, r| Box::pin(c.pause_promotion(r))).await;
    let resumed = control(&fleet, |c, r| Box::pin(c.resume_promotion(r))).await;
    assert_eq!(resumed.status(), v1::PromotionStatus::RampingUp);
    let done = ended(&fleet, &second.promotion_id).await;
    assert_eq!(done.status(), v1::PromotionStatus::Succeeded);
    stop.store(true, Ordering::Relaxed);
    let (total, _) = no_failures(outcomes, "org/v2").await;
    assert!(total > 20, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forcing_acts_at_once_and_a_missing_model_fails_with_traffic_untouched() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 30)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);

    // A 30 s stabilization would hold each step; force roll forward does not wait.
    let forward = promote_v2(&fleet).await;
    at_half(&fleet).await;
    let started = Instant::now();
    control(&fleet, |c, r| Box::pin(c.force_roll_forward_promotion(r))).await;
    let done = ended(&fleet, &forward.promotion_id).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(done.status(), v1::PromotionStatus::Succeeded);
    assert_eq!(done.percent_traffic_to_new_version, 100);
    assert!(done.forced);

    // Force cancel: back to v2 (now the active one) at once.
    let back = promote(&fleet, "org/v3").await;
    at_half(&fleet).await;
    control(&fleet, |c, r| Box::pin(c.force_cancel_promotion(r))).await;
    let canceled = ended(&fleet, &back.promotion_id).await;
    assert_eq!(canceled.status(), v1::PromotionStatus::Canceled);
    assert_eq!(canceled.percent_traffic_to_new_version, 0);

    // A model that does not exist: FAILED, traffic never moved.
    let missing = promote(&fleet, "does-not-exist/model").await;
    let failed = ended(&fleet, &missing.promotion_id).await;
    assert_eq!(failed.status(), v1::PromotionStatus::Failed);
    assert_eq!(failed.percent_traffic_to_new_version, 0);
    assert!(!failed.reason.is_empty());
    stop.store(true, Ordering::Relaxed);
    no_failures(outcomes, "org/v2").await;
    let (_, _, body) = chat(fleet.publics[1], "chat", false).await;
    assert!(body.contains("[org/v2 as chat]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_answers_errors_fails_its_health_gate() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 30)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    let promoted = promote_v2(&fleet).await;
    at_half(&fleet).await;

    // The candidate's engine starts answering 500.
    let workers = fleet.workers().await;
    let candidate = workers
        .iter()
        .find(|w| w.assigned_deployment_id == promoted.deployment_id)
        .unwrap();
    let agent = fleet
        .agents
        .iter()
        .find(|a| a.control.to_string() == candidate.control_address)
        .unwrap();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://127.0.0.1:{}/_fake/fault",
            agent.engine_port
        ))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"error-500:1000000",
        )))
        .unwrap();
    let answer = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(request)
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);

    let failed = ended(&fleet, &promoted.promotion_id).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(failed.status(), v1::PromotionStatus::Failed, "{failed:#?}");
    assert!(failed.reason.contains("health gate"), "{}", failed.reason);
    assert_eq!(failed.percent_traffic_to_new_version, 0);
    for client in outcomes {
        client.await.unwrap();
    }
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v1 as chat]"), "{body}");
}

async fn scale(fleet: &Fleet, min: u32, max: u32, target: u32, delay: u32) {
    fleet
        .client()
        .await
        .update_scaling(v1::UpdateScalingRequest {
            name: "chat".into(),
            scaling: Some(v1::ScalingUpdate {
                min_replicas: Some(min),
                max_replicas: Some(max),
                target_in_flight_per_replica: Some(target),
                scale_down_delay_seconds: Some(delay),
            }),
        })
        .await
        .unwrap();
}

fn ready_replicas(endpoint: &v1::Endpoint) -> u32 {
    endpoint.replicas.iter().map(|r| r.ready).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_follows_the_load_and_zero_stops_everything() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    // Two in flight per replica: six streams want three replicas.
    scale(&fleet, 1, 3, 2, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    fleet
        .wait_endpoint("three replicas under load", Duration::from_secs(60), |e| {
            ready_replicas(e) == 3
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    no_failures(outcomes, "org/v1").await;
    // Idle: down to the minimum after the delay.
    fleet
        .wait_endpoint("one replica when idle", Duration::from_secs(60), |e| {
            ready_replicas(e) == 1
        })
        .await;

    // min = max = 0: every replica drains and stops.
    scale(&fleet, 0, 0, 2, 0).await;
    fleet
        .wait_endpoint("no replica", Duration::from_secs(60), |e| {
            ready_replicas(e) == 0
        })
        .await;
    // Out of the tables first, then drained and stopped.
    for agent in &fleet.agents {
        agent
            .wait_state(v1::EngineState::Stopped, Duration::from_secs(60))
            .await;
    }
    scale(&fleet, 1, 1, 2, 0).await;
    fleet
        .wait_endpoint("a replica again", Duration::from_secs(60), |e| {
            ready_replicas(e) == 1
        })
        .await;
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_at_zero_serves_its_first_request_and_returns_to_zero() {
    let fleet = start_fleet(1);
    fleet
        .client()
        .await
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            template: Some(template("org/v1")),
            scaling: Some(v1::ScalingSettings {
                min_replicas: 0,
                max_replicas: 1,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    fleet
        .wait_endpoint("created, with no replica", Duration::from_secs(60), |e| {
            last_status(e) == Some(v1::PromotionStatus::Succeeded) && ready_replicas(e) == 0
        })
        .await;
    // The router holds the request and tells the coordinator at once; a
    // replica starts.
    let (status, headers, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.contains_key("x-crossfade-queued-ms"), "{headers:?}");
    let (endpoint, _) = fleet
        .wait_endpoint("the endpoint", Duration::from_secs(5), |_| true)
        .await;
    assert!(
        endpoint.events.iter().any(
            |e| e.kind == "demand" && e.message.starts_with("router `router-0` holds requests")
        ),
        "{:#?}",
        endpoint.events
    );
    // No traffic: back to zero after the delay.
    fleet
        .wait_endpoint("back to zero replicas", Duration::from_secs(60), |e| {
            ready_replicas(e) == 0
                && e.replicas
                    .iter()
                    .all(|r| r.starting == 0 && r.draining == 0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_worker_is_replaced_before_it_drains() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    let mut client = fleet.client().await;
    let workers = client
        .list_workers(v1::ListWorkersRequest {
            endpoint: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    let victim = workers
        .iter()
        .find(|w| !w.assigned_deployment_id.is_empty())
        .unwrap();
    let cordoned = client
        .cordon_worker(v1::CordonWorkerRequest {
            worker_id: victim.control_address.clone(),
            reason: "maintenance".into(),
            evacuate: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cordoned.cordoned);
    let address = victim.control_address.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers = fleet.workers().await;
        let moved = workers
            .iter()
            .find(|w| w.control_address == address)
            .is_some_and(|w| w.assigned_endpoint.is_empty());
        let serving = workers
            .iter()
            .filter(|w| !w.assigned_deployment_id.is_empty())
            .count();
        if moved && serving == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never moved: {workers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (total, _) = no_failures(outcomes, "org/v1").await;
    assert!(total > 10, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_a_lost_store_runs_above_the_epoch_the_fleet_obeys() {
    let mut fleet = start_fleet(2);
    // A second run of the coordinator (epoch 2) drives the fleet.
    fleet.kill_and_restart_coordinator(Duration::from_millis(100));
    let lost = create_chat(&fleet, rolling(50, 0, 0)).await;
    for agent in &fleet.agents {
        assert_eq!(agent.status().await.coordinator_epoch, 2);
    }
    // Its store is lost: a coordinator on an empty one starts at epoch 1,
    // which every agent and router would refuse.
    drop(fleet.coordinator.take());
    std::fs::remove_file(fleet.coordinator_config.with_file_name("state.json")).unwrap();
    fleet.coordinator = Some(start_coordinator(&fleet.coordinator_config, fleet.api));
    // It adopts what the routers route: `chat` keeps its deployment and
    // keeps serving, without a restart of anything ...
    let mut client = fleet.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let adopted = loop {
        let read = client
            .get_endpoint(v1::GetEndpointRequest {
                name: "chat".into(),
                event_limit: 100,
            })
            .await;
        // NOT_FOUND until the routers' tables are read (every 2 s).
        if let Ok(endpoint) = read.map(tonic::Response::into_inner)
            && endpoint
                .active_deployment
                .as_ref()
                .is_some_and(|d| d.id == lost)
        {
            break endpoint;
        }
        assert!(Instant::now() < deadline, "chat was not adopted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        adopted.events.iter().any(|e| e.kind == "adopted"),
        "{adopted:#?}"
    );
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v1 as chat]"), "{body}");
    // ... learns epoch 2 from the fleet and runs as 3, which the routers
    // obey ...
    let deadline = Instant::now() + Duration::from_secs(60);
    for (_, _, control) in &fleet.routers {
        let mut router =
            v1::router_control_client::RouterControlClient::connect(format!("http://{control}"))
                .await
                .unwrap();
        loop {
            let table = router
                .get_table(v1::GetTableRequest {})
                .await
                .unwrap()
                .into_inner();
            if table.coordinator_epoch == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the router still obeys epoch {}",
                table.coordinator_epoch
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // ... and a promotion gives the endpoint a template again: the agents
    // take its calls, under a deployment id no agent ran before (the empty
    // store learned the ids the agents run).
    let promoted = promote_v2(&fleet).await;
    let (done, _) = fleet
        .wait_endpoint("the promotion", Duration::from_secs(60), |e| {
            e.last_promotion
                .as_ref()
                .is_some_and(|p| p.id == promoted.promotion_id && p.finished_at.is_some())
        })
        .await;
    assert_eq!(
        last_status(&done),
        Some(v1::PromotionStatus::Succeeded),
        "{done:#?}"
    );
    assert_ne!(done.active_deployment.as_ref().unwrap().id, lost);
    for agent in &fleet.agents {
        assert_eq!(agent.status().await.coordinator_epoch, 3);
    }
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v2 as chat]"), "{body}");
}

/// The host whose agent listens on `control_address`.
fn host_of<'f>(fleet: &'f Fleet, control_address: &str) -> &'f Host {
    let index = fleet
        .agents
        .iter()
        .position(|a| a.control.to_string() == control_address)
        .unwrap();
    &fleet.hosts[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_xid_cordons_the_worker_and_its_replica_moves_with_no_request_failed() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let workers = fleet.workers().await;
    let victim = workers
        .iter()
        .find(|w| !w.assigned_deployment_id.is_empty())
        .unwrap()
        .control_address
        .clone();
    // XID 79: the GPU fell off the bus.
    host_of(&fleet, &victim).inject_gpu_faults(r#"{"1": {"xids": [79]}}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers = fleet.workers().await;
        let sick = workers
            .iter()
            .find(|w| w.control_address == victim)
            .unwrap();
        let serving = workers
            .iter()
            .filter(|w| !w.assigned_deployment_id.is_empty())
            .count();
        if sick.cordoned && sick.assigned_endpoint.is_empty() && serving == 2 {
            assert!(
                sick.cordon_reason.contains("GPU unhealthy: fatal XID 79"),
                "{}",
                sick.cordon_reason
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never left the sick GPU: {workers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet
        .wait_endpoint("two ready replicas", Duration::from_secs(30), |e| {
            ready_replicas(e) == 2
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let (total, _) = no_failures(outcomes, "org/v1").await;
    assert!(total > 10, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_whose_gpu_turns_fatal_fails_the_promotion() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 30)).await;
    let promoted = promote_v2(&fleet).await;
    at_half(&fleet).await;
    let workers = fleet.workers().await;
    let candidate = workers
        .iter()
        .find(|w| w.assigned_deployment_id == promoted.deployment_id)
        .unwrap()
        .control_address
        .clone();
    // Uncorrected ECC errors on the candidate's GPU.
    host_of(&fleet, &candidate).inject_gpu_faults(r#"{"0": {"ecc_volatile_uncorrected": 3}}"#);
    let failed = ended(&fleet, &promoted.promotion_id).await;
    assert_eq!(failed.status(), v1::PromotionStatus::Failed, "{failed:#?}");
    assert!(
        failed.reason.contains(&format!(
            "a GPU of {candidate}, which runs {}, is unhealthy",
            promoted.deployment_id
        )),
        "{}",
        failed.reason
    );
    assert_eq!(failed.percent_traffic_to_new_version, 0);
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v1 as chat]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_router_leaves_the_other_serving_and_gets_the_table_back() {
    let mut fleet = start_fleet(2);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    // kill -9 of router 0; router 1 keeps serving.
    drop(fleet.routers[0].0.take());
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics[1..], &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Restarted, it serves its (empty) configured table until the
    // coordinator notices and pushes the current one.
    fleet.routers[0].0 = Some(spawn_router(&fleet.routers[0].1, fleet.routers[0].2));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
        if status == StatusCode::OK {
            assert!(body.contains("[org/v1 as chat]"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted router never got the table: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (total, _) = no_failures(outcomes, "org/v1").await;
    assert!(total > 10, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_new_version_once() {
    let fleet = start_fleet(4);
    // Two steps with 2 s at 50 %: without stickiness, sessions would flip.
    create_chat(&fleet, rolling(50, 0, 2)).await;
    // Sessions: each client keeps its own x-session-id.
    let stop = Arc::new(AtomicBool::new(false));
    let sessions: Vec<_> = (0..6)
        .map(|i| {
            let stop = Arc::clone(&stop);
            let public = fleet.publics[i % 2];
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < 5000 {
                    let (status, headers, body) =
                        chat_with_session(public, &format!("session-{i}")).await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                    let deployment = headers["x-crossfade-deployment"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    if seen.last() != Some(&deployment) {
                        seen.push(deployment);
                    }
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let promoted = promote_v2(&fleet).await;
    let (done, seen) = fleet
        .wait_endpoint("the promotion", Duration::from_secs(60), |e| {
            last_status(e).is_some()
                && e.last_promotion.as_ref().unwrap().id == promoted.promotion_id
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        done.last_promotion.unwrap().status(),
        v1::PromotionStatus::Succeeded
    );
    assert!(seen.contains(&50), "{seen:?}");
    for session in sessions {
        let order = session.await.unwrap();
        assert!(order.len() <= 2, "a session went back and forth: {order:?}");
        if order.len() == 2 {
            assert_eq!(order[1], promoted.deployment_id, "{order:?}");
        }
    }
}

/// A streaming chat completion with a session key.
async fn chat_with_session(
    addr: SocketAddr,
    session: &str,
) -> (StatusCode, http::HeaderMap, String) {
    use http_body_util::BodyExt as _;
    let body = serde_json::json!({
        "model": "chat",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": true,
    });
    let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-session-id", session)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_rolling_promotion_switches_all_traffic_at_once() {
    let fleet = start_fleet(4);
    create_chat(
        &fleet,
        v1::PromotionSettingsUpdate {
            rolling_deploy: Some(false),
            ..Default::default()
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    let promoted = promote_v2(&fleet).await;
    let (_, seen) = fleet
        .wait_endpoint("the promotion", Duration::from_secs(60), |e| {
            last_status(e).is_some()
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let done = ended(&fleet, &promoted.promotion_id).await;
    assert_eq!(done.status(), v1::PromotionStatus::Succeeded);
    // The candidate fully up, then 100 % at once: nothing in between.
    assert!(seen.iter().all(|p| *p == 0 || *p == 100), "{seen:?}");
    let (total, v2) = no_failures(outcomes, "org/v2").await;
    assert!(total > 10 && v2 > 0, "{total} requests, {v2} on v2");

    // The model object, as vLLM's: the endpoint's creation and the
    // context length its engines report (fake-vllm's default).
    let (endpoint, _) = fleet
        .wait_endpoint("the endpoint", Duration::from_secs(5), |_| true)
        .await;
    let body = admin_get(fleet.publics[0], "/v1/models/chat").await;
    let model: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(model["max_model_len"], 4096, "{body}");
    assert_eq!(
        model["created"],
        endpoint.created_at.unwrap().seconds,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_stream_gives_a_clean_error_and_is_replaced() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = load(&fleet.publics, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // kill -9 of a serving engine while streams run through it.
    let mut victim = None;
    for agent in &fleet.agents {
        let status = agent.status().await;
        let engine = status.engine.unwrap();
        if engine.state() == v1::EngineState::Ready {
            victim = Some(engine.pid);
            break;
        }
    }
    let pid = victim.unwrap();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet
        .wait_endpoint("two ready replicas again", Duration::from_secs(60), |e| {
            e.replicas.iter().map(|r| r.ready).sum::<u32>() == 2
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    // Every request either streamed to its end, or ended with the gate's
    // clean error event (the engine died under it), or, if the engine died
    // before answering, got an error status; none hung or broke off.
    let mut whole = 0;
    let mut cut = 0;
    for client in outcomes {
        for (status, body) in client.await.unwrap() {
            if status == StatusCode::OK && body.trim_end().ends_with("data: [DONE]") {
                whole += 1;
            } else if status == StatusCode::OK {
                assert!(body.contains("\"code\":\"engine_failed\""), "{body}");
                cut += 1;
            } else {
                assert!(status.is_server_error(), "{status} {body}");
                cut += 1;
            }
        }
    }
    assert!(whole > 10, "{whole} whole, {cut} cut");
    // A request that the dead engine had not answered goes elsewhere (in
    // container mode, Docker's proxy accepts connections for the dead
    // container until its port is torn down: the gate waits for the agent
    // to see the engine's end and then has the router retry).
    assert!(
        cut <= 6,
        "more requests failed ({cut}) than were in flight on one engine"
    );
}

/// Creates `name` with a first deployment of `model` and `replicas`
/// replicas, without waiting for it.
async fn create(fleet: &Fleet, name: &str, aliases: &[&str], model: Option<&str>, replicas: u32) {
    fleet
        .client()
        .await
        .create_endpoint(v1::CreateEndpointRequest {
            name: name.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            template: model.map(template),
            scaling: Some(v1::ScalingSettings {
                min_replicas: replicas,
                max_replicas: replicas,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 60,
            }),
            promotion_settings: None,
            selector: None,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_deployment_that_fails_ends_failed_and_the_next_one_goes_ahead() {
    let fleet = start_fleet(2);
    create(&fleet, "chat", &[], Some("does-not-exist/model"), 2).await;
    let (failed, _) = fleet
        .wait_endpoint(
            "the first deployment to fail",
            Duration::from_secs(60),
            |e| last_status(e).is_some(),
        )
        .await;
    assert_eq!(last_status(&failed), Some(v1::PromotionStatus::Failed));
    assert!(failed.active_deployment.is_none(), "{failed:#?}");
    assert!(
        failed
            .events
            .iter()
            .all(|e| !e.message.contains("deployment ``")),
        "an event names an empty deployment: {:#?}",
        failed.events
    );

    // The endpoint takes a new promotion, which serves.
    promote(&fleet, "org/v1").await;
    fleet
        .wait_endpoint(
            "the second first deployment",
            Duration::from_secs(60),
            |e| last_status(e) == Some(v1::PromotionStatus::Succeeded),
        )
        .await;
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v1 as chat]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_that_names_another_endpoint_is_refused_and_routing_goes_on() {
    let fleet = start_fleet(2);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    create(&fleet, "other", &["other-alias"], None, 0).await;
    let mut client = fleet.client().await;
    for (endpoint, aliases) in [
        ("other", vec!["chat"]),
        ("chat", vec!["other-alias"]),
        ("chat", vec!["same", "same"]),
    ] {
        let error = client
            .update_aliases(v1::UpdateAliasesRequest {
                name: endpoint.into(),
                aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().starts_with("aliases: "),
            "{}",
            error.message()
        );
    }
    // Aliases added by several callers at once are all kept: the
    // coordinator applies `add` to the list it holds, not to one a caller
    // read earlier.
    let adds = (0..8).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .update_aliases(v1::UpdateAliasesRequest {
                    name: "chat".into(),
                    add: vec![format!("added-{i}")],
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(adds).await;
    let mut aliases = client
        .update_aliases(v1::UpdateAliasesRequest {
            name: "chat".into(),
            remove: vec!["added-0".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .aliases;
    aliases.sort();
    let expected: Vec<String> = (1..8).map(|i| format!("added-{i}")).collect();
    assert_eq!(aliases, expected);
    // Both forms at once are refused, naming the field.
    let error = client
        .update_aliases(v1::UpdateAliasesRequest {
            name: "chat".into(),
            aliases: vec!["x".into()],
            add: vec!["y".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().starts_with("aliases: give"),
        "{}",
        error.message()
    );
    // A template the agents could not launch is refused before any worker
    // sees it, naming the field.
    let mut bad = template("org/v2");
    bad.vllm_args = "--port 9000".into();
    let error = client
        .promote(v1::PromoteRequest {
            endpoint: "chat".into(),
            target: Some(v1::promote_request::Target::Template(bad)),
            settings: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error
            .message()
            .starts_with("template.vllm_args: may not set --port"),
        "{}",
        error.message()
    );
    // The routers still route `chat`.
    let (status, _, body) = chat(fleet.publics[1], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_hangs_mid_promotion_is_lost_and_the_promotion_ends() {
    let fleet = start_fleet(4);
    create_chat(
        &fleet,
        v1::PromotionSettingsUpdate {
            drain_timeout_seconds: Some(30),
            ..rolling(50, 0, 0)
        },
    )
    .await;
    // A host serving v1 hangs: its agent (and so its gate) stops answering.
    let mut hung = None;
    for agent in &fleet.agents {
        if agent
            .status()
            .await
            .engine
            .is_some_and(|e| e.state() == v1::EngineState::Ready)
        {
            hung = Some(agent);
            break;
        }
    }
    let hung = hung.expect("an agent serving v1");
    let stopped = Command::new("kill")
        .args(["-STOP", &hung.process.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let started = Instant::now();
    let promotion = promote_v2(&fleet).await;
    let done = ended(&fleet, &promotion.promotion_id).await;
    assert_eq!(done.status(), v1::PromotionStatus::Succeeded, "{done:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );
    let (endpoint, _) = fleet
        .wait_endpoint("two v2 replicas", Duration::from_secs(60), |e| {
            ready_replicas(e) == 2
        })
        .await;
    assert!(
        endpoint
            .events
            .iter()
            .any(|e| e.kind == "replica-lost" || e.kind == "worker-lost"),
        "{:#?}",
        endpoint.events
    );
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/v2 as chat]"), "{body}");
    // Let it go, so that its drop (SIGKILL) and the reaper work as usual.
    let _ = Command::new("kill")
        .args(["-CONT", &hung.process.pid().to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_endpoint_stops_its_engines_once_the_routers_forget_it() {
    let fleet = start_fleet(2);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    // A deployment whose template holds a literal secret.
    let mut secret = template("org/v2");
    secret.env.push(v1::EnvVar {
        name: "HF_TOKEN".into(),
        secret: true,
        source: Some(v1::env_var::Source::Value("hf_delete_me_123".into())),
        ..Default::default()
    });
    fleet
        .client()
        .await
        .promote(v1::PromoteRequest {
            endpoint: "chat".into(),
            target: Some(v1::promote_request::Target::Template(secret)),
            settings: None,
        })
        .await
        .unwrap();
    let store = fleet.coordinator_config.with_file_name("state.json");
    // The store holds templates protobuf-encoded in hex.
    let hex = crossfade_common::files::hex(b"hf_delete_me_123");
    let stored = || {
        let bytes = std::fs::read(&store).unwrap();
        bytes.windows(hex.len()).any(|w| w == hex.as_bytes())
    };
    assert!(stored(), "the check can see the secret");
    fleet
        .wait_endpoint("org/v2 active", Duration::from_secs(60), |e| {
            last_status(e) == Some(v1::PromotionStatus::Succeeded)
                && e.active_deployment
                    .as_ref()
                    .is_some_and(|d| d.template.as_ref().is_some_and(|t| t.model == "org/v2"))
        })
        .await;
    let deleted = fleet
        .client()
        .await
        .delete_endpoint(v1::DeleteEndpointRequest {
            name: "chat".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.replicas_stopped, 2);
    for agent in &fleet.agents {
        agent
            .wait_status(
                "the deleted endpoint's engine to stop",
                Duration::from_secs(60),
                |s| {
                    s.engine
                        .as_ref()
                        .is_none_or(|e| e.state() == v1::EngineState::Stopped)
                },
            )
            .await;
    }
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The deleted endpoint's deployments, and their secrets, are gone
    // from the store.
    assert!(!stored(), "the secret outlived its endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_refuses_tables_holds_every_drain() {
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 0)).await;
    // A newer coordinator (as far as router 0 knows) took over: it refuses
    // this coordinator's epoch from now on. Its table stays the same.
    let control = fleet.routers[0].2;
    let mut router =
        v1::router_control_client::RouterControlClient::connect(format!("http://{control}"))
            .await
            .unwrap();
    let mut table = router
        .get_table(v1::GetTableRequest {})
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    table.version = u64::MAX / 2;
    router
        .apply_table(v1::ApplyTableRequest {
            coordinator_epoch: u64::MAX / 2,
            table: Some(table),
        })
        .await
        .unwrap();

    promote_v2(&fleet).await;
    let (endpoint, _) = fleet
        .wait_endpoint("a refusal on record", Duration::from_secs(30), |e| {
            e.events.iter().any(|e| e.kind == "router-refused")
        })
        .await;
    // Router 0 routes by its old table: no v1 replica may drain, however
    // long the refusal lasts (the harness's acknowledgement bound is 60 s,
    // and a refusal is not silence).
    assert!(endpoint.in_progress_promotion.is_some(), "{endpoint:#?}");
    let v1_id = endpoint.active_deployment.as_ref().unwrap().id.clone();
    let mut serving_v1 = 0;
    for agent in &fleet.agents {
        let status = agent.status().await;
        if let Some(engine) = &status.engine
            && engine.deployment_id == v1_id
            && engine.state() == v1::EngineState::Ready
        {
            serving_v1 += 1;
        }
    }
    assert_eq!(
        serving_v1, 2,
        "a v1 replica drained behind a refusing router"
    );
    let (status, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_never_share_a_worker() {
    let fleet = start_fleet(4);
    create(&fleet, "chat", &[], Some("org/v1"), 2).await;
    create(&fleet, "other", &[], Some("org/other"), 2).await;
    let mut client = fleet.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for name in ["chat", "other"] {
            let e = client
                .get_endpoint(v1::GetEndpointRequest {
                    name: name.into(),
                    event_limit: 0,
                })
                .await
                .unwrap()
                .into_inner();
            done &=
                last_status(&e) == Some(v1::PromotionStatus::Succeeded) && ready_replicas(&e) == 2;
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both endpoints never had two replicas"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Four workers, four engines: two of each endpoint's deployment.
    let mut deployments = Vec::new();
    for agent in &fleet.agents {
        let status = agent.status().await;
        let engine = status.engine.unwrap();
        assert_eq!(engine.state(), v1::EngineState::Ready);
        deployments.push(engine.deployment_id);
    }
    deployments.sort();
    deployments.dedup();
    assert_eq!(deployments.len(), 2, "{deployments:?}");
    for (name, model) in [("chat", "org/v1"), ("other", "org/other")] {
        let (status, _, body) = chat(fleet.publics[1], name, false).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(&format!("[{model} as {name}]")), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_in_vllm_args_is_probed_with_and_never_shown() {
    let fleet = start_fleet(2);
    let mut keyed = template("org/v1");
    keyed.vllm_args = "--max-model-len 4096 --api-key sk-e2e-secret".into();
    fleet
        .client()
        .await
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            template: Some(keyed),
            scaling: Some(v1::ScalingSettings {
                min_replicas: 2,
                max_replicas: 2,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 60,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // The engines refuse /v1/* without the key: ready means the agents'
    // probes sent it.
    let (endpoint, _) = fleet
        .wait_endpoint("the keyed deployment", Duration::from_secs(60), |e| {
            last_status(e) == Some(v1::PromotionStatus::Succeeded)
        })
        .await;
    assert_eq!(ready_replicas(&endpoint), 2);
    let history = fleet
        .client()
        .await
        .history(v1::HistoryRequest {
            endpoint: "chat".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for text in [format!("{endpoint:?}"), format!("{history:?}")] {
        assert!(!text.contains("sk-e2e-secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
    // Nor in the process list: the engines got it as VLLM_API_KEY.
    let keyed_id = endpoint.active_deployment.as_ref().unwrap().id.clone();
    let engines = engines_of(&fleet, &keyed_id).await;
    assert_eq!(engines.len(), 2, "{engines:?}");
    for (pid, _) in engines.values() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--max-model-len"), "{cmdline}");
        assert!(!cmdline.contains("sk-e2e-secret"), "{cmdline}");
    }
}

/// Engines of `deployment` on the fleet's workers: control address →
/// (pid, state).
async fn engines_of(fleet: &Fleet, deployment: &str) -> BTreeMap<String, (u32, v1::EngineState)> {
    fleet
        .workers()
        .await
        .into_iter()
        .filter_map(|w| {
            let engine = w.status?.engine?;
            (engine.deployment_id == deployment && engine.pid != 0)
                .then(|| (w.control_address, (engine.pid, engine.state())))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_deployment_promoted_back_serves_again_without_a_reload() {
    let fleet = start_fleet(4);
    let keep = v1::PromotionSettingsUpdate {
        promotion_cleanup_strategy: Some(v1::CleanupStrategy::Keep as i32),
        ..rolling(50, 0, 0)
    };
    let v1_id = create_chat(&fleet, keep).await;
    let promoted = promote_v2(&fleet).await;
    ended(&fleet, &promoted.promotion_id).await;
    // v1's two engines stay, drained and running, out of the table.
    let deadline = Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let engines = engines_of(&fleet, &v1_id).await;
        if engines.len() == 2
            && engines
                .values()
                .all(|(_, state)| *state == v1::EngineState::Draining)
        {
            break engines;
        }
        if Instant::now() >= deadline {
            let (endpoint, _) = fleet.wait_endpoint("", Duration::ZERO, |_| true).await;
            panic!(
                "v1's engines not kept warm: {engines:?}; {:#?}",
                endpoint.events
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Promoting v1 back takes those engines: the same processes serve.
    let back = promote_back(&fleet, &v1_id).await;
    let done = ended(&fleet, &back.promotion_id).await;
    assert_eq!(done.status(), v1::PromotionStatus::Succeeded);
    let serving = engines_of(&fleet, &v1_id).await;
    let pids = |m: &BTreeMap<String, (u32, v1::EngineState)>| -> BTreeSet<u32> {
        m.values().map(|(pid, _)| *pid).collect()
    };
    assert_eq!(
        pids(&serving),
        pids(&kept),
        "v1 reloaded: {kept:?} -> {serving:?}"
    );
    assert!(
        serving
            .values()
            .all(|(_, state)| *state == v1::EngineState::Ready),
        "{serving:?}"
    );
    let (endpoint, _) = fleet
        .wait_endpoint("v1 serving", Duration::from_secs(10), |e| {
            e.active_deployment.as_ref().is_some_and(|d| d.id == v1_id)
        })
        .await;
    assert!(
        endpoint
            .events
            .iter()
            .any(|e| e.message.contains("2 warm, no reload")
                || e.message.contains("1 warm, no reload")),
        "{:?}",
        endpoint.events
    );
}

/// The `crossfade_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("crossfade_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}

/// The dashboard in a real browser (headless Chromium): it shows a
/// promotion move from 0 to 100 %, and its Pause button pins the split
/// until its Resume button lets it go on. `CROSSFADE_SCREENSHOT=FILE`
/// keeps a screenshot of the paused promotion (the README's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_promotion_and_pauses_it() {
    let Some(chromium) = support::browser::chromium() else {
        return;
    };
    let fleet = start_fleet(4);
    create_chat(&fleet, rolling(50, 0, 6)).await;
    let url = format!("http://{}/", fleet.http);
    let mut page = support::browser::Browser::open(&chromium, &url)
        .await
        .unwrap();
    let card = |field: &str| {
        format!(
            "(document.querySelector('[data-endpoint=\"chat\"] [data-field=\"{field}\"]') || {{}}).textContent || ''"
        )
    };
    // The page draws the endpoint and its first deployment.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !page
        .eval(&card("active"))
        .await
        .unwrap()
        .as_str()
        .unwrap_or("")
        .starts_with("dep-")
    {
        assert!(
            Instant::now() < deadline,
            "the page never showed the active deployment"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let promoted = promote_v2(&fleet).await;

    // Watch the page until it shows the split at 50 %, then pause from it.
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = page.eval(&card("status")).await.unwrap();
        let percent = page.eval(&card("percent")).await.unwrap();
        let percent = percent.as_str().unwrap_or("").to_owned();
        // Until the promotion shows, the card shows the last one's end.
        let under_way = !status.as_str().unwrap_or("").starts_with("last:");
        if under_way && seen.last() != Some(&percent) && !percent.is_empty() {
            seen.push(percent.clone());
        }
        if under_way && percent == "50 %" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed 50 %: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let clicked = page
        .eval("(() => { const b = document.querySelector('[data-endpoint=\"chat\"] [data-action=\"pause_promotion\"]'); if (!b || b.disabled) return false; b.click(); return true; })()")
        .await
        .unwrap();
    assert_eq!(clicked, true, "no enabled Pause button");
    let (paused, _) = fleet
        .wait_endpoint("paused from the page", Duration::from_secs(10), |e| {
            e.in_progress_promotion
                .as_ref()
                .is_some_and(|p| p.status() == v1::PromotionStatus::Paused)
        })
        .await;
    let pinned = paused
        .in_progress_promotion
        .unwrap()
        .percent_traffic_to_new_version;
    assert_eq!(pinned, 50);
    // Longer than a stabilization: the split stays where it was, and the
    // page says so.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (still, _) = fleet
        .wait_endpoint("still paused", Duration::from_secs(5), |_| true)
        .await;
    let p = still.in_progress_promotion.unwrap();
    assert_eq!(p.status(), v1::PromotionStatus::Paused);
    assert_eq!(p.percent_traffic_to_new_version, 50);
    let status = page.eval(&card("status")).await.unwrap();
    assert_eq!(status, "PAUSED");
    assert_eq!(page.eval(&card("percent")).await.unwrap(), "50 %");
    // A page opened mid-promotion draws the split since the promotion
    // began (the coordinator's split history: 0 %, then 50 %), not since
    // the page opened.
    page.eval("location.reload(), true").await.unwrap();
    let points = "(document.querySelector('[data-endpoint=\"chat\"] svg.history polyline') || { getAttribute: () => '' }).getAttribute('data-points') || ''";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Evaluations fail while the page reloads.
        if let Ok(drawn) = page.eval(points).await
            && drawn != ""
        {
            assert_eq!(drawn, "2", "the chart's points after a reload");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not draw the chart after a reload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(path) = std::env::var_os("CROSSFADE_SCREENSHOT") {
        std::fs::write(path, page.screenshot().await.unwrap()).unwrap();
    }

    // Resume from the page: the promotion goes on to 100 % and succeeds.
    let clicked = page
        .eval("(() => { const b = document.querySelector('[data-endpoint=\"chat\"] [data-action=\"resume_promotion\"]'); if (!b || b.disabled) return false; b.click(); return true; })()")
        .await
        .unwrap();
    assert_eq!(clicked, true, "no enabled Resume button");
    let (done, _) = fleet
        .wait_endpoint(
            "the promotion after resuming",
            Duration::from_secs(90),
            |e| last_status(e).is_some(),
        )
        .await;
    assert_eq!(
        done.last_promotion.as_ref().unwrap().id,
        promoted.promotion_id
    );
    assert_eq!(last_status(&done), Some(v1::PromotionStatus::Succeeded));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = page.eval(&card("status")).await.unwrap();
        let percent = page.eval(&card("percent")).await.unwrap();
        if let Some(p) = percent
            .as_str()
            .filter(|p| seen.last().map(String::as_str) != Some(*p) && !p.is_empty())
        {
            seen.push(p.to_owned());
        }
        if status == "last: SUCCEEDED" && percent == "100 %" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed the end: {status} {percent}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // From 0 (or the first step) to 100 %, through the pinned 50 %.
    assert!(seen.contains(&"50 %".to_owned()), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("100 %"), "{seen:?}");
    assert!(
        seen.first().map(String::as_str) != Some("100 %"),
        "the page saw only the end: {seen:?}"
    );
}
