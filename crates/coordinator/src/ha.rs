//! Several coordinators on etcd: one leads, the others stand by.
//!
//! Each coordinator holds an etcd lease (`lease_ttl`, kept alive three
//! times per TTL) and campaigns with it in etcd's election
//! (`{prefix}leader`). The one elected opens the store with its leadership
//! key as the guard of every write and starts the actor with the key's
//! creation revision as the floor of its epoch: a later leader's epoch is
//! higher, so agents and routers refuse the one it replaced. Leadership
//! ends when the lease is lost (not renewed within its TTL: etcd cut off, or
//! this process stopped), when a write is refused (deposed), or at
//! shutdown (the lease is revoked, so a standby takes over at once).
//!
//! A standby answers reads from the store (read again every second) and
//! refuses changes naming the leader's API address (`x-crossfade-leader`),
//! which the CLI follows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossfade_common::Shutdown;
use etcd_client::Client;
use tokio::sync::{mpsc, watch};

use crate::actor::{self, Coordinator, Options, Request, View};
use crate::error::CoordinatorError;
use crate::store::etcd::Guard;
use crate::store::{Backends, Etcd, Store, StoreError};

/// How often a standby reads the store and the leader's name again.
const STANDBY_REFRESH: Duration = Duration::from_secs(1);

/// Where and how to campaign.
#[derive(Debug, Clone)]
pub struct Settings {
    /// etcd's client endpoints.
    pub endpoints: Vec<String>,
    /// The fleet's key prefix (ends with `/`).
    pub prefix: String,
    /// The lease's time to live.
    pub lease_ttl: Duration,
    /// The bound on each call to etcd.
    pub timeout: Duration,
    /// This coordinator's API address, as standbys name it.
    pub advertise: String,
}

impl Settings {
    fn records(&self) -> String {
        format!("{}records/", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }
}

#[derive(Debug, Clone)]
enum Role {
    /// On standby; the leader's API address, if known.
    Standby(String),
    Leading(Coordinator),
}

/// Starts campaigning; the handle serves reads and changes whatever this
/// coordinator's role.
pub fn start(settings: Settings, options: Options, shutdown: &Shutdown) -> Coordinator {
    let (requests, requests_rx) = mpsc::channel(64);
    let (view_tx, view) = watch::channel(Arc::new(View::default()));
    let (role_tx, role) = watch::channel(Role::Standby(String::new()));
    metrics::gauge!(crate::metrics::LEADER).set(0.0);
    shutdown.spawn(front(requests_rx, role, shutdown.clone()));
    shutdown.spawn(campaign(
        settings,
        options,
        role_tx,
        view_tx,
        shutdown.clone(),
    ));
    Coordinator::from_parts(requests, view)
}

/// Hands each change to the leading actor, or refuses it naming the leader.
async fn front(
    mut requests: mpsc::Receiver<Request>,
    role: watch::Receiver<Role>,
    shutdown: Shutdown,
) {
    loop {
        let request = tokio::select! {
            () = shutdown.triggered() => return,
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
        };
        let current = role.borrow().clone();
        match current {
            Role::Leading(coordinator) => {
                if let Err(request) = coordinator.forward(request).await {
                    // Leadership ended between the look and the send.
                    request.refuse(CoordinatorError::Standby(String::new()));
                }
            }
            Role::Standby(leader) => request.refuse(CoordinatorError::Standby(leader)),
        }
    }
}

/// Terms, one after another, until shutdown.
async fn campaign(
    settings: Settings,
    options: Options,
    role: watch::Sender<Role>,
    view: watch::Sender<Arc<View>>,
    shutdown: Shutdown,
) {
    let mut pause = Duration::from_millis(500);
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let result = term(&settings, &options, &role, &view, &shutdown).await;
        role.send_replace(Role::Standby(String::new()));
        metrics::gauge!(crate::metrics::LEADER).set(0.0);
        if let Err(e) = result {
            tracing::warn!(error = %e, retry_in = ?pause, "etcd election: the term ended");
        }
        if started.elapsed() > Duration::from_secs(30) {
            pause = Duration::from_millis(500);
        }
        tokio::select! {
            () = shutdown.triggered() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// One term: a lease, a campaign, and leadership until it ends.
async fn term(
    settings: &Settings,
    options: &Options,
    role: &watch::Sender<Role>,
    view: &watch::Sender<Arc<View>>,
    shutdown: &Shutdown,
) -> Result<(), StoreError> {
    let etcd = Etcd::connect(&settings.endpoints, &settings.records(), settings.timeout).await?;
    let mut client = etcd.client();
    let ttl = i64::try_from(settings.lease_ttl.as_secs()).unwrap_or(60);
    let lease = etcd.bounded(client.lease_grant(ttl, None)).await?.id();
    let term = shutdown.child();
    let (lost_tx, mut lost) = watch::channel(false);
    term.spawn(keep_alive(
        client.clone(),
        lease,
        settings.lease_ttl,
        lost_tx,
        term.clone(),
    ));
    let result = serve_term(
        settings, options, role, view, shutdown, &etcd, lease, &mut lost,
    )
    .await;
    term.trigger();
    term.wait_for_tasks(settings.timeout).await;
    // At shutdown, or after a failure: the lease goes now rather than at its
    // expiry, so a standby takes over at once.
    let _ = etcd.bounded(client.lease_revoke(lease)).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve_term(
    settings: &Settings,
    options: &Options,
    role: &watch::Sender<Role>,
    view: &watch::Sender<Arc<View>>,
    shutdown: &Shutdown,
    etcd: &Etcd,
    lease: i64,
    lost: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    // Standby until elected: reads from the store, changes refused.
    let mut elections = etcd.client().election_client();
    let mut campaign =
        Box::pin(elections.campaign(settings.election(), settings.advertise.clone(), lease));
    let mut refresh = tokio::time::interval(STANDBY_REFRESH);
    let elected = loop {
        tokio::select! {
            () = shutdown.triggered() => return Ok(()),
            _ = lost.changed() => return Err(lease_lost(etcd)),
            result = &mut campaign => break result.map_err(|e| unavailable(etcd, &e))?,
            _ = refresh.tick() => standby(settings, etcd, role, view).await,
        }
    };
    drop(campaign);
    let key = elected
        .leader()
        .ok_or_else(|| unavailable(etcd, &"the election answered without a key"))?;
    let revision = key.rev();
    let mut backend = etcd.clone();
    backend.guard(Guard {
        key: key.key().to_vec(),
        revision,
    });
    let (store, state) = Store::open(Backends::Etcd(Box::new(backend))).await?;
    tracing::info!(
        revision,
        advertise = settings.advertise,
        "elected leader; taking over the fleet"
    );
    let actor = shutdown.child();
    let floor = u64::try_from(revision).unwrap_or(0);
    let options = Options {
        publish_to: Some(view.clone()),
        ..options.clone()
    };
    let coordinator = actor::start(store, state, floor, options, &actor).await?;
    role.send_replace(Role::Leading(coordinator));
    metrics::gauge!(crate::metrics::LEADER).set(1.0);
    let ended = tokio::select! {
        () = shutdown.triggered() => Ok(()),
        _ = lost.changed() => Err(lease_lost(etcd)),
        // It stops itself when a write is refused.
        () = actor.triggered() => Err(StoreError::Deposed { store: etcd_describe(etcd) }),
    };
    role.send_replace(Role::Standby(String::new()));
    metrics::gauge!(crate::metrics::LEADER).set(0.0);
    actor.trigger();
    actor.wait_for_tasks(Duration::from_secs(5)).await;
    if ended.is_err() {
        tracing::warn!("stepped down: no longer the leader; campaigning again");
    }
    ended
}

/// A standby's look at the store and the leader.
async fn standby(
    settings: &Settings,
    etcd: &Etcd,
    role: &watch::Sender<Role>,
    view: &watch::Sender<Arc<View>>,
) {
    let mut elections = etcd.client().election_client();
    let leader = etcd
        .bounded(elections.leader(settings.election()))
        .await
        .ok()
        .and_then(|mut r| r.take_kv())
        .and_then(|kv| kv.value_str().ok().map(str::to_owned))
        .unwrap_or_default();
    role.send_replace(Role::Standby(leader));
    match Store::open(etcd.clone()).await {
        Ok((_, state)) => {
            view.send_replace(Arc::new(View {
                state,
                ..View::default()
            }));
        }
        Err(e) => tracing::debug!(error = %e, "standby: cannot read the store"),
    }
}

/// Renews the lease three times per TTL; reports it lost once no renewal
/// has been confirmed for a whole TTL (counted from when the last confirmed
/// one was sent, so the belief never outlives etcd's).
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    lost: watch::Sender<bool>,
    term: Shutdown,
) {
    let period = ttl / 3;
    let mut lease_client = client.lease_client();
    let mut stream = None;
    let mut confirmed = Instant::now();
    loop {
        if confirmed.elapsed() >= ttl {
            tracing::warn!(lease, "the etcd lease was not renewed within its TTL");
            let _ = lost.send(true);
            return;
        }
        let sent = Instant::now();
        let renewal = tokio::time::timeout(period, async {
            if stream.is_none() {
                stream = Some(lease_client.keep_alive(lease).await?);
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                return Ok(None);
            };
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match renewal {
            Ok(Ok(Some(response))) if response.ttl() > 0 => confirmed = sent,
            Ok(Ok(Some(_))) => {
                tracing::warn!(lease, "the etcd lease expired");
                let _ = lost.send(true);
                return;
            }
            _ => stream = None,
        }
        tokio::select! {
            () = term.triggered() => return,
            () = tokio::time::sleep(period.saturating_sub(sent.elapsed())) => {}
        }
    }
}

fn etcd_describe(etcd: &Etcd) -> String {
    use crate::store::Backend as _;
    etcd.describe()
}

fn unavailable(etcd: &Etcd, reason: &dyn std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        store: etcd_describe(etcd),
        reason: reason.to_string(),
    }
}

fn lease_lost(etcd: &Etcd) -> StoreError {
    unavailable(etcd, &"the leadership's lease was lost")
}
