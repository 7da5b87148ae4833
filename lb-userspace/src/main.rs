//! The `ballast` command line.
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use ballast::{
    attach::{self, AttachMode, AttachRequest},
    config::Config,
    decap, demo,
    generation::{describe, Generation},
    status,
};
use clap::{Parser, Subcommand};

/// ballast: an immutable eBPF/XDP layer-4 load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a generation from a config, load it frozen and attach it to an interface.
    Attach {
        /// The TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The interface to attach to (one-arm: packets leave where they came in).
        #[arg(long)]
        iface: String,
        /// MAC of the next hop that routes toward the backends (aa:bb:cc:dd:ee:ff).
        #[arg(long)]
        gateway_mac: String,
        /// Fixed outer source address, one per family; without it the source is synthetic,
        /// derived from the flow (172.16.0.0/16, 100::/64).
        #[arg(long = "source")]
        sources: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "native")]
        mode: AttachMode,
        /// Network namespace (as in `ip netns`) of the interface.
        #[arg(long)]
        netns: Option<String>,
    },
    /// Show the generation running on an interface, read back from the kernel.
    Status {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Detach the generation running on an interface.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        netns: Option<String>,
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
}

#[derive(Subcommand)]
enum DecapAction {
    /// Attach the decapsulator to an interface.
    Attach {
        #[arg(long)]
        iface: String,
        /// Decapsulate packets to this address (repeatable); default: the interface's own
        /// addresses (not loopback or link-local).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "native")]
        mode: AttachMode,
        #[arg(long)]
        netns: Option<String>,
    },
    /// Detach the decapsulator from an interface.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        netns: Option<String>,
    },
    /// Show the decapsulator's counters on an interface.
    Status {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        netns: Option<String>,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ballast: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach { config, iface, gateway_mac, sources, mode, netns } => {
            attach::enter_netns(netns.as_deref())?;
            let request = AttachRequest { config, iface, gateway_mac, sources, mode };
            let attached = attach::attach(&request)?;
            println!(
                "attached to {}: {} VIPs, {} backends; pinned in {}",
                request.iface,
                attached.vips,
                attached.backends,
                attached.pin_dir.display()
            );
        }
        Command::Status { iface, netns, json } => {
            attach::enter_netns(netns.as_deref())?;
            let status = status::status(&iface)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status).context("rendering JSON")?);
            } else {
                print!("{}", status::render(&status));
            }
        }
        Command::Detach { iface, netns } => {
            attach::enter_netns(netns.as_deref())?;
            let dir = attach::detach(&iface)?;
            println!("detached from {iface}; removed {}", dir.display());
        }
        Command::Check { config } => {
            let generation = Generation::build(&Config::load(&config)?)?;
            println!("{}: valid; {} VIPs, {} backends, {} table entries", config.display(), generation.vip_count(), generation.backends.len(), generation.maglev.len());
            for vip in &generation.config.vips {
                println!("  {}  table {}  backends {}", describe(vip), vip.table_size, vip.backends.len());
            }
        }
        Command::Decap { action } => run_decap(action)?,
        Command::Demo => demo::run()?,
    }
    Ok(())
}

fn run_decap(action: DecapAction) -> anyhow::Result<()> {
    match action {
        DecapAction::Attach { iface, addresses, mode, netns } => {
            attach::enter_netns(netns.as_deref())?;
            let addresses = decap::attach(&iface, &addresses, mode)?;
            let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
            println!("decapsulator attached to {iface} for {}", list.join(", "));
        }
        DecapAction::Detach { iface, netns } => {
            attach::enter_netns(netns.as_deref())?;
            decap::detach(&iface)?;
            println!("decapsulator detached from {iface}");
        }
        DecapAction::Status { iface, netns } => {
            attach::enter_netns(netns.as_deref())?;
            for (reason, count) in decap::counters(&iface)? {
                println!("{reason:<24} {count}");
            }
        }
    }
    Ok(())
}
