//! The command line: `nodepulsectl watch | nodes | config get|set|delete | completion SHELL`.

use std::time::Duration;

use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use nodepulse_etcd::EtcdArgs;
use nodepulse_runtime::LogFormat;
use nodepulse_runtime::parse_duration;

use crate::OutputFormat;
use crate::error::EXIT_CODES_HELP;
use crate::exit_codes_help;

/// Watch node liveness and push agent configuration, straight on etcd.
///
/// `watch` lists and watches /monitor/heartbeat/ and prints `Node worker-1 Alive` /
/// `Node worker-1 Dead (heartbeat expired)` as agents come and go; `config set` writes
/// /monitor/config/<node>, which the agent applies at once. The etcd connection, output and
/// timeout flags (or their environment variables) go before or after the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "nodepulsectl",
    version,
    after_help = concat!(
        "Examples:
  # The nodes alive now, then each one that comes alive or dies
  nodepulsectl watch --etcd-endpoints https://etcd-0.etcd-service.etcd.svc:2379 \\
    --etcd-ca-file ca.crt --etcd-cert-file client.crt --etcd-key-file client.key
  # Sample worker-1 every 2 s, CPU and memory only; the agent applies it at once
  nodepulsectl config set worker-1 --interval 2 --metrics cpu,memory
  # Completion for bash (also zsh, fish)
  source <(nodepulsectl completion bash)

",
        exit_codes_help!()
    ),
    // Connection flags anywhere on the line, as etcdctl and kubectl take them.
    mut_args = |arg: clap::Arg| arg.global(true)
)]
pub struct Cli {
    /// Flags every subcommand takes.
    #[command(flatten)]
    pub global: GlobalArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes, before or after its name.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Format of the diagnostics written to stderr (filter them with RUST_LOG, default info).
    #[arg(long, env = "NODEPULSE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// `text` for people; `json` for scripts: `watch` prints one object per line (`snapshot`,
    /// then `alive`/`dead` events, `updated` with -v), `nodes` an array of rows with each node's
    /// full heartbeat value, `config get` the raw value and the parsed one.
    #[arg(
        short,
        long,
        env = "NODEPULSECTL_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: OutputFormat,

    /// Give up when etcd has not answered within this time (exit code 1); `watch` waits for
    /// etcd instead.
    #[arg(long, env = "NODEPULSECTL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// What to do; each subcommand takes the global flags too.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the nodes alive now, then one timestamped line per node that comes alive or dies
    /// (runs until Ctrl-C; survives etcd restarts).
    #[command(after_help = concat!(
        "Examples:
  # Alive and Dead as they happen
  nodepulsectl watch
  # ...with each heartbeat's figures too, as JSON lines for a script
  nodepulsectl watch -v -o json

",
        exit_codes_help!()
    ))]
    Watch(WatchArgs),
    /// Print the nodes alive now (every node with a heartbeat key) and exit.
    #[command(after_help = concat!(
        "Examples:
  nodepulsectl nodes
  # Every node's full heartbeat value
  nodepulsectl nodes -o json

",
        exit_codes_help!()
    ))]
    Nodes,
    /// Read, write or delete a node's configuration key /monitor/config/<node>.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Config(ConfigCommand),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish or powershell).
    ///
    /// bash: `source <(nodepulsectl completion bash)`, or write it to
    /// /etc/bash_completion.d/nodepulsectl. zsh: `nodepulsectl completion zsh >
    /// "${fpath[1]}/_nodepulsectl"`. fish: `nodepulsectl completion fish >
    /// ~/.config/fish/completions/nodepulsectl.fish`.
    Completion {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Writes the completion script of `shell` for nodepulsectl's whole command line to `out`.
pub fn write_completion(shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "nodepulsectl", out);
}

/// `nodepulsectl watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Also print heartbeat value updates of nodes already alive (usage figures, applied config).
    #[arg(short, long, env = "NODEPULSECTL_VERBOSE")]
    pub verbose: bool,
}

/// `nodepulsectl config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print /monitor/config/<node>: the value, whether the agent accepts it, who wrote it.
    #[command(after_help = concat!(
        "Examples:
  nodepulsectl config get worker-1

",
        exit_codes_help!()
    ))]
    Get {
        /// Whose key to print.
        node: String,
    },
    /// Write /monitor/config/<node> for some nodes or all; the agents apply it at once.
    ///
    /// The value is checked by the same code the agent runs (interval 1..3600 seconds, metrics
    /// from cpu, memory, disk, network, load) before anything is written: a refused value exits
    /// with code 2 and the reason, and writes nothing. A flag left out keeps the node's current
    /// value (or the default: interval 10, all five metrics). Keys written here carry no
    /// `managedBy` marker, so the controller leaves them alone; overwriting a key it managed prints
    /// a warning (`config delete` hands the node back to the controller).
    #[command(
        after_help = concat!(
            "Examples:
  # worker-1 and worker-2 every 2 s, their metrics as they were
  nodepulsectl config set worker-1 worker-2 --interval 2
  # Every node with a heartbeat now: CPU and load only
  nodepulsectl config set --all --metrics cpu,load

",
            exit_codes_help!()
        ),
        group(ArgGroup::new("change").required(true).multiple(true).args(["interval", "metrics"]))
    )]
    Set(ConfigSetArgs),
    /// Delete /monitor/config/<node>: the agents go back to the defaults.
    #[command(after_help = concat!(
        "Examples:
  # worker-1 back to the defaults, or to what the controller's MonitorConfigs say
  nodepulsectl config delete worker-1

",
        exit_codes_help!()
    ))]
    Delete {
        /// The nodes whose key to delete.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Parses `line`, words split at spaces, as the words after `nodepulsectl`.
    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nodepulsectl").chain(line.split_whitespace()))
    }

    #[test]
    fn set_needs_targets_and_a_change() {
        assert!(parse("config set w1 --interval 2").is_ok());
        assert!(parse("config set --all --metrics cpu").is_ok());
        assert!(parse("config set --interval 2").is_err());
        assert!(parse("config set w1").is_err());
        assert!(parse("config set w1 --all --interval 2").is_err());
        // A negative interval reaches the validator (and its message) instead of clap.
        assert!(parse("config set w1 --interval -1").is_ok());
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let endpoint = "http://127.0.0.1:1";
        let lines = [
            format!("--etcd-endpoints {endpoint} -o json --timeout 3s config set n1 --interval 2"),
            format!("config --etcd-endpoints {endpoint} set -o json n1 --interval 2 --timeout 3s"),
            format!("config set n1 --interval 2 --etcd-endpoints {endpoint} --timeout 3s -o json"),
        ];
        for line in lines {
            let cli = parse(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(cli.global.etcd.endpoints, [endpoint], "{line:?}");
            assert_eq!(cli.global.output, OutputFormat::Json, "{line:?}");
            assert_eq!(cli.global.timeout, Duration::from_secs(3), "{line:?}");
        }
    }
}
