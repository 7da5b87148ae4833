//! Every clap type of the `ballast` command line, in one place.
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::kernel::loader::AttachMode;

/// ballast: an immutable eBPF/XDP layer-4 load balancer.
#[derive(Parser)]
#[command(name = "ballast", version, about)]
pub struct Cli {
    /// Where generations, records and the audit log are kept
    /// [default: $BALLAST_STATE_DIR or /var/lib/ballast].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build a generation artifact from a config and print its digest.
    Build {
        /// The TOML config.
        config: PathBuf,
        /// Where to write the artifact (a regular file, not the config; created 0600).
        #[arg(short, long)]
        output: PathBuf,
        /// Build it after this generation (the artifact that will run before it): with the
        /// lineage that gives flows whose slot changes owner a second chance. Build once, ship
        /// the same artifact to every load balancer that runs PREV.
        #[arg(long, value_name = "PREV")]
        after: Option<PathBuf>,
        /// Predecessors the lineage remembers (1 to 4), with --after.
        #[arg(long, default_value_t = crate::generation::lineage::DEFAULT_DEPTH, requires = "after")]
        lineage_depth: usize,
        /// Print the digest and a summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what a generation artifact (or config) contains.
    Inspect {
        /// An artifact or a TOML config.
        generation: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pre-flight a generation, load it frozen and attach it to an interface (replacing a
    /// pinned link that no longer serves it).
    Attach {
        #[command(flatten)]
        target: AttachCommandArgs,
    },
    /// Show the generation running on an interface, read back from the kernel.
    Status {
        #[command(flatten)]
        target: IfaceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Replace the running generation, atomically, after a pre-flight of the new one (the
    /// interface's MAC and MTU are read again; a generation running without a record is
    /// adopted first).
    Swap {
        /// A generation artifact or a TOML config, or `oci://REGISTRY/REPO[:TAG|@sha256:...]`.
        #[arg(required_unless_present = "settle")]
        generation: Option<PathBuf>,
        /// Swap in the settled form of what runs (same config, no lineage): flows whose slot
        /// changed owner lose their second chance (README "Second chance").
        #[arg(long, conflicts_with = "generation")]
        settle: bool,
        #[command(flatten)]
        target: ReplaceArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Push a generation artifact (and `FILE.sig`) to an OCI registry (README "Registries").
    Push {
        /// The artifact (`ballast build`).
        file: PathBuf,
        /// REGISTRY/REPO[:TAG].
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pull a generation artifact (and its signature) from an OCI registry, by tag or by
    /// digest (REGISTRY/REPO@sha256:...), every byte checked.
    Pull {
        /// REGISTRY/REPO[:TAG] or REGISTRY/REPO@sha256:...
        reference: String,
        /// Where to write the artifact (and FILE.sig).
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Return atomically to the previous generation, or to the one named.
    Rollback {
        #[command(flatten)]
        target: ReplaceArgs,
        /// A kept generation's digest, or a unique prefix of it.
        #[arg(long)]
        to: Option<String>,
    },
    /// Check what runs against the record: digests, map contents, frozen maps. Exit 0 only if all holds.
    Verify {
        #[command(flatten)]
        target: IfaceArgs,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail of an interface; `--verify` checks the whole log's hash chain instead.
    #[command(group(clap::ArgGroup::new("history_of").required(true).args(["iface", "verify"])))]
    History {
        #[command(flatten)]
        target: Option<IfaceArgs>,
        #[arg(long)]
        json: bool,
        /// Check the audit log's hash chain (every interface's entries): exit 0 only if intact.
        #[arg(long, conflicts_with_all = ["iface", "netns"])]
        verify: bool,
    },
    /// The daemon: attach (or adopt), health-check backends, swap in new generations on
    /// health changes and config reloads (SIGHUP or file change), serve metrics.
    #[command(mut_arg("config", |arg| arg.help(
        "The TOML config (not an artifact: the daemon needs the config's health checks, and reloads the file)",
    )))]
    Run {
        #[command(flatten)]
        target: AttachArgs,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Detach the generation on exit (by default it stays: immutable infrastructure).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Detach the generation running on an interface.
    Detach {
        #[command(flatten)]
        target: IfaceArgs,
    },
    /// Remove the pins of generations and decapsulators the kernel has detached because their
    /// interface (or its network namespace) was deleted; they hold programs and maps in memory.
    Prune {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Validate a config and show the generation it builds, without touching the kernel.
    Check {
        /// The TOML config.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print ballast's version and the sha256 digest of each eBPF program it carries.
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `ballast completions bash > /etc/bash_completion.d/ballast`.
    Completions { shell: clap_complete::Shell },
    /// The backend side: strip ballast's IPIP / IP6IP6 header on a backend's interface, and
    /// give second-chance (GUE) packets their second chance.
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// A self-contained demo in network namespaces (needs root; runs `ballast-lab demo`).
    Demo,
    /// A lab in network namespaces: client, router, load balancers, DSR backends (needs root;
    /// runs `ballast-lab`, see `ballast lab --help`).
    #[command(disable_help_flag = true)]
    Lab {
        /// up | down | status, and their flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The interface a command acts on.
#[derive(clap::Args)]
pub struct IfaceArgs {
    #[arg(long)]
    pub iface: String,
    /// Network namespace (as in `ip netns`) of the interface.
    #[arg(long)]
    pub netns: Option<String>,
}

/// Where and how a generation is attached.
#[derive(clap::Args)]
pub struct AttachArgs {
    /// A TOML config or a generation artifact (`ballast build`), or `oci://REGISTRY/REPO[:TAG|@sha256:...]`
    /// (attach only).
    #[arg(long, alias = "artifact")]
    pub config: PathBuf,
    #[command(flatten)]
    pub target: IfaceArgs,
    /// MAC of the next hop that routes toward the backends (aa:bb:cc:dd:ee:ff).
    #[arg(long)]
    pub gateway_mac: String,
    /// Fixed outer source address, one per family; without it the source is synthetic,
    /// derived from the flow (172.16.0.0/16, 100::/64).
    #[arg(long = "source")]
    pub sources: Vec<IpAddr>,
    #[arg(long, value_enum, default_value = "native")]
    pub mode: AttachMode,
}

/// `ballast attach`: where and how, and what it allows.
#[derive(clap::Args)]
pub struct AttachCommandArgs {
    #[command(flatten)]
    pub attach: AttachArgs,
    #[command(flatten)]
    pub allow: AllowArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach an OCI registry: `push`, `pull`, and a generation given as `oci://REF`.
#[derive(clap::Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to the registry (no TLS).
    #[arg(long)]
    pub plain_http: bool,
    /// A PEM file of CA certificates to trust for the registry, besides the system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The registry user (with --password-stdin); default: `~/.docker/config.json`'s auths.
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

/// What attach, swap and rollback refuse unless told.
#[derive(clap::Args)]
pub struct AllowArgs {
    /// Load a generation whose program is not the one this ballast carries (an artifact's
    /// digest proves only that it is whole, not who made its program).
    #[arg(long)]
    pub allow_foreign_program: bool,
    /// Accept an every-port (port 0) VIP on an address of this host: it captures all TCP (or
    /// UDP) to that address arriving on the interface, SSH included.
    #[arg(long)]
    pub allow_every_port_vip_on_host_address: bool,
}

/// The interface a swap or rollback replaces the generation of, and the host parameters it
/// changes (the interface's MAC and MTU are always read again).
#[derive(clap::Args)]
pub struct ReplaceArgs {
    #[command(flatten)]
    pub target: IfaceArgs,
    /// A new gateway MAC (the next hop toward the backends); default: the recorded one.
    #[arg(long)]
    pub gateway_mac: Option<String>,
    /// A new fixed outer source address, for its family; default: the recorded ones.
    #[arg(long = "source")]
    pub sources: Vec<IpAddr>,
    /// Drop the recorded fixed outer sources: synthetic sources derived from the flow (a
    /// --source given too still fixes its family).
    #[arg(long)]
    pub synthetic_source: bool,
    /// Predecessors the incoming generation remembers for the second chance (0 to 4; 0:
    /// swap it in exactly as given). A generation built with --after keeps its own.
    #[arg(long, default_value_t = crate::generation::lineage::DEFAULT_DEPTH)]
    pub lineage_depth: usize,
    #[command(flatten)]
    pub allow: AllowArgs,
}

#[derive(Subcommand)]
pub enum DecapAction {
    /// Attach the decapsulator to an interface.
    Attach {
        #[command(flatten)]
        target: IfaceArgs,
        /// Decapsulate packets to this address (repeatable); default: the interface's own
        /// addresses (not loopback or link-local).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "native")]
        mode: AttachMode,
    },
    /// Detach the decapsulator from an interface.
    Detach {
        #[command(flatten)]
        target: IfaceArgs,
    },
    /// Show the decapsulator's counters on an interface.
    Status {
        #[command(flatten)]
        target: IfaceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Serve the decapsulator's counters as Prometheus metrics at http://ADDR/metrics until
    /// SIGTERM or SIGINT.
    Metrics {
        #[command(flatten)]
        target: IfaceArgs,
        /// Where to listen (in the interface's network namespace), e.g. 127.0.0.1:9465.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_passes_its_arguments_through() {
        let cli = Cli::try_parse_from(["ballast", "lab", "up", "--name", "x", "--lbs", "2"]);
        match cli.map(|cli| cli.command) {
            Ok(Command::Lab { args }) => assert_eq!(args, ["up", "--name", "x", "--lbs", "2"]),
            _ => panic!("`ballast lab up ...` did not parse as the lab command"),
        }
    }
}
