//! `crossfade [--coordinator URL] [--ca/--cert/--key FILE] [-o json] <command>`: the command line
//! over the Coordinator service, and `crossfade demo`, a whole fleet on
//! 127.0.0.1.
//!
//! The same binary carries the other programs for the demo (hidden
//! commands: `serve` is fake-vllm, `__router`, `__agent`, `__coordinator`),
//! so that `cargo run --bin crossfade -- demo` needs nothing else built.

mod certs;
mod connection;
mod demo;
mod fleet;
mod keys;
mod output;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::output::{Output, print_endpoint, print_message};

/// crossfade: move a live LLM endpoint from one model or vLLM configuration
/// to the next without dropping a request.
#[derive(Parser)]
#[command(name = "crossfade", version)]
struct Cli {
    #[command(flatten)]
    connect: connection::ConnectArgs,
    /// `text` (tables, live views) or `json` (for scripts and pipelines).
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "text",
        global = true
    )]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A private CA for the fleet's mutual TLS, and certificates that name
    /// their role (`certs init`, `certs issue --role agent --name gpu-07`).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// The router's API keys: add (printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Create, show, list or delete endpoints.
    Endpoint {
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Promote a new template (or a kept deployment: a rollback).
    Promote {
        /// The endpoint.
        endpoint: String,
        /// A template file (TOML: runtime, model, vllm_args, [env]).
        #[arg(
            long,
            conflicts_with = "deployment",
            required_unless_present = "deployment"
        )]
        template: Option<PathBuf>,
        /// A kept deployment's id, to roll back to it.
        #[arg(long)]
        deployment: Option<String>,
        /// Draw the promotion live; exit with its outcome (0 SUCCEEDED, 1
        /// FAILED, 2 CANCELED, 3 for --timeout or an error of its own),
        /// reconnecting when the coordinator restarts.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (`90s`, `30m`), exit 3.
        #[arg(long, value_parser = humantime::parse_duration, requires = "watch")]
        timeout: Option<std::time::Duration>,
    },
    /// An endpoint's deployments, promotion, replicas and events.
    Status {
        /// The endpoint.
        endpoint: String,
        /// Redraw on every change, reconnecting when the coordinator
        /// restarts; with no promotion under way, wait for the next. Exits
        /// with the promotion's outcome (0 SUCCEEDED, 1 FAILED, 2 CANCELED,
        /// 3 for --timeout or an error of its own).
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (`90s`, `30m`), exit 3.
        #[arg(long, value_parser = humantime::parse_duration, requires = "watch")]
        timeout: Option<std::time::Duration>,
    },
    /// Take no new step (a step under way finishes).
    Pause {
        /// The endpoint.
        endpoint: String,
    },
    /// Take steps again.
    Resume {
        /// The endpoint.
        endpoint: String,
    },
    /// Move traffic back step by step, then CANCELED.
    Cancel {
        /// The endpoint.
        endpoint: String,
    },
    /// All traffic back to the old deployment at once.
    ForceCancel {
        /// The endpoint.
        endpoint: String,
    },
    /// All traffic to the candidate at once.
    ForceRollForward {
        /// The endpoint.
        endpoint: String,
    },
    /// Change the replica bounds or the autoscaling target; only the flags
    /// given change.
    Scale {
        /// The endpoint.
        endpoint: String,
        /// Fewest replicas.
        #[arg(long)]
        min: Option<u32>,
        /// Most replicas.
        #[arg(long)]
        max: Option<u32>,
        /// In-flight requests one replica should carry.
        #[arg(long)]
        target_in_flight: Option<u32>,
        /// Seconds of low load before replicas are removed.
        #[arg(long)]
        scale_down_delay_seconds: Option<u32>,
    },
    /// Change promotion settings (Baseten's names).
    Settings {
        /// The endpoint.
        endpoint: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Deployments and promotions, with their outcomes.
    History {
        /// The endpoint.
        endpoint: String,
    },
    /// Workers: list them (id, address, labels, GPUs and their health,
    /// in-flight, deployment), add or remove one.
    Workers {
        #[command(subcommand)]
        command: Option<fleet::WorkersCommand>,
    },
    /// Routers the coordinator pushes tables to: list, add, remove.
    Routers {
        #[command(subcommand)]
        command: fleet::RoutersCommand,
    },
    /// Other model names that route to an endpoint: show them, or add and
    /// remove some.
    Aliases {
        /// The endpoint.
        endpoint: String,
        /// A name to add (repeatable).
        #[arg(long)]
        add: Vec<String>,
        /// A name to remove (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Which workers an endpoint's replicas may run on: show it, or change
    /// it (only what the flags name changes).
    Selector {
        /// The endpoint.
        endpoint: String,
        #[command(flatten)]
        change: fleet::SelectorChange,
    },
    /// Keep a worker out of new assignments; its replica moves.
    Cordon {
        /// Worker id or control address.
        worker: String,
        /// Why, for the event history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Return a cordoned worker to service.
    Uncordon {
        /// Worker id or control address.
        worker: String,
    },
    /// A whole fleet on 127.0.0.1, promoted v1 → v2 under load.
    Demo(demo::DemoArgs),
    /// Shell completions, from the same definitions as the commands:
    /// `crossfade completions bash > /etc/bash_completion.d/crossfade`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The man page (roff), from the same definitions:
    /// `crossfade man > /usr/local/share/man/man1/crossfade.1`.
    Man,
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// Create an endpoint and start its first deployment.
    Create {
        /// The name clients send as `model`.
        name: String,
        /// The first deployment's template file.
        #[arg(long)]
        template: Option<PathBuf>,
        /// Fewest replicas.
        #[arg(long, default_value_t = 1)]
        min: u32,
        /// Most replicas.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// In-flight requests one replica should carry.
        #[arg(long, default_value_t = 32)]
        target_in_flight: u32,
        /// Other names clients may send as `model`.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Only workers with this label (KEY=VALUE), repeatable.
        #[arg(long = "selector", value_parser = parse_label)]
        selector: Vec<(String, String)>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// One endpoint.
    Get {
        /// The endpoint.
        name: String,
    },
    /// Every endpoint.
    List,
    /// Delete an endpoint, stopping its replicas.
    Delete {
        /// The endpoint.
        name: String,
        /// Even with a promotion under way.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args, Default)]
struct SettingsArgs {
    /// Step by step (true) or all at once (false).
    #[arg(long)]
    rolling_deploy: Option<bool>,
    /// 0..=50.
    #[arg(long)]
    max_surge_percent: Option<u32>,
    /// 0..=50.
    #[arg(long)]
    max_unavailable_percent: Option<u32>,
    /// 0..=3600.
    #[arg(long)]
    stabilization_time_seconds: Option<u32>,
    /// 0..=500.
    #[arg(long)]
    replica_overhead_percent: Option<u32>,
    /// What happens to old replicas at success.
    #[arg(long, value_enum)]
    promotion_cleanup_strategy: Option<Cleanup>,
    /// 1..=86400.
    #[arg(long)]
    drain_timeout_seconds: Option<u32>,
    /// 1..=86400.
    #[arg(long)]
    ready_timeout_seconds: Option<u32>,
    /// Points the candidate's failure rate may exceed the old deployment's
    /// by before the health gate fails it; 0..=100.
    #[arg(long)]
    health_gate_margin_percent: Option<u32>,
    /// Requests the candidate must serve before the health gate judges it;
    /// 1..=1000000.
    #[arg(long)]
    health_gate_min_requests: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
enum Cleanup {
    ScaleToZero,
    Keep,
    Deactivate,
}

impl SettingsArgs {
    fn update(&self) -> v1::PromotionSettingsUpdate {
        v1::PromotionSettingsUpdate {
            rolling_deploy: self.rolling_deploy,
            max_surge_percent: self.max_surge_percent,
            max_unavailable_percent: self.max_unavailable_percent,
            stabilization_time_seconds: self.stabilization_time_seconds,
            replica_overhead_percent: self.replica_overhead_percent,
            promotion_cleanup_strategy: self.promotion_cleanup_strategy.map(|c| {
                let strategy = match c {
                    Cleanup::ScaleToZero => v1::CleanupStrategy::ScaleToZero,
                    Cleanup::Keep => v1::CleanupStrategy::Keep,
                    Cleanup::Deactivate => v1::CleanupStrategy::Deactivate,
                };
                strategy as i32
            }),
            drain_timeout_seconds: self.drain_timeout_seconds,
            ready_timeout_seconds: self.ready_timeout_seconds,
            health_gate_margin_percent: self.health_gate_margin_percent,
            health_gate_min_requests: self.health_gate_min_requests,
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    // The programs the demo spawns from this same binary.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("serve") => {
            let rest = args
                .iter()
                .skip(1)
                .filter_map(|a| a.to_str().map(str::to_owned));
            return fake_vllm::cli::main_from(std::iter::once("fake-vllm".to_owned()).chain(rest));
        }
        Some(program @ ("__router" | "__agent" | "__coordinator")) => {
            let program = program.to_owned();
            args.remove(1);
            return match program.as_str() {
                "__router" => crossfade_router::cli::main_from(args),
                "__agent" => crossfade_agent::cli::main_from(args),
                _ => crossfade_coordinator::cli::main_from(args),
            };
        }
        _ => {}
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crossfade: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let connect = cli.connect.clone();
    let out = cli.output;
    let mut result = runtime.block_on(run(cli));
    // A standby refused a change: once, the same command to the leader it
    // names (the refused change did nothing).
    if let Some(follow) = result
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<FollowLeader>())
    {
        let url = connection::leader_url(&connect, &follow.0);
        eprintln!("crossfade: that coordinator is on standby; following the leader at {url}");
        let mut cli = Cli::parse();
        cli.connect.coordinator = Some(url);
        result = runtime.block_on(run(cli));
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            output::report_error(out, &e);
            ExitCode::FAILURE
        }
    }
}

/// A gRPC error as a user reads it: the coordinator's message names the
/// field and its range. A standby's refusal that names the leader is a
/// [`FollowLeader`].
fn rpc(e: tonic::Status) -> anyhow::Error {
    let leader = e
        .metadata()
        .get(crossfade_coordinator::error::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    match leader {
        Some(leader) if e.code() == tonic::Code::Unavailable => {
            FollowLeader(leader.to_owned()).into()
        }
        _ => output::RpcError::from(e).into(),
    }
}

/// A standby coordinator refused a change; the leader's API address.
#[derive(Debug, thiserror::Error)]
#[error("that coordinator is on standby; the leader is at {0}")]
struct FollowLeader(String);

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cli = match cli.command {
        Command::Demo(args) => return demo::run(args, cli.output).await,
        // Files only: no coordinator.
        Command::Certs { command } => {
            certs::run(command)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Keys { command } => {
            keys::run(command, cli.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "crossfade",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            use clap::CommandFactory as _;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
        command => Cli { command, ..cli },
    };
    let mut client = connection::connect(cli.connect.clone()).await?;
    let out = cli.output;
    match cli.command {
        // Handled above: they need no coordinator.
        Command::Demo(_)
        | Command::Certs { .. }
        | Command::Keys { .. }
        | Command::Completions { .. }
        | Command::Man => {}
        Command::Endpoint { command } => match command {
            EndpointCommand::Create {
                name,
                template,
                min,
                max,
                target_in_flight,
                aliases,
                selector,
                settings,
            } => {
                let template = template.map(|t| template::load(&t)).transpose()?;
                let endpoint = client
                    .create_endpoint(v1::CreateEndpointRequest {
                        name,
                        aliases,
                        template,
                        scaling: Some(v1::ScalingSettings {
                            min_replicas: min,
                            max_replicas: max,
                            target_in_flight_per_replica: target_in_flight,
                            scale_down_delay_seconds: 300,
                        }),
                        promotion_settings: Some(settings.update()),
                        selector: Some(v1::WorkerSelector {
                            labels: selector.into_iter().collect(),
                            ..Default::default()
                        }),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_endpoint(out, &endpoint)?;
            }
            EndpointCommand::Get { name } => {
                let endpoint = client
                    .get_endpoint(v1::GetEndpointRequest {
                        name,
                        event_limit: 10,
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_endpoint(out, &endpoint)?;
            }
            EndpointCommand::List => {
                let list = client
                    .list_endpoints(v1::ListEndpointsRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner();
                match out {
                    Output::Json => print_message("crossfade.v1.ListEndpointsResponse", &list)?,
                    Output::Text => output::endpoints_table(&list.endpoints),
                }
            }
            EndpointCommand::Delete { name, force } => {
                let deleted = client
                    .delete_endpoint(v1::DeleteEndpointRequest { name, force })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                match out {
                    Output::Json => print_message("crossfade.v1.DeleteEndpointResponse", &deleted)?,
                    Output::Text => {
                        println!("deleted; {} replica(s) stopping", deleted.replicas_stopped)
                    }
                }
            }
        },
        Command::Promote {
            endpoint,
            template,
            deployment,
            watch,
            timeout,
        } => {
            let target = match (template, deployment) {
                (Some(path), _) => v1::promote_request::Target::Template(template::load(&path)?),
                (None, Some(id)) => v1::promote_request::Target::DeploymentId(id),
                (None, None) => anyhow::bail!("--template or --deployment is required"),
            };
            let promoted = client
                .promote(v1::PromoteRequest {
                    endpoint: endpoint.clone(),
                    target: Some(target),
                    settings: None,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            if watch {
                return Ok(output::watch(
                    &mut client,
                    &endpoint,
                    out,
                    Some(&promoted.promotion_id),
                    timeout,
                )
                .await);
            }
            match out {
                Output::Json => print_message("crossfade.v1.PromoteResponse", &promoted)?,
                Output::Text => output::say!(
                    "promotion {} to deployment {} started; `crossfade status {endpoint} --watch` follows it",
                    promoted.promotion_id,
                    promoted.deployment_id
                ),
            }
        }
        Command::Status {
            endpoint,
            watch,
            timeout,
        } => {
            if watch {
                return Ok(output::watch(&mut client, &endpoint, out, None, timeout).await);
            }
            let e = client
                .get_endpoint(v1::GetEndpointRequest {
                    name: endpoint,
                    event_limit: 10,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_endpoint(out, &e)?;
        }
        command @ (Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Cancel { .. }
        | Command::ForceCancel { .. }
        | Command::ForceRollForward { .. }) => {
            let promotion = promotion_control(&mut client, command).await?;
            output::print_promotion(out, &promotion)?;
        }
        Command::Scale {
            endpoint,
            min,
            max,
            target_in_flight,
            scale_down_delay_seconds,
        } => {
            let e = client
                .update_scaling(v1::UpdateScalingRequest {
                    name: endpoint,
                    scaling: Some(v1::ScalingUpdate {
                        min_replicas: min,
                        max_replicas: max,
                        target_in_flight_per_replica: target_in_flight,
                        scale_down_delay_seconds,
                    }),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_endpoint(out, &e)?;
        }
        Command::Settings { endpoint, settings } => {
            let update = settings.update();
            let e = if update == v1::PromotionSettingsUpdate::default() {
                // No flag: show them.
                get_endpoint(&mut client, &endpoint).await?
            } else {
                client
                    .update_promotion_settings(v1::UpdatePromotionSettingsRequest {
                        name: endpoint,
                        settings: Some(update),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner()
            };
            let settings = e.promotion_settings.unwrap_or_default();
            match out {
                Output::Json => print_message("crossfade.v1.PromotionSettings", &settings)?,
                Output::Text => output::print_settings(&settings),
            }
        }
        Command::History { endpoint } => {
            let history = client
                .history(v1::HistoryRequest { endpoint, limit: 0 })
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.HistoryResponse", &history)?,
                Output::Text => output::history_table(&history),
            }
        }
        Command::Workers { command } => fleet::workers(&mut client, out, command).await?,
        Command::Routers { command } => fleet::routers(&mut client, out, command).await?,
        Command::Aliases {
            endpoint,
            add,
            remove,
        } => fleet::aliases(&mut client, out, endpoint, add, remove).await?,
        Command::Selector { endpoint, change } => {
            fleet::selector(&mut client, out, endpoint, change).await?;
        }
        Command::Cordon { worker, reason } => {
            let w = client
                .cordon_worker(v1::CordonWorkerRequest {
                    worker_id: worker,
                    reason,
                    evacuate: true,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            output::print_worker(out, &w)?;
        }
        Command::Uncordon { worker } => {
            let w = client
                .uncordon_worker(v1::UncordonWorkerRequest { worker_id: worker })
                .await
                .map_err(rpc)?
                .into_inner();
            output::print_worker(out, &w)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One endpoint, with its latest events.
async fn get_endpoint(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
) -> anyhow::Result<v1::Endpoint> {
    Ok(client
        .get_endpoint(v1::GetEndpointRequest {
            name: name.to_owned(),
            event_limit: 10,
        })
        .await
        .map_err(rpc)?
        .into_inner())
}

/// Pause, resume, cancel, force cancel or force roll forward.
async fn promotion_control(
    client: &mut CoordinatorClient<Channel>,
    command: Command,
) -> anyhow::Result<v1::Promotion> {
    let request = |endpoint: String| v1::PromotionControlRequest {
        endpoint,
        promotion_id: String::new(),
        reason: String::new(),
    };
    let answer = match command {
        Command::Pause { endpoint } => client.pause_promotion(request(endpoint)).await,
        Command::Resume { endpoint } => client.resume_promotion(request(endpoint)).await,
        Command::Cancel { endpoint } => client.cancel_promotion(request(endpoint)).await,
        Command::ForceCancel { endpoint } => client.force_cancel_promotion(request(endpoint)).await,
        Command::ForceRollForward { endpoint } => {
            client.force_roll_forward_promotion(request(endpoint)).await
        }
        _ => anyhow::bail!("not a promotion control"),
    };
    Ok(answer.map_err(rpc)?.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_the_man_page_come_from_the_same_definitions() {
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "crossfade",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        for word in ["force-roll-forward", "routers", "selector", "--timeout"] {
            assert!(bash.contains(word), "{word} not completed");
        }
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.starts_with(".ie"), "{}", &man[..80.min(man.len())]);
        assert!(man.contains(".TH crossfade"), "no title");
        assert!(
            man.contains("force\\-roll\\-forward"),
            "subcommands not listed"
        );
    }

    #[test]
    fn timeout_needs_watch_and_parses_human_durations() {
        let parsed =
            Cli::try_parse_from(["crossfade", "status", "chat", "--watch", "--timeout", "90s"])
                .unwrap();
        let Command::Status { timeout, .. } = parsed.command else {
            panic!("not status");
        };
        assert_eq!(timeout, Some(std::time::Duration::from_secs(90)));
        assert!(Cli::try_parse_from(["crossfade", "status", "chat", "--timeout", "90s"]).is_err());
        assert!(
            Cli::try_parse_from([
                "crossfade",
                "status",
                "chat",
                "--watch",
                "--timeout",
                "soon"
            ])
            .is_err()
        );
    }
}
