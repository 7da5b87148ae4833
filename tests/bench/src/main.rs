//! The benchmark's binary: `cargo xtask bench [--quick] [--json FILE]` runs it (release
//! build for full runs). The work is in the `ballast_bench` library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Measures ballast: per-packet cost, forwarding rate, control plane, kernel memory.
#[derive(Parser)]
struct Args {
    /// CI smoke mode: few iterations, a few seconds.
    #[arg(long)]
    quick: bool,
    /// Also write every figure to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    match ballast_bench::run_and_report(ballast_bench::Options { quick: args.quick, build }, args.json.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}
