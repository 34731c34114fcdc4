//! The fleet's members and an endpoint's placement: `workers`, `routers`,
//! `aliases`, `selector`.

use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::output::{self, Output, print_message};
use crate::{get_endpoint, parse_label, rpc};

#[derive(clap::Subcommand)]
pub enum WorkersCommand {
    /// Every worker (the same as `crossfade workers`).
    List,
    /// Add an agent by its control address (`host:port`).
    Add {
        /// The agent's control address.
        address: String,
    },
    /// Remove a worker (its replica, if any, is replaced elsewhere first).
    Remove {
        /// Worker id or control address.
        worker: String,
    },
}

#[derive(clap::Subcommand)]
pub enum RoutersCommand {
    /// Every router, with the table version it acknowledged.
    List,
    /// Add a router by its control address (`host:port`).
    Add {
        /// The router's control address.
        address: String,
    },
    /// Stop pushing tables to a router.
    Remove {
        /// The router's control address.
        address: String,
    },
}

/// `selector`'s changes: only what a flag names changes.
#[derive(clap::Args)]
pub struct SelectorChange {
    /// Require this label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Stop requiring this label KEY (repeatable).
    #[arg(long = "remove-label")]
    remove_labels: Vec<String>,
    /// Require a GPU whose name contains this (`""` for any).
    #[arg(long)]
    gpu_name_contains: Option<String>,
    /// Require at least this much memory per GPU, in GiB (0 for any).
    #[arg(long)]
    min_gpu_memory_gib: Option<u64>,
    /// Require at least this many GPUs (0 for any).
    #[arg(long)]
    min_gpu_count: Option<u32>,
}

/// `workers [list|add|remove]`.
pub async fn workers(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    command: Option<WorkersCommand>,
) -> anyhow::Result<()> {
    match command.unwrap_or(WorkersCommand::List) {
        WorkersCommand::List => {
            let workers = client
                .list_workers(v1::ListWorkersRequest {
                    endpoint: String::new(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.ListWorkersResponse", &workers)?,
                Output::Text => output::workers_table(&workers.workers),
            }
        }
        WorkersCommand::Add { address } => {
            let w = client
                .add_worker(v1::AddWorkerRequest {
                    control_address: address,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            output::print_worker(out, &w)?;
        }
        WorkersCommand::Remove { worker } => {
            let removed = client
                .remove_worker(v1::RemoveWorkerRequest { worker_id: worker })
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.RemoveWorkerResponse", &removed)?,
                Output::Text if removed.replica_replaced => {
                    println!("removed; its replica is being replaced elsewhere")
                }
                Output::Text => println!("removed"),
            }
        }
    }
    Ok(())
}

/// `routers list|add|remove`.
pub async fn routers(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    command: RoutersCommand,
) -> anyhow::Result<()> {
    match command {
        RoutersCommand::List => {
            let routers = client
                .list_routers(v1::ListRoutersRequest {})
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.ListRoutersResponse", &routers)?,
                Output::Text => output::routers_table(&routers),
            }
        }
        RoutersCommand::Add { address } => {
            let router = client
                .add_router(v1::AddRouterRequest {
                    control_address: address,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.Router", &router)?,
                Output::Text => output::routers_table(&v1::ListRoutersResponse {
                    routers: vec![router],
                    table_version: 0,
                }),
            }
        }
        RoutersCommand::Remove { address } => {
            let removed = client
                .remove_router(v1::RemoveRouterRequest {
                    control_address: address,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            match out {
                Output::Json => print_message("crossfade.v1.RemoveRouterResponse", &removed)?,
                Output::Text => println!("removed"),
            }
        }
    }
    Ok(())
}

/// `aliases`: shows them, after adding and removing the names given.
pub async fn aliases(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    endpoint: String,
    add: Vec<String>,
    remove: Vec<String>,
) -> anyhow::Result<()> {
    // The coordinator applies the changes to the aliases it holds, so two
    // operators adding at once lose neither name.
    let e = if add.is_empty() && remove.is_empty() {
        get_endpoint(client, &endpoint).await?
    } else {
        client
            .update_aliases(v1::UpdateAliasesRequest {
                name: endpoint,
                aliases: Vec::new(),
                add,
                remove,
            })
            .await
            .map_err(rpc)?
            .into_inner()
    };
    match out {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "name": e.name, "aliases": e.aliases })
        ),
        Output::Text => e.aliases.iter().for_each(|a| output::say!("{a}")),
    }
    Ok(())
}

/// `selector`: shows it, after the changes the flags name.
pub async fn selector(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    endpoint: String,
    change: SelectorChange,
) -> anyhow::Result<()> {
    let SelectorChange {
        labels,
        remove_labels,
        gpu_name_contains,
        min_gpu_memory_gib,
        min_gpu_count,
    } = change;
    let changes = !labels.is_empty()
        || !remove_labels.is_empty()
        || gpu_name_contains.is_some()
        || min_gpu_memory_gib.is_some()
        || min_gpu_count.is_some();
    // Only what the flags name changes, applied by the coordinator to the
    // selector it holds (no lost update between two operators).
    let e = if changes {
        client
            .update_worker_selector(v1::UpdateWorkerSelectorRequest {
                name: endpoint,
                selector: None,
                update: Some(v1::WorkerSelectorUpdate {
                    labels: labels.into_iter().collect(),
                    remove_labels,
                    gpu_name_contains,
                    min_gpu_memory_bytes: min_gpu_memory_gib.map(|gib| gib.saturating_mul(1 << 30)),
                    min_gpu_count,
                }),
            })
            .await
            .map_err(rpc)?
            .into_inner()
    } else {
        get_endpoint(client, &endpoint).await?
    };
    let selector = e.selector.unwrap_or_default();
    match out {
        Output::Json => print_message("crossfade.v1.WorkerSelector", &selector)?,
        Output::Text => output::print_selector(&selector),
    }
    Ok(())
}
