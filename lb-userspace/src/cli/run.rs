//! `ballast run`: the daemon.
use std::net::SocketAddr;

use super::args::AttachArgs;
use crate::{daemon, state::StateDir, Result};

pub fn run(state: StateDir, target: AttachArgs, metrics: Option<SocketAddr>, detach_on_exit: bool) -> Result<()> {
    let attach = target.enter()?;
    daemon::run(state, daemon::RunOptions { attach, metrics, detach_on_exit })
}
