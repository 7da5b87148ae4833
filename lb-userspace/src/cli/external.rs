//! `ballast lab` and `ballast demo` run `ballast-lab`, the lab's own binary (tests/lab): the
//! product does not carry the lab. It is looked for beside this binary, then on PATH.
use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use crate::{Error, Result};

const LAB_BINARY: &str = "ballast-lab";

pub fn lab(args: &[OsString]) -> Result<()> {
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(LAB_BINARY)));
    let program = beside.filter(|path| path.is_file()).unwrap_or_else(|| PathBuf::from(LAB_BINARY));
    // exec: the lab's exit code and signals are the command's own.
    let error = Command::new(&program).args(args).exec();
    Err(Error::Other(format!(
        "could not run {} ({error}): the lab and demo are a separate binary; build it with `cargo build -p ballast-lab` or run `cargo xtask demo`",
        program.display()
    )))
}
