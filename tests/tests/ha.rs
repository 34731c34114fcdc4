//! Two coordinators on one etcd (built with `--features etcd`, which
//! `.ci/run` turns on): one leads, the other stands by and takes over when
//! the leader is killed, frozen past its lease, or cut off by etcd's
//! restart; a promotion under streaming load finishes with no failed
//! request.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossfade_e2e::{EtcdServer, Process, TempDir, binary, free_port, wait_for_port};
use crossfade_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;

use support::*;

const KNOBS: &[(&str, &str)] = &[
    ("FAKE_VLLM_LOAD_TIME", "300ms"),
    ("FAKE_VLLM_TOKENS_PER_SECOND", "100"),
    ("FAKE_VLLM_MAX_TOKENS", "8"),
];

/// Dropped in this order: coordinators, agents, engines, routers, hosts,
/// etcd, the directory.
struct Fleet {
    coordinators: Vec<Option<Process>>,
    configs: Vec<PathBuf>,
    apis: Vec<SocketAddr>,
    admins: Vec<SocketAddr>,
    agents: Vec<Agent>,
    _reapers: Vec<EngineReaper>,
    _routers: Vec<Process>,
    publics: Vec<SocketAddr>,
    _hosts: Vec<Host>,
    etcd: EtcdServer,
    _dir: TempDir,
    /// One fleet at a time: leases of 2 s on two cores.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static FLEETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `workers` agents, two routers and two coordinators on one etcd, the
/// first started first (so it leads); `None` where there is no etcd.
async fn start_fleet(workers: usize) -> Option<Fleet> {
    let one_at_a_time = FLEETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let etcd = EtcdServer::start().unwrap()?;
    let dir = TempDir::new().unwrap();
    let hosts: Vec<Host> = (0..workers).map(|_| Host::new()).collect();
    let reapers = hosts.iter().map(|h| EngineReaper(h.state_dir())).collect();
    let agents: Vec<Agent> = hosts.iter().map(|h| h.start(KNOBS, "")).collect();
    let apis: Vec<SocketAddr> = (0..2).map(|_| loopback()).collect();
    let admins: Vec<SocketAddr> = (0..2).map(|_| loopback()).collect();
    let mut routers = Vec::new();
    let mut publics = Vec::new();
    let mut controls = Vec::new();
    for i in 0..2 {
        let [public, control, admin] = [0; 3].map(|_| loopback());
        let config = dir.path().join(format!("router-{i}.toml"));
        let demand: Vec<String> = apis.iter().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "router_id = \"router-{i}\"\n[coordinator]\napi = [{}]\n[control_tls]\ninsecure = true\n[listen]\npublic = \"{public}\"\nadmin = \"{admin}\"\ncontrol = \"{control}\"\n",
                demand.join(", ")
            ),
        )
        .unwrap();
        routers.push(spawn_router(&config, control));
        publics.push(public);
        controls.push(format!("\"{control}\""));
    }
    let agents_list: Vec<String> = agents
        .iter()
        .map(|a| format!("\"{}\"", a.control))
        .collect();
    let configs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let config = dir.path().join(format!("coordinator-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "agents = [{}]\nrouters = [{}]\nrouter_ack_timeout = \"60s\"\n[control_tls]\ninsecure = true\n[listen]\napi = \"{api}\"\nadmin = \"{admin}\"\n[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"{etcd}\"]\nprefix = \"/crossfade-ha/\"\nlease_ttl = \"2s\"\ntimeout = \"2s\"\nadvertise_api = \"{api}\"\n",
                    agents_list.join(", "),
                    controls.join(", "),
                    api = apis[i],
                    admin = admins[i],
                    etcd = etcd.endpoint(),
                ),
            )
            .unwrap();
            config
        })
        .collect();
    let mut fleet = Fleet {
        coordinators: vec![None, None],
        configs,
        apis,
        admins,
        agents,
        _reapers: reapers,
        _routers: routers,
        publics,
        _hosts: hosts,
        etcd,
        _dir: dir,
        _one_at_a_time: one_at_a_time,
    };
    fleet.start_coordinator(0);
    assert_eq!(fleet.wait_leader(None, Duration::from_secs(30)).await, 0);
    fleet.start_coordinator(1);
    Some(fleet)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()))
}

fn signal(process: &Process, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(process.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

impl Fleet {
    fn start_coordinator(&mut self, i: usize) {
        let mut command = Command::new(binary("crossfade-coordinator").unwrap());
        command.arg("--config").arg(&self.configs[i]).env(
            "RUST_LOG",
            std::env::var("E2E_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
        );
        self.coordinators[i] = Some(Process::spawn("crossfade-coordinator", command).unwrap());
        wait_for_port(self.apis[i], Duration::from_secs(20)).unwrap();
    }

    /// Which coordinators say they lead now (a frozen or dead one says
    /// nothing).
    async fn leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for (i, admin) in self.admins.iter().enumerate() {
            if self.coordinators[i].is_none() {
                continue;
            }
            let metrics =
                tokio::time::timeout(Duration::from_secs(1), admin_get(*admin, "/metrics")).await;
            if metrics.is_ok_and(|m| m.lines().any(|l| l == "crossfade_coordinator_leader 1")) {
                leaders.push(i);
            }
        }
        leaders
    }

    /// Waits until exactly one coordinator, other than `not`, leads.
    async fn wait_leader(&self, not: Option<usize>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders = self.leaders().await;
            if let [leader] = leaders.as_slice()
                && Some(*leader) != not
            {
                return *leader;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for a new leader; leading: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client(&self, i: usize) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(format!("http://{}", self.apis[i]))
            .await
            .unwrap()
    }

    async fn endpoint(&self, i: usize) -> v1::Endpoint {
        self.try_endpoint(i).await.unwrap()
    }

    async fn try_endpoint(&self, i: usize) -> Result<v1::Endpoint, tonic::Status> {
        self.client(i)
            .await
            .get_endpoint(v1::GetEndpointRequest {
                name: "chat".into(),
                event_limit: 500,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Polls coordinator `i` until `check` holds for the endpoint (a
    /// standby that has not read it yet answers NOT_FOUND meanwhile).
    async fn wait_endpoint(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        check: impl Fn(&v1::Endpoint) -> bool,
    ) -> v1::Endpoint {
        let deadline = Instant::now() + timeout;
        loop {
            let endpoint = self.try_endpoint(i).await;
            if let Ok(endpoint) = &endpoint
                && check(endpoint)
            {
                return endpoint.clone();
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last: {endpoint:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The epoch each agent obeys.
    async fn epochs(&self) -> Vec<u64> {
        let mut epochs = Vec::new();
        for agent in &self.agents {
            epochs.push(agent.status().await.coordinator_epoch);
        }
        epochs
    }

    /// Waits until at least `commanded` agents obey one epoch above every
    /// epoch in `before` (an agent obeys the epoch of the last coordinator
    /// that commanded it; one never commanded obeys none); returns them.
    async fn wait_epochs_above(&self, before: &[u64], commanded: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let old = before.iter().copied().max().unwrap_or(0);
        loop {
            let epochs = self.epochs().await;
            let new = epochs.iter().copied().max().unwrap_or(0);
            if new > old && epochs.iter().filter(|e| **e == new).count() >= commanded {
                return epochs;
            }
            assert!(
                Instant::now() < deadline,
                "agents obey {epochs:?}, not above {before:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn template(model: &str) -> v1::Template {
    v1::Template {
        model: model.into(),
        vllm_args: "--max-model-len 4096".into(),
        ..Default::default()
    }
}

async fn create_chat(fleet: &Fleet, leader: usize, replicas: u32) {
    fleet
        .client(leader)
        .await
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            aliases: vec![],
            template: Some(template("org/v1")),
            scaling: Some(v1::ScalingSettings {
                min_replicas: replicas,
                max_replicas: replicas,
                target_in_flight_per_replica: 8,
                scale_down_delay_seconds: 60,
            }),
            promotion_settings: Some(v1::PromotionSettingsUpdate {
                rolling_deploy: Some(true),
                max_surge_percent: Some(50),
                stabilization_time_seconds: Some(2),
                ..Default::default()
            }),
            selector: None,
        })
        .await
        .unwrap();
    fleet
        .wait_endpoint(
            leader,
            "the first deployment",
            Duration::from_secs(60),
            |e| last_status(e) == Some(v1::PromotionStatus::Succeeded),
        )
        .await;
}

async fn promote(fleet: &Fleet, leader: usize, model: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = fleet
            .client(leader)
            .await
            .promote(v1::PromoteRequest {
                endpoint: "chat".into(),
                target: Some(v1::promote_request::Target::Template(template(model))),
                settings: None,
            })
            .await;
        match answer {
            Ok(answer) => return answer.into_inner().promotion_id,
            Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("promote {model}: {e}"),
        }
    }
}

/// Each step of a promotion is recorded done once: no step was performed
/// by two leaders.
fn steps_done_once(endpoint: &v1::Endpoint, promotion: &str) {
    let mut done: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &endpoint.events {
        if event.kind == "step-done" && event.promotion_id == promotion {
            *done.entry(event.message.as_str()).or_default() += 1;
        }
    }
    assert!(!done.is_empty(), "{:#?}", endpoint.events);
    assert!(done.values().all(|n| *n == 1), "{done:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_promotion_hands_over_and_no_request_fails() {
    let Some(mut fleet) = start_fleet(4).await else {
        return;
    };
    create_chat(&fleet, 0, 2).await;

    // The standby answers reads from the store and refuses changes,
    // naming the leader.
    let read = fleet
        .wait_endpoint(1, "the standby's read", Duration::from_secs(10), |e| {
            e.active_deployment.is_some()
        })
        .await;
    assert_eq!(read.name, "chat");
    let refused = fleet
        .client(1)
        .await
        .update_scaling(v1::UpdateScalingRequest {
            name: "chat".into(),
            scaling: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("standby"), "{refused}");
    assert_eq!(
        refused.metadata().get("x-crossfade-leader").unwrap(),
        fleet.apis[0].to_string().as_str()
    );

    // The CLI, sent to the standby, follows it to the leader.
    let cli = Command::new(binary("crossfade").unwrap())
        .args(["scale", "chat", "--min", "2", "--max", "2", "--coordinator"])
        .arg(format!("http://{}", fleet.apis[1]))
        .env_remove("CROSSFADE_COORDINATOR")
        .env("XDG_CONFIG_HOME", fleet._dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(cli.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("following the leader at http://{}", fleet.apis[0])),
        "{stderr}"
    );

    let first_epochs = fleet.epochs().await;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = streams::streaming(&fleet.publics, 4, &stop);
    let promotion = promote(&fleet, 0, "org/v2").await;
    fleet
        .wait_endpoint(0, "the first step", Duration::from_secs(60), |e| {
            e.in_progress_promotion
                .as_ref()
                .is_some_and(|p| p.percent_traffic_to_new_version == 50)
        })
        .await;
    // kill -9 the leader in the middle of the promotion.
    let killed_at = Instant::now();
    drop(fleet.coordinators[0].take());
    assert_eq!(fleet.wait_leader(Some(0), Duration::from_secs(20)).await, 1);
    let took = killed_at.elapsed();
    let done = fleet
        .wait_endpoint(
            1,
            "the promotion, finished by the new leader",
            Duration::from_secs(90),
            |e| last_status(e).is_some(),
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    let last = done.last_promotion.as_ref().unwrap();
    assert_eq!(last.id, promotion);
    assert_eq!(last.status(), v1::PromotionStatus::Succeeded, "{done:#?}");
    assert_eq!(last.percent_traffic_to_new_version, 100);
    steps_done_once(&done, &promotion);
    let (total, _) = streams::no_failures(outcomes, "org/v2").await;
    assert!(total > 10, "only {total} requests");
    // The new leader's epoch is above the dead one's: agents obey it.
    fleet.wait_epochs_above(&first_epochs, 2).await;
    eprintln!("a standby took over {took:?} after the leader was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_refused_and_steps_down_and_etcd_restarts_lose_nothing() {
    let Some(mut fleet) = start_fleet(2).await else {
        return;
    };
    create_chat(&fleet, 0, 1).await;
    let first_epochs = fleet.epochs().await;

    // Frozen past its 2 s lease: the standby takes over.
    let frozen = fleet.coordinators[0].take().unwrap();
    signal(&frozen, "STOP");
    assert_eq!(fleet.wait_leader(Some(0), Duration::from_secs(20)).await, 1);
    let promotion = promote(&fleet, 1, "org/v2").await;
    let epochs = fleet.wait_epochs_above(&first_epochs, 1).await;
    // Resumed, the old leader finds its lease gone and its writes refused:
    // it steps down and follows the new leader.
    signal(&frozen, "CONT");
    fleet.coordinators[0] = Some(frozen);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refused = fleet
            .client(0)
            .await
            .update_scaling(v1::UpdateScalingRequest {
                name: "chat".into(),
                scaling: None,
            })
            .await;
        if let Err(e) = &refused
            && e.metadata()
                .get("x-crossfade-leader")
                .map(|v| v.to_str().unwrap())
                == Some(fleet.apis[1].to_string().as_str())
        {
            break;
        }
        assert!(Instant::now() < deadline, "still leading? {refused:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(fleet.leaders().await, [1]);
    fleet
        .wait_endpoint(1, "the promotion", Duration::from_secs(60), |e| {
            last_status(e) == Some(v1::PromotionStatus::Succeeded)
        })
        .await;
    // No agent went back to the deposed leader's epoch.
    let now = fleet.epochs().await;
    assert!(
        now.iter().zip(&epochs).all(|(now, then)| now >= then),
        "{epochs:?} then {now:?}"
    );

    // etcd restarted: the coordinators wait, then one leads again over
    // the same records; nothing was lost and promotions go on.
    let before = fleet.endpoint(1).await;
    fleet.etcd.restart().unwrap();
    let leader = fleet.wait_leader(None, Duration::from_secs(30)).await;
    let after = fleet
        .wait_endpoint(
            leader,
            "the endpoint after etcd's restart",
            Duration::from_secs(30),
            |e| e.last_promotion.is_some(),
        )
        .await;
    assert_eq!(after.last_promotion.as_ref().unwrap().id, promotion);
    assert_eq!(after.active_deployment, before.active_deployment);
    assert!(after.events.len() >= before.events.len());
    let again = promote(&fleet, leader, "org/v3").await;
    let done = fleet
        .wait_endpoint(
            leader,
            "a promotion after etcd's restart",
            Duration::from_secs(60),
            |e| {
                last_status(e) == Some(v1::PromotionStatus::Succeeded)
                    && e.last_promotion.as_ref().is_some_and(|p| p.id == again)
            },
        )
        .await;
    let (_, _, body) = chat(fleet.publics[0], "chat", false).await;
    assert!(body.contains("[org/v3 as chat]"), "{body}");
    assert_eq!(done.name, "chat");
}
