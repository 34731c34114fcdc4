//! The container runtime: the engine as a container, through the Docker
//! Engine API (bollard; Podman's Docker-compatible socket too).
//!
//! What the process runtime does, a container does the same way: the same
//! command line (after the image's entrypoint, which is `vllm serve` or
//! vLLM's API server in `vllm/vllm-openai`: both take `--model`), the same
//! log file under the state directory (the container's output is copied
//! there), the same exit seen by the supervisor. And what a container
//! needs: the image pulled as `[container] pull` says, the engine's port
//! published on 127.0.0.1 only, `--ipc=host` or a shm size, the GPUs of
//! `engine.cuda_visible_devices` as device requests, a model cache shared by
//! every deployment (so a rollback does not download again), labels that
//! name the deployment, and secrets in the environment, never in the command
//! or the labels.
//!
//! The container is named after the engine port (`crossfade-engine-PORT`):
//! a restarted agent finds it by that name and its labels, and adopts it
//! without a reload. It outlives the agent by construction.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, LogsOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use crossfade_common::Shutdown;
use futures_util::StreamExt as _;

use super::runtime::{Engine, Exit, Identity, LaunchError, LaunchPlan, Runtime};
use crate::config::{Container as Settings, PullPolicy};

/// Label: the deployment the container runs.
pub const LABEL_DEPLOYMENT: &str = "io.crossfade.deployment";
/// Label: a hash of the engine's whole spec.
pub const LABEL_SPEC_HASH: &str = "io.crossfade.spec-hash";
/// Label: the worker whose agent started it.
pub const LABEL_WORKER: &str = "io.crossfade.worker";
/// Where the shared model cache is mounted in the container (`HF_HOME`).
const CACHE_IN_CONTAINER: &str = "/root/.cache/huggingface";
/// The longest one Docker call may take (a pull is not one call).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Engines as containers.
#[derive(Clone)]
pub struct ContainerRuntime {
    docker: Docker,
    settings: Settings,
    worker_id: String,
    shutdown: Shutdown,
}

impl fmt::Debug for ContainerRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerRuntime")
            .field("socket", &self.settings.socket)
            .field("image", &self.settings.image)
            .finish_non_exhaustive()
    }
}

impl ContainerRuntime {
    /// Connects to the engine at `[container] socket` and agrees on an API
    /// version; an engine that does not answer is an error that says where
    /// it was looked for.
    pub async fn connect(
        settings: &Settings,
        worker_id: &str,
        shutdown: &Shutdown,
    ) -> Result<Self, String> {
        let unreachable = |e: bollard::errors::Error| {
            format!(
                "no container engine answers at {} (container.socket): {e}",
                settings.socket
            )
        };
        let docker = Docker::connect_with_socket(
            &settings.socket,
            CALL_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(unreachable)?;
        let docker = tokio::time::timeout(CALL_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| format!("the container engine at {} did not answer", settings.socket))?
            .map_err(unreachable)?;
        Ok(Self {
            docker,
            settings: settings.clone(),
            worker_id: worker_id.to_owned(),
            shutdown: shutdown.clone(),
        })
    }

    /// The container of the engine on `port`.
    pub fn container_name(port: u16) -> String {
        format!("crossfade-engine-{port}")
    }

    fn engine(&self, name: String) -> ContainerEngine {
        ContainerEngine {
            name,
            preparing: Arc::new(Mutex::new(None)),
            pid: Arc::new(AtomicU32::new(0)),
            exit: Arc::new(Mutex::new(None)),
            docker: self.docker.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl Runtime for ContainerRuntime {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn launch(&self, plan: &LaunchPlan) -> Result<Box<dyn Engine>, LaunchError> {
        let log =
            super::runtime::private_log(&plan.log_path).map_err(|source| LaunchError::Log {
                path: plan.log_path.clone(),
                source,
            })?;
        let name = Self::container_name(plan.port);
        let engine = self.engine(name.clone());
        let (runtime, plan, exit) = (self.clone(), plan.clone(), Arc::clone(&engine.exit));
        let pid = Arc::clone(&engine.pid);
        let preparing = Arc::clone(&engine.preparing);
        set(&preparing, Some("creating the container".to_owned()));
        let stop = self.shutdown.clone();
        self.shutdown.spawn(async move {
            let mut log = log;
            let run = async {
                let created = runtime.create(&name, &plan, &mut log, &preparing).await;
                set(&preparing, None);
                created?;
                pid.store(
                    runtime.running_pid(&name).await.unwrap_or(0),
                    Ordering::Relaxed,
                );
                runtime.follow(&name, log).await
            };
            let ended = tokio::select! {
                ended = run => ended,
                // The agent stops; the container goes on (it outlives the
                // agent, which adopts it when it comes back).
                () = stop.triggered() => return,
            };
            let ended = match ended {
                Ok(code) => Exit {
                    code: Some(code),
                    signal: None,
                },
                Err(why) => {
                    append(&plan.log_path, &why);
                    Exit {
                        code: None,
                        signal: None,
                    }
                }
            };
            runtime.remove(&name).await;
            *exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended);
        });
        Ok(Box::new(engine))
    }

    fn adopt(&self, identity: &Identity) -> Option<Box<dyn Engine>> {
        if identity.container.is_empty() {
            return None;
        }
        let engine = self.engine(identity.container.clone());
        let (runtime, name, exit) = (
            self.clone(),
            identity.container.clone(),
            Arc::clone(&engine.exit),
        );
        let pid = Arc::clone(&engine.pid);
        let stop = self.shutdown.clone();
        // Adopted as recorded; if the container is gone, it is seen to have
        // ended at once, and the supervisor restarts the deployment.
        self.shutdown.spawn(async move {
            let waited = async {
                match runtime.running_pid(&name).await {
                    Some(running) => pid.store(running, Ordering::Relaxed),
                    None => return Err("not running".to_owned()),
                }
                runtime.wait(&name).await
            };
            let waited = tokio::select! {
                waited = waited => waited,
                () = stop.triggered() => return,
            };
            let code = waited.ok();
            if code.is_some() {
                runtime.remove(&name).await;
            }
            *exit.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Exit { code, signal: None });
        });
        Some(Box::new(engine))
    }
}

impl ContainerRuntime {
    /// Pulls the image as the policy says, then creates and starts the
    /// container (replacing a stale one of the same name).
    async fn create(
        &self,
        name: &str,
        plan: &LaunchPlan,
        log: &mut std::fs::File,
        preparing: &Mutex<Option<String>>,
    ) -> Result<(), String> {
        self.remove(name).await;
        self.ensure_image(self.image(plan), log, preparing).await?;
        set(preparing, Some("creating the container".to_owned()));
        let body = self.body(plan);
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        call(self.docker.create_container(Some(options), body))
            .await
            .map_err(|e| format!("cannot create the container {name}: {e}"))?;
        call(self.docker.start_container(name, None))
            .await
            .map_err(|e| format!("cannot start the container {name}: {e}"))?;
        Ok(())
    }

    /// The deployment's image, else `[container] image`.
    fn image<'a>(&'a self, plan: &'a LaunchPlan) -> &'a str {
        if plan.image.is_empty() {
            &self.settings.image
        } else {
            &plan.image
        }
    }

    /// The container's definition.
    fn body(&self, plan: &LaunchPlan) -> ContainerCreateBody {
        let port = format!("{}/tcp", plan.port);
        let mut env: Vec<String> = plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut binds = Vec::new();
        if let Some(cache) = &self.settings.cache_dir {
            binds.push(format!("{}:{CACHE_IN_CONTAINER}", cache.display()));
            env.push(format!("HF_HOME={CACHE_IN_CONTAINER}"));
        }
        let device_requests = self.settings.gpus.then(|| {
            let ids = crate::gpu::Visible::parse(&plan.gpus).entries().to_vec();
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: ids.is_empty().then_some(-1),
                device_ids: (!ids.is_empty()).then_some(ids),
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            }]
        });
        let labels: HashMap<String, String> = plan
            .labels
            .iter()
            .cloned()
            .chain([(LABEL_WORKER.to_owned(), self.worker_id.clone())])
            .collect();
        ContainerCreateBody {
            image: Some(self.image(plan).to_owned()),
            // After the image's entrypoint: `--model MODEL` rather than the
            // positional, which both of vLLM's entrypoints take.
            cmd: Some(container_args(&plan.args)),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port.clone()]),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    port,
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(plan.port.to_string()),
                    }]),
                )])),
                ipc_mode: self.settings.ipc_host.then(|| "host".to_owned()),
                shm_size: (!self.settings.ipc_host)
                    .then(|| i64::try_from(self.settings.shm_size).unwrap_or(i64::MAX)),
                binds: (!binds.is_empty()).then_some(binds),
                device_requests,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The image, present as `[container] pull` says; pull progress goes
    /// to the engine's log, and its sum to `preparing`.
    async fn ensure_image(
        &self,
        image: &str,
        log: &mut std::fs::File,
        preparing: &Mutex<Option<String>>,
    ) -> Result<(), String> {
        let present = call(self.docker.inspect_image(image)).await.is_ok();
        match (self.settings.pull, present) {
            (PullPolicy::Never, false) => {
                return Err(format!(
                    "the image {image} is not on this host, and container.pull is `never`"
                ));
            }
            (PullPolicy::Never | PullPolicy::IfNotPresent, true) => return Ok(()),
            (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {}
        }
        let _ = writeln!(log, "crossfade-agent: pulling {image}");
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        set(preparing, Some(format!("pulling {image}")));
        let mut progress = self.docker.create_image(Some(options), None, None);
        let mut pull = PullProgress::default();
        while let Some(step) = progress.next().await {
            match step {
                Ok(info) => {
                    pull.update(&info);
                    set(preparing, Some(pull.describe(image)));
                    // Byte counts change many times a second: the log gets
                    // each layer's steps, not its every chunk.
                    if let Some(status) = info.status.filter(|s| !is_chunk(s)) {
                        let layer = info.id.unwrap_or_default();
                        let _ = writeln!(log, "crossfade-agent: {status} {layer}");
                    }
                }
                Err(e) => return Err(format!("cannot pull {image}: {e}")),
            }
        }
        Ok(())
    }

    /// Copies the container's output to `log` until it ends; its exit code.
    async fn follow(&self, name: &str, mut log: std::fs::File) -> Result<i32, String> {
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut output = self.docker.logs(name, Some(options));
        while let Some(chunk) = output.next().await {
            match chunk {
                Ok(chunk) => {
                    let _ = log.write_all(&chunk.into_bytes());
                }
                Err(_) => break,
            }
        }
        self.wait(name).await
    }

    /// The host pid of the container's main process, while it runs.
    async fn running_pid(&self, name: &str) -> Option<u32> {
        let inspected = call(self.docker.inspect_container(name, None)).await.ok()?;
        let state = inspected.state?;
        if state.running != Some(true) {
            return None;
        }
        state.pid.and_then(|pid| u32::try_from(pid).ok())
    }

    /// Waits for the container to end: its exit code.
    async fn wait(&self, name: &str) -> Result<i32, String> {
        let options = WaitContainerOptions {
            condition: "not-running".into(),
        };
        match self.docker.wait_container(name, Some(options)).next().await {
            Some(Ok(done)) => Ok(i32::try_from(done.status_code).unwrap_or(-1)),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                Ok(i32::try_from(code).unwrap_or(-1))
            }
            Some(Err(e)) => Err(format!("cannot wait for the container {name}: {e}")),
            None => Err(format!("the container {name} vanished")),
        }
    }

    /// Removes the container, running or not; nothing when there is none.
    async fn remove(&self, name: &str) {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(e) = call(self.docker.remove_container(name, Some(options))).await
            && !matches!(
                e,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }
            )
        {
            tracing::warn!(container = name, error = %e, "cannot remove the container");
        }
    }
}

/// Sets what a launch is doing before its container runs.
fn set(preparing: &Mutex<Option<String>>, what: Option<String>) {
    *preparing.lock().unwrap_or_else(PoisonError::into_inner) = what;
}

/// Whether a pull status is a byte count's progress, not a layer's step.
fn is_chunk(status: &str) -> bool {
    matches!(status, "Downloading" | "Extracting")
}

/// An image pull's progress, summed over its layers from the engine's
/// messages.
#[derive(Debug, Default)]
struct PullProgress {
    /// By layer: bytes downloaded, bytes in all (0: not known yet), done.
    layers: BTreeMap<String, (u64, u64, bool)>,
}

impl PullProgress {
    fn update(&mut self, info: &bollard::models::CreateImageInfo) {
        let (Some(id), Some(status)) = (&info.id, &info.status) else {
            return;
        };
        // The first message names the tag, not a layer.
        if status.starts_with("Pulling from") {
            return;
        }
        let layer = self.layers.entry(id.clone()).or_default();
        let bytes = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        match status.as_str() {
            "Downloading" => {
                let detail = info.progress_detail.as_ref();
                layer.0 = bytes(detail.and_then(|d| d.current)).unwrap_or(layer.0);
                layer.1 = bytes(detail.and_then(|d| d.total)).unwrap_or(layer.1);
            }
            "Download complete" | "Verifying Checksum" | "Extracting" => layer.0 = layer.1,
            "Pull complete" | "Already exists" => {
                layer.0 = layer.1;
                layer.2 = true;
            }
            _ => {}
        }
    }

    fn describe(&self, image: &str) -> String {
        let done = self.layers.values().filter(|l| l.2).count();
        let current: u64 = self.layers.values().map(|l| l.0).sum();
        let total: u64 = self.layers.values().map(|l| l.1).sum();
        let mut line = format!(
            "pulling {image}: {done} of {} layers done",
            self.layers.len()
        );
        if total > 0 {
            line.push_str(&format!(
                ", {} of {} MB downloaded",
                current / 1_000_000,
                total / 1_000_000
            ));
        }
        line
    }
}

/// A running engine container.
struct ContainerEngine {
    name: String,
    /// What its launch does before the container runs.
    preparing: Arc<Mutex<Option<String>>>,
    /// The host pid of its main process, once it runs (0 before).
    pid: Arc<AtomicU32>,
    /// Set once the container has ended (or could not start).
    exit: Arc<Mutex<Option<Exit>>>,
    docker: Docker,
    shutdown: Shutdown,
}

impl fmt::Debug for ContainerEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerEngine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ContainerEngine {
    fn signal(&self, signal: &'static str) {
        let (docker, name) = (self.docker.clone(), self.name.clone());
        self.shutdown.spawn(async move {
            let options = KillContainerOptions {
                signal: signal.into(),
            };
            if let Err(e) = call(docker.kill_container(&name, Some(options))).await {
                tracing::debug!(container = name, signal, error = %e, "cannot signal the container");
            }
        });
    }
}

impl Engine for ContainerEngine {
    fn identity(&self) -> Identity {
        Identity {
            pid: self.pid.load(Ordering::Relaxed),
            start_ticks: 0,
            container: self.name.clone(),
        }
    }

    fn try_exit(&mut self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn terminate(&self) {
        self.signal("SIGTERM");
    }

    fn kill(&self) {
        self.signal("SIGKILL");
    }

    fn preparing(&self) -> Option<String> {
        self.preparing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One Docker call, bounded in time.
async fn call<T>(
    request: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, bollard::errors::Error> {
    tokio::time::timeout(CALL_TIMEOUT, request)
        .await
        .unwrap_or(Err(bollard::errors::Error::RequestTimeoutError))
}

/// The process runtime's arguments (`serve MODEL --host ...`) as the
/// container's command after the image's entrypoint: `--model MODEL ...`.
fn container_args(args: &[String]) -> Vec<String> {
    match args {
        [serve, model, rest @ ..] if serve == "serve" => ["--model".to_owned(), model.clone()]
            .into_iter()
            .chain(rest.iter().cloned())
            .collect(),
        other => other.to_vec(),
    }
}

/// Appends a line of the agent's own to the engine's log.
fn append(path: &PathBuf, line: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(file, "crossfade-agent: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(
        id: &str,
        status: &str,
        current: Option<i64>,
        total: Option<i64>,
    ) -> bollard::models::CreateImageInfo {
        bollard::models::CreateImageInfo {
            id: Some(id.into()),
            status: Some(status.into()),
            progress_detail: Some(bollard::models::ProgressDetail { current, total }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pull_sums_its_layers() {
        let mut pull = PullProgress::default();
        for step in [
            info("v0.11", "Pulling from vllm/vllm-openai", None, None),
            info("a", "Pulling fs layer", None, None),
            info("b", "Already exists", None, None),
            info("c", "Pulling fs layer", None, None),
            info("a", "Downloading", Some(1_000_000), Some(4_000_000)),
            info("c", "Downloading", Some(2_000_000), Some(6_000_000)),
        ] {
            pull.update(&step);
        }
        assert_eq!(
            pull.describe("vllm/vllm-openai:v0.11"),
            "pulling vllm/vllm-openai:v0.11: 1 of 3 layers done, 3 of 10 MB downloaded"
        );
        pull.update(&info("a", "Download complete", None, None));
        pull.update(&info("a", "Pull complete", None, None));
        assert_eq!(
            pull.describe("m"),
            "pulling m: 2 of 3 layers done, 6 of 10 MB downloaded"
        );
        assert!(is_chunk("Downloading") && !is_chunk("Pull complete"));
    }

    #[test]
    fn the_command_follows_the_images_entrypoint() {
        let args: Vec<String> = ["serve", "org/m", "--host", "0.0.0.0", "--port", "8100"]
            .map(str::to_owned)
            .into();
        assert_eq!(
            container_args(&args),
            ["--model", "org/m", "--host", "0.0.0.0", "--port", "8100"]
        );
    }
}
