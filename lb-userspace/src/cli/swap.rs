//! `ballast swap` and `ballast rollback`.
use std::path::Path;

use super::args::{RegistryArgs, ReplaceArgs};
use crate::{
    generation::lineage::LineageOptions,
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
        let lineage =
            (self.lineage_depth > 0).then(|| LineageOptions { depth: self.lineage_depth, ..LineageOptions::default() });
        Ok((self.target.enter()?, SwapOptions { host, allow, lineage }))
    }
}

/// Swaps in `generation`, or with none (`--settle`) the settled form of what runs.
pub fn swap(state: &StateDir, generation: Option<&Path>, target: ReplaceArgs, registry: &RegistryArgs) -> Result<()> {
    let (generation, pulled) = match generation {
        Some(path) => {
            let (file, pulled) = registry.resolve(state, path)?;
            (Some(file), pulled)
        }
        None => (None, None),
    };
    let incoming = generation.as_deref().map(|path| swap::read_trusted(state, path)).transpose()?;
    let (iface, options) = target.enter()?;
    let target = Target::new(&iface)?;
    let swapped = match incoming {
        Some((artifact, signed)) => {
            let change = Change { signed, reason: super::pull::pulled_reason(pulled), ..Change::command("swap") };
            swap::swap_with(state, &target, &artifact, &change, &options)?
        }
        None => swap::settle(state, &target, &options)?,
    };
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
    if let Some(lineage) = &swapped.lineage {
        out.push_str(&format!("lineage: {lineage}\n"));
    }
    out.push_str(&format!(
        "{iface}: {} -> {} (pre-flight {} packets ok)\n",
        swapped.from.as_deref().unwrap_or("nothing"),
        swapped.to,
        swapped.preflight_packets
    ));
    out
}
