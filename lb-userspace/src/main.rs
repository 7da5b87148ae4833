//! The `ballast` command line.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use ballast::{
    artifact::{load_generation_file, Artifact},
    attach::{self, AttachMode, AttachRequest},
    config::Config,
    daemon, decap, demo,
    generation::{describe, Generation},
    generations::{self, Change, Swapped, Target},
    inspect,
    loader::EBPF_OBJECT,
    pins::{self, Stale},
    state::StateDir,
    status,
};
use clap::{Parser, Subcommand};

/// ballast: an immutable eBPF/XDP layer-4 load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Where generations, records and the audit log are kept
    /// [default: $BALLAST_STATE_DIR or /var/lib/ballast].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a generation artifact from a config and print its digest.
    Build {
        /// The TOML config.
        config: PathBuf,
        /// Where to write the artifact.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Show what a generation artifact (or config) contains.
    Inspect {
        /// An artifact or a TOML config.
        generation: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pre-flight a generation, load it frozen and attach it to an interface.
    Attach {
        #[command(flatten)]
        target: AttachArgs,
    },
    /// Show the generation running on an interface, read back from the kernel.
    Status {
        #[command(flatten)]
        target: IfaceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Replace the running generation, atomically, after a pre-flight of the new one.
    Swap {
        /// A generation artifact or a TOML config.
        generation: PathBuf,
        #[command(flatten)]
        target: IfaceArgs,
    },
    /// Return atomically to the previous generation, or to the one named.
    Rollback {
        #[command(flatten)]
        target: IfaceArgs,
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
    /// The audit trail of an interface.
    History {
        #[command(flatten)]
        target: IfaceArgs,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: attach (or adopt), health-check backends, swap in new generations on
    /// health changes and config reloads (SIGHUP or file change), serve metrics.
    Run {
        #[command(flatten)]
        target: AttachArgs,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
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
    },
    /// Validate a config and show the generation it builds, without touching the kernel.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// The backend side: strip ballast's IPIP / IP6IP6 header on a backend's interface.
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// A self-contained demo in network namespaces (needs root).
    Demo,
    /// A lab in network namespaces: client, router, load balancers, DSR backends (needs root).
    Lab {
        #[command(subcommand)]
        action: ballast::lab::LabCommand,
    },
}

/// The interface a command acts on.
#[derive(clap::Args)]
struct IfaceArgs {
    #[arg(long)]
    iface: String,
    /// Network namespace (as in `ip netns`) of the interface.
    #[arg(long)]
    netns: Option<String>,
}

impl IfaceArgs {
    /// Enters the network namespace, if any, and returns the interface name.
    fn enter(self) -> anyhow::Result<String> {
        attach::enter_netns(self.netns.as_deref())?;
        Ok(self.iface)
    }
}

/// Where and how a generation is attached.
#[derive(clap::Args)]
struct AttachArgs {
    /// A TOML config or a generation artifact (`ballast build`).
    #[arg(long, alias = "artifact")]
    config: PathBuf,
    #[command(flatten)]
    target: IfaceArgs,
    /// MAC of the next hop that routes toward the backends (aa:bb:cc:dd:ee:ff).
    #[arg(long)]
    gateway_mac: String,
    /// Fixed outer source address, one per family; without it the source is synthetic,
    /// derived from the flow (172.16.0.0/16, 100::/64).
    #[arg(long = "source")]
    sources: Vec<IpAddr>,
    #[arg(long, value_enum, default_value = "native")]
    mode: AttachMode,
}

impl AttachArgs {
    /// Enters the network namespace, if any, and returns the request.
    fn enter(self) -> anyhow::Result<AttachRequest> {
        let iface = self.target.enter()?;
        Ok(AttachRequest {
            generation: self.config,
            iface,
            gateway_mac: self.gateway_mac,
            sources: self.sources,
            mode: self.mode,
        })
    }
}

#[derive(Subcommand)]
enum DecapAction {
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon reports what it does; one-shot commands print their results instead.
    let default_level = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).init();
    match run(cli.state_dir.as_deref(), cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ballast: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(state_dir: Option<&Path>, command: Command) -> anyhow::Result<()> {
    let state = || StateDir::open(state_dir);
    match command {
        Command::Build { config, output } => {
            let artifact = Artifact::build(&Config::load(&config)?, EBPF_OBJECT)?;
            artifact.write(&output)?;
            println!("{}", artifact.digest_string());
        }
        Command::Inspect { generation, json } => {
            let report = inspect::inspect(&load_generation_file(&generation)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).context("rendering JSON")?);
            } else {
                print!("{}", inspect::render(&report));
            }
        }
        Command::Attach { target } => {
            let state = state()?;
            let request = target.enter()?;
            let attached = attach::attach(&state, &request)?;
            println!(
                "attached {} to {}: {} VIPs, {} backends, pre-flight {} packets ok; pinned in {}",
                attached.digest,
                request.iface,
                attached.vips,
                attached.backends,
                attached.preflight_packets,
                attached.pin_dir.display()
            );
        }
        Command::Swap { generation, target } => {
            let state = state()?;
            let artifact = load_generation_file(&generation)?;
            let iface = target.enter()?;
            report_swap(
                &iface,
                &generations::swap(&state, &Target::new(&iface)?, &artifact, &Change::command("swap"))?,
            );
        }
        Command::Rollback { target, to } => {
            let state = state()?;
            let iface = target.enter()?;
            report_swap(&iface, &generations::rollback(&state, &Target::new(&iface)?, to.as_deref())?);
        }
        Command::Verify { target, json } => {
            let state = state()?;
            let iface = target.enter()?;
            let verification = generations::verify(&state, &Target::new(&iface)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verification).context("rendering JSON")?);
            } else {
                for check in &verification.checks {
                    println!("{:<4} {:<22} {}", if check.ok { "ok" } else { "FAIL" }, check.what, check.detail);
                }
            }
            if !verification.ok() {
                anyhow::bail!("verification of {iface} failed");
            }
            println!("verified: {} runs as recorded", verification.running.as_deref().unwrap_or("?"));
        }
        Command::History { target, json } => {
            let state = state()?;
            let iface = target.enter()?;
            let entries = state.history(&Target::new(&iface)?.key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries).context("rendering JSON")?);
            } else {
                for e in &entries {
                    let short =
                        |d: &Option<String>| d.as_deref().map_or("-".to_owned(), |d| d.chars().take(19).collect());
                    let reason = e.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                    println!(
                        "{:.3}  {:<9} {} -> {}  {}{reason}",
                        e.time,
                        e.action,
                        short(&e.from),
                        short(&e.to),
                        e.result
                    );
                }
            }
        }
        Command::Status { target, json } => {
            let iface = target.enter()?;
            let status = status::status(&iface)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status).context("rendering JSON")?);
            } else {
                print!("{}", status::render(&status));
            }
        }
        Command::Run { target, metrics, detach_on_exit } => {
            let state = state()?;
            let attach = target.enter()?;
            daemon::run(state, daemon::RunOptions { attach, metrics, detach_on_exit })?;
        }
        Command::Detach { target } => {
            let state = state()?;
            let iface = target.enter()?;
            let dir = attach::detach(&state, &iface)?;
            println!("detached from {iface}; removed {}", dir.display());
        }
        Command::Prune { dry_run } => {
            let stale = pins::prune(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for Stale { dir, what } in &stale {
                println!("{verb} {} ({what} detached: its interface is gone)", dir.display());
            }
            if stale.is_empty() {
                println!("nothing to prune: every pinned link is attached");
            }
        }
        Command::Check { config } => {
            let generation = Generation::build(&Config::load(&config)?)?;
            println!(
                "{}: valid; {} VIPs, {} backends, {} table entries",
                config.display(),
                generation.vip_count(),
                generation.backends.len(),
                generation.maglev.len()
            );
            for vip in &generation.config.vips {
                println!("  {}  table {}  backends {}", describe(vip), vip.table_size, vip.backends.len());
            }
        }
        Command::Decap { action } => run_decap(action)?,
        Command::Demo => demo::run()?,
        Command::Lab { action } => ballast::lab::run(action)?,
    }
    Ok(())
}

fn report_swap(iface: &str, swapped: &Swapped) {
    if let Some(note) = &swapped.recovered {
        println!("recovered: {note}");
    }
    println!(
        "{iface}: {} -> {} (pre-flight {} packets ok)",
        swapped.from.as_deref().unwrap_or("nothing"),
        swapped.to,
        swapped.preflight_packets
    );
}

fn run_decap(action: DecapAction) -> anyhow::Result<()> {
    match action {
        DecapAction::Attach { target, addresses, mode } => {
            let iface = target.enter()?;
            let addresses = decap::attach(&iface, &addresses, mode)?;
            let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
            println!("decapsulator attached to {iface} for {}", list.join(", "));
        }
        DecapAction::Detach { target } => {
            let iface = target.enter()?;
            decap::detach(&iface)?;
            println!("decapsulator detached from {iface}");
        }
        DecapAction::Status { target } => {
            let iface = target.enter()?;
            for (reason, count) in decap::counters(&iface)? {
                println!("{reason:<24} {count}");
            }
        }
    }
    Ok(())
}
