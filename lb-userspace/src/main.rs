//! The `ballast` command line; the work is in `ballast::cli`.
use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

use ballast::cli::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon reports what it does; one-shot commands print their results instead.
    let default_level = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).init();
    match ballast::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Not eprintln!: a closed stderr must not turn the failure into a panic (101).
            let _ = writeln!(std::io::stderr(), "ballast: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
