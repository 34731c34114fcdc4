#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use super::*;
use crate::rollout::{Engine, Rollout, Worker};
use crate::settings::PromotionSettings;
use crate::state::{
    Deployment, DeploymentState, Endpoint, MAX_EVENTS, Promotion, RouterRecord, SplitPoint,
    WorkerRecord,
};

/// An in-memory backend that keeps every batch and can fail a write.
#[derive(Debug, Default)]
struct Memory {
    records: BTreeMap<String, Vec<u8>>,
    batches: Vec<Batch>,
    fail_next: bool,
}

impl Backend for Memory {
    async fn load(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(StoreError::Unavailable {
                store: "memory".into(),
                reason: "failing on purpose".into(),
            });
        }
        for prefix in &batch.delete_prefixes {
            self.records.retain(|k, _| !k.starts_with(prefix.as_str()));
        }
        for key in &batch.deletes {
            self.records.remove(key);
        }
        for (key, value) in &batch.puts {
            self.records.insert(key.clone(), value.clone());
        }
        self.batches.push(batch.clone());
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

fn worker(deployment: Option<&str>, engine: Engine) -> Worker {
    Worker {
        deployment: deployment.map(str::to_owned),
        engine,
        eligible: true,
        evict: false,
    }
}

/// A promotion from d-1 to d-2 that has started its first replica, over a
/// fleet of `fleet` workers of which the first three run d-1.
fn promotion(id: &str, fleet: usize) -> Promotion {
    let mut workers = BTreeMap::new();
    let mut routed = BTreeMap::new();
    for i in 0..fleet {
        let address = format!("10.0.{}.{}:7002", i / 250, i % 250);
        if i < 3 {
            workers.insert(address.clone(), worker(Some("d-1"), Engine::Ready));
            routed.insert(address, "d-1".to_owned());
        } else {
            workers.insert(address, worker(None, Engine::Idle));
        }
    }
    let mut rollout = Rollout::new(
        "d-1",
        "d-2",
        PromotionSettings::default(),
        3,
        workers,
        routed,
    );
    assert!(
        !rollout.start(1_000).is_empty(),
        "the rollout starts a replica"
    );
    Promotion {
        id: id.into(),
        rollout,
        started_at_ms: 1_000,
        updated_at_ms: 1_000,
        finished_at_ms: None,
        forced: false,
        rollback: false,
        splits: vec![
            SplitPoint {
                at_ms: 1_000,
                candidate_weight: 0,
            },
            SplitPoint {
                at_ms: 2_000,
                candidate_weight: 2_500,
            },
        ],
    }
}

fn state(fleet: usize) -> State {
    let mut state = State {
        epoch: 4,
        table_version: 9,
        next_id: 12,
        ..State::default()
    };
    let mut endpoint = Endpoint::new("chat/v1", 500);
    endpoint.aliases = vec!["gpt".into()];
    endpoint.active = Some("d-1".into());
    endpoint.candidate = Some("d-2".into());
    for i in 0..5 {
        endpoint.record(600 + i, "note", format!("event {i}"), "");
    }
    endpoint.promotion = Some(promotion("promotion-11", fleet));
    let mut ended = promotion("promotion-7", fleet);
    ended.finished_at_ms = Some(900);
    endpoint.last_promotion = Some(ended.clone());
    endpoint.past_promotions.push_back(ended.archived());
    state.endpoints.insert(endpoint.name.clone(), endpoint);
    state
        .endpoints
        .insert("empty".into(), Endpoint::new("empty", 700));
    for (id, deployment_state) in [
        ("d-1", DeploymentState::Active),
        ("d-2", DeploymentState::Candidate),
    ] {
        state.deployments.insert(
            id.into(),
            Deployment {
                id: id.into(),
                endpoint: "chat/v1".into(),
                template: Deployment::encode(&crossfade_proto::v1::Template::default()),
                state: deployment_state,
                created_at_ms: 800,
            },
        );
    }
    for i in 0..fleet {
        let address = format!("10.0.{}.{}:7002", i / 250, i % 250);
        state.workers.insert(
            address.clone(),
            WorkerRecord {
                address,
                ..WorkerRecord::default()
            },
        );
    }
    state.routers.insert(
        "10.0.9.9:7001".into(),
        RouterRecord {
            address: "10.0.9.9:7001".into(),
            acknowledged_version: 9,
        },
    );
    state
}

/// `state` as the store gives it back: the rollouts' clocks and idle
/// workers' views are not kept.
fn unclocked(state: &State) -> State {
    let mut state = state.clone();
    for endpoint in state.endpoints.values_mut() {
        let live = [&mut endpoint.promotion, &mut endpoint.last_promotion];
        for promotion in live
            .into_iter()
            .flatten()
            .chain(&mut endpoint.past_promotions)
        {
            promotion.rollout = promotion.rollout.as_stored();
        }
    }
    state
}

async fn reopened(mut store: Store<Memory>) -> (Store<Memory>, State) {
    let records = std::mem::take(&mut store.backend).records;
    Store::open(Memory {
        records,
        ..Memory::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_state_survives_as_records_and_only_changes_are_written() {
    let (mut store, empty) = Store::open(Memory::default()).await.unwrap();
    assert_eq!(empty, State::default());
    let mut state = state(20);
    store.save(&state).await.unwrap();
    assert_eq!(store.backend.batches.len(), 1);
    let keys: Vec<&String> = store.backend.records.keys().collect();
    assert!(keys.contains(&&"endpoints/chat%2Fv1/events/00000000000000000005".to_owned()));
    assert!(keys.contains(&&"endpoints/chat%2Fv1/promotion".to_owned()));
    assert!(keys.contains(&&"endpoints/chat%2Fv1/promotion/workers/10.0.0.0:7002".to_owned()));
    // An idle worker's view is learned again from its agent, not kept.
    assert!(!keys.contains(&&"endpoints/chat%2Fv1/promotion/workers/10.0.0.19:7002".to_owned()));

    // Nothing changed: nothing written.
    store.save(&state).await.unwrap();
    assert_eq!(store.backend.batches.len(), 1);

    // One worker's view in the rollout: that record, not the endpoint.
    let rollout = &mut state
        .endpoints
        .get_mut("chat/v1")
        .unwrap()
        .promotion
        .as_mut()
        .unwrap()
        .rollout;
    rollout.workers.insert(
        "10.0.0.19:7002".into(),
        worker(Some("d-2"), Engine::Starting),
    );
    store.save(&state).await.unwrap();
    let batch = store.backend.batches.last().unwrap();
    assert_eq!(
        batch.puts.keys().collect::<Vec<_>>(),
        ["endpoints/chat%2Fv1/promotion/workers/10.0.0.19:7002"]
    );
    assert!(batch.deletes.is_empty() && batch.delete_prefixes.is_empty());

    // One event: one record (and the endpoint's head, whose counter moved).
    state
        .endpoints
        .get_mut("chat/v1")
        .unwrap()
        .record(2_000, "note", "one more".into(), "");
    store.save(&state).await.unwrap();
    let batch = store.backend.batches.last().unwrap();
    assert_eq!(
        batch.puts.keys().collect::<Vec<_>>(),
        [
            "endpoints/chat%2Fv1",
            "endpoints/chat%2Fv1/events/00000000000000000006"
        ]
    );

    // A cordon: one worker record.
    state.workers.get_mut("10.0.0.4:7002").unwrap().cordoned = true;
    state.table_version += 1;
    store.save(&state).await.unwrap();
    let batch = store.backend.batches.last().unwrap();
    assert_eq!(
        batch.puts.keys().collect::<Vec<_>>(),
        ["meta", "workers/10.0.0.4:7002"]
    );

    let (_, loaded) = reopened(store).await;
    assert_eq!(loaded, unclocked(&state));
}

#[tokio::test]
async fn a_step_writes_what_it_moves_not_the_fleet() {
    let mut written = Vec::new();
    for fleet in [20, 2_000] {
        let (mut store, _) = Store::open(Memory::default()).await.unwrap();
        let mut state = state(fleet);
        store.save(&state).await.unwrap();
        let promotion = state
            .endpoints
            .get_mut("chat/v1")
            .unwrap()
            .promotion
            .as_mut()
            .unwrap();
        promotion
            .rollout
            .workers
            .insert("10.0.0.3:7002".into(), worker(Some("d-2"), Engine::Ready));
        promotion.updated_at_ms += 1;
        store.save(&state).await.unwrap();
        written.push(store.backend.batches.last().unwrap().bytes());
    }
    // The same change costs the same bytes in a fleet 100 times larger.
    assert_eq!(written[0], written[1], "{written:?}");
    assert!(written[0] < 2_000, "{written:?}");
}

#[tokio::test]
async fn the_history_is_bounded_in_the_store_too() {
    let (mut store, _) = Store::open(Memory::default()).await.unwrap();
    let mut state = state(5);
    store.save(&state).await.unwrap();
    let endpoint = state.endpoints.get_mut("chat/v1").unwrap();
    for i in 0..MAX_EVENTS {
        endpoint.record(3_000 + i as u64, "note", format!("later {i}"), "");
    }
    store.save(&state).await.unwrap();
    let events = store
        .backend
        .records
        .keys()
        .filter(|k| k.starts_with("endpoints/chat%2Fv1/events/"))
        .count();
    assert_eq!(events, MAX_EVENTS);
    // Past promotions hold no copy of the fleet.
    let past = store
        .backend
        .records
        .iter()
        .find(|(k, _)| k.starts_with("endpoints/chat%2Fv1/past/"))
        .unwrap()
        .1;
    let text = String::from_utf8_lossy(past);
    assert!(!text.contains("10.0.0.4:7002"), "{text}");
    let (_, loaded) = reopened(store).await;
    assert_eq!(loaded, unclocked(&state));
}

#[tokio::test]
async fn a_deleted_endpoint_leaves_no_record_and_a_failed_write_is_read_back() {
    let (mut store, _) = Store::open(Memory::default()).await.unwrap();
    let mut state = state(5);
    store.save(&state).await.unwrap();
    state.endpoints.remove("chat/v1");
    store.backend.fail_next = true;
    let error = store.save(&state).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    // The records are as before the failed write; the next save reads them
    // back and writes the difference.
    assert!(
        store
            .backend
            .records
            .contains_key("endpoints/chat%2Fv1/promotion")
    );
    store.save(&state).await.unwrap();
    assert!(
        !store
            .backend
            .records
            .keys()
            .any(|k| k.starts_with("endpoints/chat%2Fv1")),
        "{:?}",
        store.backend.records.keys().collect::<Vec<_>>()
    );
    let (_, loaded) = reopened(store).await;
    assert_eq!(loaded, unclocked(&state));
}

#[tokio::test]
async fn a_store_of_another_format_is_refused() {
    let mut memory = Memory::default();
    memory.records.insert(
        "meta".into(),
        br#"{"format":9,"epoch":1,"table_version":0,"next_id":0}"#.to_vec(),
    );
    let error = Store::open(memory).await.unwrap_err().to_string();
    assert!(
        error.contains("format 9 (this coordinator reads 2)"),
        "{error}"
    );
    let mut memory = Memory::default();
    memory.records.insert("workers/a:1".into(), b"{}".to_vec());
    let error = Store::open(memory).await.unwrap_err().to_string();
    assert!(
        error.contains("not a crossfade coordinator store"),
        "{error}"
    );
}

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crossfade-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_embedded_store_is_private_locked_and_survives_a_reopen() {
    let dir = dir("embedded");
    let path = dir.join("state.db");
    let state = state(10);
    {
        let (mut store, empty) = Store::open(Embedded::open(&path).unwrap()).await.unwrap();
        assert_eq!(empty, State::default());
        store.save(&state).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let error = Embedded::open(&path).unwrap_err().to_string();
        assert!(
            error.contains("another coordinator has this store open"),
            "{error}"
        );
    }
    let (_, loaded) = Store::open(Embedded::open(&path).unwrap()).await.unwrap();
    assert_eq!(loaded, unclocked(&state));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_json_store_of_the_first_format_is_migrated_in_place_or_beside() {
    let dir = dir("migrate");
    let state = state(10);
    let json = serde_json::to_vec(&serde_json::json!({ "format": 1, "state": state })).unwrap();
    // In place: the configured path held the JSON file.
    let path = dir.join("coordinator.json");
    std::fs::write(&path, &json).unwrap();
    {
        let (_, loaded) = Store::open(Embedded::open(&path).unwrap()).await.unwrap();
        assert_eq!(loaded, unclocked(&state));
    }
    assert_eq!(
        std::fs::read(dir.join("coordinator.json.v1.json")).unwrap(),
        json
    );
    assert_ne!(std::fs::read(&path).unwrap().first(), Some(&b'{'));
    // Beside: the new default path, the old default file next to it.
    std::fs::write(dir.join("state.json"), &json).unwrap();
    let path = dir.join("state.db");
    {
        let (_, loaded) = Store::open(Embedded::open(&path).unwrap()).await.unwrap();
        assert_eq!(loaded, unclocked(&state));
    }
    assert!(!dir.join("state.json").exists());
    assert!(dir.join("state.json.v1.json").exists());
    // A JSON file of an unknown format is refused, not overwritten.
    let path = dir.join("future.json");
    std::fs::write(&path, br#"{"format": 9, "state": {}}"#).unwrap();
    let error = Embedded::open(&path).unwrap_err().to_string();
    assert!(error.contains("format 9"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap().first(), Some(&b'{'));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same contract on etcd: records round-trip (paged past etcd's page),
/// a change writes what changed, a write outside the leadership's guard is
/// refused, and etcd's absence is a retryable error that ends when it is
/// back.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_keeps_the_same_records_and_refuses_a_deposed_writer() {
    let Some(mut server) = crossfade_e2e::EtcdServer::start().unwrap() else {
        return;
    };
    let endpoints = [server.endpoint()];
    let timeout = std::time::Duration::from_secs(2);
    let connect = || Etcd::connect(&endpoints, "/test/records/", timeout);
    let (mut store, empty) = Store::open(connect().await.unwrap()).await.unwrap();
    assert_eq!(empty, State::default());
    // 1,200 workers: more records than one page of the load.
    let mut state = state(1_200);
    store.save(&state).await.unwrap();
    let (_, loaded) = Store::open(connect().await.unwrap()).await.unwrap();
    assert_eq!(loaded, unclocked(&state));

    // A guard on a key that does not exist (a lost leadership): refused.
    let mut deposed = connect().await.unwrap();
    deposed.guard(etcd::Guard {
        key: b"/test/leader/gone".to_vec(),
        revision: 7,
    });
    let (mut deposed, _) = Store::open(deposed).await.unwrap();
    state.table_version += 1;
    let error = deposed.save(&state).await.unwrap_err();
    assert!(matches!(error, StoreError::Deposed { .. }), "{error}");

    // etcd gone: retryable; back: the same change is written.
    server.kill();
    let error = store.save(&state).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    server.restart().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match store.save(&state).await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (_, loaded) = Store::open(connect().await.unwrap()).await.unwrap();
    assert_eq!(loaded, unclocked(&state));
}

#[tokio::test]
async fn a_deleted_secret_does_not_linger_in_the_embedded_file() {
    let dir = dir("secret");
    let path = dir.join("state.db");
    let (mut store, _) = Store::open(Embedded::open(&path).unwrap()).await.unwrap();
    let mut state = state(3);
    let secret = crossfade_proto::v1::Template {
        env: vec![crossfade_proto::v1::EnvVar {
            name: "HF_TOKEN".into(),
            source: Some(crossfade_proto::v1::env_var::Source::Value(
                "hf_linger_check_42".into(),
            )),
            secret: true,
            redacted: false,
        }],
        ..Default::default()
    };
    state.deployments.get_mut("d-2").unwrap().template = Deployment::encode(&secret);
    store.save(&state).await.unwrap();
    let hex = crossfade_common::files::hex(b"hf_linger_check_42");
    let holds = |bytes: &[u8]| bytes.windows(hex.len()).any(|w| w == hex.as_bytes());
    assert!(holds(&std::fs::read(&path).unwrap()), "the check sees it");
    state.deployments.remove("d-2");
    store.save(&state).await.unwrap();
    assert!(!holds(&std::fs::read(&path).unwrap()), "the secret lingers");
    std::fs::remove_dir_all(&dir).unwrap();
}
