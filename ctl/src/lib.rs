//! `nodepulsectl`: node liveness and agent configuration straight on etcd, without Kubernetes.
//!
//! - [`watch`]: list then watch `/monitor/heartbeat/`, one line per node that comes alive or dies;
//! - [`nodes`]: the same table once;
//! - [`config`]: read, write (validated exactly as the agent validates) and delete
//!   `/monitor/config/<node>`.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod error;
pub mod nodes;
pub mod tracker;
pub mod watch;

use std::future::Future;
use std::time::Duration;

use nodepulse_etcd::EtcdArgs;

use crate::cli::{Command, ConfigCommand, GlobalArgs};
use crate::error::{Error, Result};

/// Text for people, or JSON for scripts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned tables and plain lines.
    #[default]
    Text,
    /// One JSON document per line.
    Json,
}

/// Runs one command to completion (`watch` runs until the process is stopped).
pub async fn run(global: GlobalArgs, command: Command) -> Result<()> {
    let stdout = std::io::stdout();
    let GlobalArgs {
        output,
        timeout,
        etcd,
        ..
    } = global;
    match command {
        Command::Completion { shell } => {
            cli::write_completion(shell, &mut stdout.lock());
            Ok(())
        }
        Command::Watch(args) => {
            let settings = watch::WatchSettings {
                output,
                verbose: args.verbose,
            };
            watch::run(&etcd, settings, stdout.lock()).await
        }
        Command::Nodes => {
            within(timeout, &etcd, async {
                let mut client = etcd.connect().await?;
                let list = nodes::list_heartbeats(&mut client).await?;
                nodes::print(list, output, stdout.lock())
            })
            .await
        }
        Command::Config(ConfigCommand::Get { node }) => {
            within(timeout, &etcd, async {
                let mut client = etcd.connect().await?;
                config::get(&mut client, &node, output, stdout.lock()).await
            })
            .await
        }
        Command::Config(ConfigCommand::Set(args)) => {
            let change = config::ConfigChange {
                interval: args.interval,
                metrics: args.metrics,
            };
            // Validation first: a refused value must not even need etcd to be up.
            change.apply_to(None)?;
            config::validate_nodes(&args.nodes)?;
            let targets = if args.all {
                config::Targets::AllWithHeartbeat
            } else {
                config::Targets::Nodes(args.nodes)
            };
            within(timeout, &etcd, async {
                let mut client = etcd.connect().await?;
                config::set(
                    &mut client,
                    targets,
                    &change,
                    stdout.lock(),
                    std::io::stderr(),
                )
                .await
            })
            .await
        }
        Command::Config(ConfigCommand::Delete { nodes }) => {
            config::validate_nodes(&nodes)?;
            within(timeout, &etcd, async {
                let mut client = etcd.connect().await?;
                config::delete(&mut client, &nodes, stdout.lock(), std::io::stderr()).await
            })
            .await
        }
    }
}

/// Bounds a one-shot command: with every endpoint down, etcd-client's balanced channel waits for
/// one to come back instead of failing, and a script wants an answer.
async fn within<T>(
    timeout: Duration,
    etcd: &EtcdArgs,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unreachable(format!(
                "etcd at {} did not answer within {timeout:?}",
                etcd.endpoints_display()
            )))
        })
}
