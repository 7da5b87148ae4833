//! `ballast-lab`: the lab (`up`, `down`, `status`, and the hidden `serve` its servers run)
//! and the demo. `ballast lab ARGS...` and `ballast demo` run this binary.
use std::path::PathBuf;
use std::process::ExitCode;

use ballast_lab::LabCommand;
use clap::{Parser, Subcommand};

/// The ballast lab: a client, an ECMP router, load balancers and DSR backends in network
/// namespaces, with real servers (needs root).
#[derive(Parser)]
#[command(name = "ballast-lab", version, about)]
struct Cli {
    /// Accepted, as `ballast lab` accepted it, and ignored: a lab keeps its generations in
    /// its own run directory.
    #[arg(long, global = true, hide = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Lab(LabCommand),
    /// A self-contained demo in network namespaces (needs root).
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let done = match cli.command {
        Command::Lab(command) => ballast_lab::run(command),
        Command::Demo => ballast_lab::demo::run(),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ballast-lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_ballast_lab_accepted() {
        for args in [
            &["up"][..],
            &["up", "--name", "x", "--backends", "5", "--lbs", "2"],
            &["down", "--name", "x"],
            &["status"],
            &["status", "--name", "x", "--state-dir", "/tmp/ignored"],
            &["status", "--name", "x", "--json"],
            &["serve", "--netns", "n", "--name", "b1", "--tcp", "192.0.2.10:80", "--udp", "192.0.2.10:53"],
            &["demo"],
        ] {
            let parsed = Cli::try_parse_from([&["ballast-lab"], args].concat());
            assert!(parsed.is_ok(), "{args:?}: {:?}", parsed.err());
        }
        assert!(Cli::try_parse_from(["ballast-lab", "up", "--nope"]).is_err());
    }
}
