//! `ballast attach` and `ballast detach`.
use super::args::{AllowArgs, AttachArgs, AttachCommandArgs, IfaceArgs};
use crate::{
    ops::{
        attach::{self, AttachRequest, Attached},
        swap::read_trusted,
        Allow, Change,
    },
    state::StateDir,
    Result,
};

impl AllowArgs {
    pub(crate) fn allow(&self) -> Allow {
        Allow {
            foreign_program: self.allow_foreign_program,
            every_port_vip_on_host_address: self.allow_every_port_vip_on_host_address,
        }
    }
}

impl AttachArgs {
    /// Enters the network namespace, if any, and returns the request.
    pub(crate) fn enter(self) -> Result<AttachRequest> {
        let iface = self.target.enter()?;
        Ok(AttachRequest {
            generation: self.config,
            iface,
            gateway_mac: self.gateway_mac,
            sources: self.sources,
            mode: self.mode,
        })
    }
}

pub fn attach(state: &StateDir, target: AttachCommandArgs) -> Result<()> {
    let allow = target.allow.allow();
    let (generation, pulled) = target.registry.resolve(state, &target.attach.config)?;
    let request = AttachRequest { generation, ..target.attach.enter()? };
    let (artifact, signed) = read_trusted(state, &request.generation)?;
    let change = Change { signed, reason: super::pull::pulled_reason(pulled), ..Change::command("attach") };
    let attached = attach::attach_artifact_with(state, &artifact, &request, &change, allow)?;
    super::out(&format!("{}\n", render_attached(&request.iface, &attached)))?;
    Ok(())
}

pub fn render_attached(iface: &str, attached: &Attached) -> String {
    let replaced = match &attached.replaced {
        Some(problem) => format!("replaced the dead link ({problem})\n"),
        None => String::new(),
    };
    replaced
        + &format!(
            "attached {} to {iface}: {} VIPs, {} backends, pre-flight {} packets ok; pinned in {}",
            attached.digest,
            attached.vips,
            attached.backends,
            attached.preflight_packets,
            attached.pin_dir.display()
        )
}

pub fn detach(state: &StateDir, target: IfaceArgs) -> Result<()> {
    let iface = target.enter()?;
    let dir = attach::detach(state, &iface)?;
    super::out(&format!("detached from {iface}; removed {}\n", dir.display()))?;
    Ok(())
}
