//! The long modes of ballast's robustness tests (need root; not part of `xtask test`):
//! - `fuzz`: the differential fuzzer of `tests/integration/tests/fuzz.rs` (package
//!   `ballast-tests`: XDP program against the reference model) for as many frames as asked,
//!   reporting frames per second; a divergence is saved in `tests/integration/regressions/`;
//! - `soak`: continuous traffic through two network namespaces with a `ballast swap` every few
//!   seconds (`tests/integration/src/bin/soak.rs`, generations `tests/fixtures/soak-{a,b}.toml`),
//!   reporting frames sent, forwarded, received, lost and misrouted, and swaps done.

use anyhow::Result;

use crate::{process, setup};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Frames to run through the kernel and the model.
    #[arg(long, default_value_t = 10_000_000)]
    frames: u64,
    /// Seed of the run (decimal or 0x-hex); the default is the one CI uses.
    #[arg(long)]
    seed: Option<String>,
    /// Build the test in release mode (faster frame generation; a longer first build).
    #[arg(long)]
    release: bool,
}

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to send traffic.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between two `ballast swap`s.
    #[arg(long, default_value_t = 3)]
    swap_every: u64,
    /// Frames per second sent to the VIP.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
}

pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    setup::run()?;
    let mut command = process::cargo()?;
    command.args(["test", "--package", "ballast-tests", "--test", "fuzz"]);
    if args.release {
        command.arg("--release");
    }
    command
        .args(["--", "--exact", "random_and_mutated_frames_agree_with_the_model", "--nocapture"])
        .env("BALLAST_FUZZ_FRAMES", args.frames.to_string());
    if let Some(seed) = &args.seed {
        command.env("BALLAST_FUZZ_SEED", seed);
    }
    process::run(&mut command)
}

pub fn soak(args: &SoakArgs) -> Result<()> {
    setup::run()?;
    // The soak runs the `ballast` binary beside its own: same profile.
    process::run(process::cargo()?.args(["build", "--package", "lb-userspace", "--bin", "ballast"]))?;
    let (seconds, swap_every, rate) = (args.seconds.to_string(), args.swap_every.to_string(), args.rate.to_string());
    let mut command = process::cargo()?;
    command.args(["run", "--package", "ballast-tests", "--bin", "soak", "--"]);
    command.args(["--seconds", &seconds, "--swap-every", &swap_every, "--rate", &rate]);
    process::run(&mut command)
}
