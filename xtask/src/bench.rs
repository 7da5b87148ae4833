//! `cargo xtask bench [--quick] [--json FILE]`: setup, then builds and runs the benchmark,
//! the `ballast-bench` package (tests/bench). Full runs use a release build; `--quick`, the CI
//! smoke mode, reuses the debug build `cargo xtask test` made (the XDP programs are release
//! builds either way).

use std::path::Path;

use anyhow::{Context, Result};

use crate::{process, setup};

pub fn run(quick: bool, json: Option<&Path>) -> Result<()> {
    setup::run()?;
    let mut bench = process::cargo()?;
    bench.args(["run", "--package", "ballast-bench"]);
    if !quick {
        bench.arg("--release");
    }
    bench.arg("--");
    if quick {
        bench.arg("--quick");
    }
    if let Some(path) = json {
        // cargo runs the bench in the workspace root; the path is the caller's.
        let path = std::env::current_dir().context("reading the current directory")?.join(path);
        bench.arg("--json").arg(path);
    }
    process::run(&mut bench).context("xtask bench failed")
}
