//! `ballast verify`.
use super::args::IfaceArgs;
use crate::{
    ops::{
        verify::{self, Verification},
        Target,
    },
    state::StateDir,
    Error, Result,
};

pub fn run(state: &StateDir, target: IfaceArgs, json: bool) -> Result<()> {
    let iface = target.enter()?;
    let verification = verify::verify(state, &Target::new(&iface)?)?;
    super::print(&verification, json, render)?;
    if !verification.ok() {
        return Err(Error::Other(format!("verification of {iface} failed: {}", verification.failed().join(", "))));
    }
    super::out(&format!("verified: {} runs as recorded\n", verification.running.as_deref().unwrap_or("?")))?;
    Ok(())
}

pub fn render(verification: &Verification) -> String {
    verification
        .checks
        .iter()
        .map(|check| format!("{:<4} {:<22} {}\n", if check.ok { "ok" } else { "FAIL" }, check.what, check.detail))
        .collect()
}
