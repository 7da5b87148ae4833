//! `ballast swap` and `ballast rollback`.
use std::path::Path;

use super::args::ReplaceArgs;
use crate::{
    generation::artifact::load_generation_file,
    ops::{
        swap::{self, Swapped},
        Change, HostChange, SwapOptions, Target,
    },
    state::StateDir,
    Result,
};

impl ReplaceArgs {
    /// Enters the network namespace, if any; the interface and the swap's options.
    fn enter(self) -> Result<(String, SwapOptions)> {
        let allow = self.allow.allow();
        let host = HostChange {
            gateway_mac: self.gateway_mac,
            sources: self.sources,
            synthetic_source: self.synthetic_source,
        };
        Ok((self.target.enter()?, SwapOptions { host, allow }))
    }
}

pub fn swap(state: &StateDir, generation: &Path, target: ReplaceArgs) -> Result<()> {
    let artifact = load_generation_file(generation)?;
    let (iface, options) = target.enter()?;
    let swapped = swap::swap_with(state, &Target::new(&iface)?, &artifact, &Change::command("swap"), &options)?;
    super::out(&render_swapped(&iface, &swapped))?;
    Ok(())
}

pub fn rollback(state: &StateDir, target: ReplaceArgs, to: Option<&str>) -> Result<()> {
    let (iface, options) = target.enter()?;
    let swapped = swap::rollback_with(state, &Target::new(&iface)?, to, &options)?;
    super::out(&render_swapped(&iface, &swapped))?;
    Ok(())
}

pub fn render_swapped(iface: &str, swapped: &Swapped) -> String {
    let mut out = String::new();
    if let Some(note) = &swapped.recovered {
        out.push_str(&format!("recovered: {note}\n"));
    }
    if let Some(note) = &swapped.adopted {
        out.push_str(&format!("adopted: {note}\n"));
    }
    for change in &swapped.host_changes {
        out.push_str(&format!("host: {change}\n"));
    }
    out.push_str(&format!(
        "{iface}: {} -> {} (pre-flight {} packets ok)\n",
        swapped.from.as_deref().unwrap_or("nothing"),
        swapped.to,
        swapped.preflight_packets
    ));
    out
}
