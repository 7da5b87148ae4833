//! Project tasks, run as `cargo xtask <task>` (aliased in `.cargo/config.toml`).
//!
//! - `setup`: installs what a fresh Debian 12 machine needs to build and test ballast.
//! - `test`: setup, then build, every test, the benchmark's smoke mode and clippy; the command CI runs.
//! - `demo`: setup, then builds and runs `ballast demo`.
//! - `fuzz`, `soak`: setup, then the differential fuzzer's long mode and the swap soak (root).
//! - `bench`: setup, then measures ballast (per-packet cost, forwarding rate, control plane,
//!   kernel memory); `--quick` is the CI smoke mode.

mod bench;
mod fuzz;
mod process;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The eBPF crates only build for `bpfel-unknown-none`; the build scripts of lb-userspace and
/// ballast-bench compile them, so host-side workspace commands leave them out.
const EBPF_CRATES: [&str; 2] = ["lb-ebpf", "ballast-bench-ebpf"];

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "ballast's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything a fresh Debian 12 machine needs (the eBPF build's pinned nightly with
    /// rust-src, its LLVM, bpf-linker built against that LLVM, apt packages, bpffs); quick when
    /// already done.
    Setup,
    /// Setup, then build the workspace, run every test, the benchmark's smoke mode and clippy with warnings denied.
    Test {
        /// Arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Setup, then build and run `ballast demo` (needs root).
    Demo,
    /// Setup, then run the differential fuzzer (XDP program against the reference model) for
    /// as many frames as asked (needs root).
    Fuzz(fuzz::FuzzArgs),
    /// Setup, then send continuous traffic through two namespaces with a `ballast swap` every
    /// few seconds and report what was lost (needs root).
    Soak(fuzz::SoakArgs),
    /// Setup, then measure ballast: per-packet cost beside a baseline program, forwarding rate
    /// through veth, control-plane times and kernel memory (needs root). Prints markdown tables.
    Bench {
        /// CI smoke mode: few, short runs (seconds), debug user-space build.
        #[arg(long)]
        quick: bool,
        /// Also write every figure to this JSON file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// Errors print as one line (with their causes), not anyhow's backtrace.
fn main() -> ExitCode {
    let outcome = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo => demo(),
        Task::Fuzz(args) => fuzz::fuzz(&args),
        Task::Soak(args) => fuzz::soak(&args),
        Task::Bench { quick, json } => bench::run(quick, json.as_deref()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo <subcommand> --workspace` without the eBPF crates, run in the workspace root.
fn cargo_on_host_crates(subcommand: &str) -> Result<std::process::Command> {
    let mut command = process::cargo()?;
    command.args([subcommand, "--workspace"]);
    for crate_name in EBPF_CRATES {
        command.args(["--exclude", crate_name]);
    }
    Ok(command)
}

fn test(cargo_test_args: &[String]) -> Result<()> {
    setup::run()?;
    process::run(&mut cargo_on_host_crates("build")?)
        .context("xtask test: build failed; tests and clippy were not run")?;

    let mut cargo_test = cargo_on_host_crates("test")?;
    cargo_test.arg("--no-fail-fast").args(cargo_test_args).env("RUST_BACKTRACE", "1");
    let mut clippy = cargo_on_host_crates("clippy")?;
    clippy.args(["--all-targets", "--", "-D", "warnings"]);

    let outcomes = [
        ("tests", process::run(&mut cargo_test)),
        // The benchmark is not a test (no timing is asserted), but its smoke mode runs every
        // measurement path once so that it cannot rot.
        ("bench smoke", bench::run(true, None)),
        ("clippy", process::run(&mut clippy)),
    ];
    summarise(&outcomes)
}

/// Prints one line with every step's outcome; Err if any step failed.
fn summarise(outcomes: &[(&str, Result<()>)]) -> Result<()> {
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|(step, outcome)| outcome.as_ref().err().map(|error| format!("{step}: {error}")))
        .collect();
    let line: Vec<String> = outcomes
        .iter()
        .map(|(step, outcome)| format!("{step} {}", if outcome.is_ok() { "ok" } else { "FAILED" }))
        .collect();
    println!("xtask test: build ok, {}", line.join(", "));
    if !failures.is_empty() {
        bail!("xtask test failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Exits with `ballast demo`'s exit code.
fn demo() -> Result<()> {
    setup::run()?;
    // `ballast demo` runs `ballast-lab demo`, the lab's binary beside it (tests/lab): build both.
    let mut build = process::cargo()?;
    build.args(["build", "--package", "lb-userspace", "--package", "ballast-lab"]);
    process::run(&mut build).context("xtask demo: build failed")?;
    let mut ballast_demo = process::cargo()?;
    ballast_demo.args(["run", "--package", "lb-userspace", "--bin", "ballast", "--", "demo"]);
    let status = process::status_of(&mut ballast_demo)?;
    std::process::exit(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo_test() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "maglev", "--", "--nocapture"]);
        match cli.map(|cli| cli.task) {
            Ok(Task::Test { cargo_test_args }) => assert_eq!(cargo_test_args, ["maglev", "--", "--nocapture"]),
            _ => panic!("`test -- ...` did not parse as the test task"),
        }
    }

    #[test]
    fn bench_takes_quick_and_a_json_file() {
        match Cli::try_parse_from(["xtask", "bench", "--quick", "--json", "out.json"]).map(|cli| cli.task) {
            Ok(Task::Bench { quick, json }) => assert!(quick && json == Some(PathBuf::from("out.json"))),
            _ => panic!("`bench --quick --json out.json` did not parse as the bench task"),
        }
        assert!(matches!(
            Cli::try_parse_from(["xtask", "bench"]).map(|cli| cli.task),
            Ok(Task::Bench { quick: false, json: None })
        ));
    }
}
