//! The command line: `nodepulsectl watch | nodes | config get|set|delete`.

use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use nodepulse_crd::etcd::{EtcdArgs, parse_duration};
use nodepulse_crd::runtime::LogFormat;

use crate::OutputFormat;
use crate::error::EXIT_CODES_HELP;

/// Watch node liveness and push agent configuration, straight on etcd.
///
/// The lab's "server": `watch` lists and watches /monitor/heartbeat/ and prints
/// `Node worker-1 Alive` / `Node worker-1 Dead (heartbeat expired)` as agents come and go;
/// `config set` writes /monitor/config/<node>, which the agent applies at once. Every
/// subcommand takes the etcd connection flags (or their NODEPULSE_ETCD_* variables).
#[derive(Debug, Parser)]
#[command(name = "nodepulsectl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Format of the diagnostics written to stderr (filter them with RUST_LOG, default info).
    #[arg(
        long,
        env = "NODEPULSE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the nodes alive now, then one timestamped line per node that comes alive or dies
    /// (runs until Ctrl-C; survives etcd restarts).
    #[command(after_help = EXIT_CODES_HELP)]
    Watch(WatchArgs),
    /// Print the nodes alive now (every node with a heartbeat key) and exit.
    #[command(after_help = EXIT_CODES_HELP)]
    Nodes(NodesArgs),
    /// Read, write or delete a node's configuration key /monitor/config/<node>.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Config(ConfigCommand),
}

/// `nodepulsectl watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// `text`: a table, then `<time> Node <name> Alive|Dead (<reason>)` lines; `json`: one
    /// object per line (`snapshot`, then `alive`/`dead` events, `updated` with -v).
    #[arg(
        short,
        long,
        env = "NODEPULSECTL_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: OutputFormat,

    /// Also print heartbeat value updates of nodes already alive (usage figures, applied config).
    #[arg(short, long, env = "NODEPULSECTL_VERBOSE")]
    pub verbose: bool,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// `nodepulsectl nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// `text`: a table; `json`: an array of rows with each node's full heartbeat value.
    #[arg(
        short,
        long,
        env = "NODEPULSECTL_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: OutputFormat,

    /// Give up when etcd has not answered within this time (exit code 1).
    #[arg(long, env = "NODEPULSECTL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// `nodepulsectl config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print /monitor/config/<node>: the value, whether the agent accepts it, who wrote it.
    #[command(after_help = EXIT_CODES_HELP)]
    Get(ConfigGetArgs),
    /// Write /monitor/config/<node> for some nodes or all; the agents apply it at once.
    ///
    /// The value is checked by the same code the agent runs (interval 1..3600 seconds, metrics
    /// from cpu, memory, disk, network, load) before anything is written: a refused value exits
    /// with code 2 and the reason, and writes nothing. A flag left out keeps the node's current
    /// value (or the default: interval 10, all five metrics). Keys written here carry no
    /// `managedBy` marker, so the controller leaves them alone; overwriting a key it managed prints
    /// a warning (`config delete` hands the node back to the controller).
    #[command(
        after_help = EXIT_CODES_HELP,
        group(ArgGroup::new("change").required(true).multiple(true).args(["interval", "metrics"]))
    )]
    Set(ConfigSetArgs),
    /// Delete /monitor/config/<node>: the agents go back to the defaults.
    #[command(after_help = EXIT_CODES_HELP)]
    Delete(ConfigDeleteArgs),
}

/// `nodepulsectl config get`.
#[derive(Debug, Args)]
pub struct ConfigGetArgs {
    /// The node.
    pub node: String,

    /// `text`: one field per line; `json`: one object with the raw value and the parsed one.
    #[arg(
        short,
        long,
        env = "NODEPULSECTL_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: OutputFormat,

    /// Give up when etcd has not answered within this time (exit code 1).
    #[arg(long, env = "NODEPULSECTL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// `nodepulsectl config set`.
#[derive(Debug, Args)]
pub struct ConfigSetArgs {
    /// The nodes to configure.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub nodes: Vec<String>,

    /// Every node that has a heartbeat key now.
    #[arg(long)]
    pub all: bool,

    /// Sampling interval in whole seconds, 1 to 3600 (`2` or `2s`).
    #[arg(long, allow_hyphen_values = true)]
    pub interval: Option<String>,

    /// Metrics to collect, comma-separated, from cpu, memory, disk, network, load.
    #[arg(long)]
    pub metrics: Option<String>,

    /// Give up when etcd has not answered within this time (exit code 1).
    #[arg(long, env = "NODEPULSECTL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// `nodepulsectl config delete`.
#[derive(Debug, Args)]
pub struct ConfigDeleteArgs {
    /// The nodes whose key to delete.
    #[arg(required = true)]
    pub nodes: Vec<String>,

    /// Give up when etcd has not answered within this time (exit code 1).
    #[arg(long, env = "NODEPULSECTL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn set_needs_targets_and_a_change() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        assert!(parse(&["nodepulsectl", "config", "set", "w1", "--interval", "2"]).is_ok());
        assert!(parse(&["nodepulsectl", "config", "set", "--all", "--metrics", "cpu"]).is_ok());
        assert!(parse(&["nodepulsectl", "config", "set", "--interval", "2"]).is_err());
        assert!(parse(&["nodepulsectl", "config", "set", "w1"]).is_err());
        assert!(
            parse(&[
                "nodepulsectl",
                "config",
                "set",
                "w1",
                "--all",
                "--interval",
                "2"
            ])
            .is_err()
        );
        // A negative interval reaches the validator (and its message) instead of clap.
        assert!(parse(&["nodepulsectl", "config", "set", "w1", "--interval", "-1"]).is_ok());
    }
}
