//! Where the lab finds the binaries it runs: ballast-test-support's lookup (`$BALLAST_BIN` /
//! `$BALLAST_LAB_BIN`, else beside the running executable or in the directory above it), then
//! PATH (an installed `ballast-lab` next to an installed `ballast`, or not).
use std::path::PathBuf;

/// The `ballast` binary the lab runs ballast commands with.
pub fn ballast_binary() -> anyhow::Result<PathBuf> {
    ballast_test_support::ballast_binary().or_else(|err| on_path("ballast").ok_or(err))
}

/// The `ballast-lab` binary the servers run as (`ballast-lab serve`): in `ballast-lab`, itself
/// (it is beside itself); in a test, the one built beside the test.
pub fn lab_binary() -> anyhow::Result<PathBuf> {
    ballast_test_support::lab_binary().or_else(|err| on_path("ballast-lab").ok_or(err))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|path| path.is_file())
}
