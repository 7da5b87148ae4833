//! `ballast attach` and `ballast detach`.
//!
//! Everything that can be checked without touching the interface is checked first (config,
//! generation, flags, interface, existing pins), so a refusal changes nothing. Once loading
//! starts, any failure removes what this command pinned before it returns.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use aya::programs::XdpMode;

use crate::{
    config::Config,
    generation::Generation,
    kernel,
    loader::{HostParams, LoadedGeneration},
    netns, pins,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// In the driver (XDP_FLAGS_DRV_MODE): the fast path, needs driver support (veth has it).
    Native,
    /// In the generic network stack (XDP_FLAGS_SKB_MODE): works everywhere, slower.
    Generic,
}

impl AttachMode {
    pub fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

pub struct AttachRequest {
    pub config: PathBuf,
    pub iface: String,
    pub gateway_mac: String,
    pub sources: Vec<IpAddr>,
    pub mode: AttachMode,
}

pub struct Attached {
    pub pin_dir: PathBuf,
    pub vips: usize,
    pub backends: usize,
}

/// At most one fixed outer source per family.
pub fn split_sources(sources: &[IpAddr]) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for source in sources {
        match source {
            IpAddr::V4(a) if v4.replace(*a).is_some() => bail!("--source: more than one IPv4 source ({a})"),
            IpAddr::V6(a) if v6.replace(*a).is_some() => bail!("--source: more than one IPv6 source ({a})"),
            _ => {}
        }
        if source.is_unspecified() || source.is_multicast() {
            bail!("--source: '{source}' cannot be a packet's source address");
        }
    }
    Ok((v4, v6))
}

/// Attaches a new generation built from the config; refuses if one already runs there.
/// The caller has entered the target network namespace.
pub fn attach(request: &AttachRequest) -> anyhow::Result<Attached> {
    let config = Config::load(&request.config)?;
    let generation = Generation::build(&config)?;
    let gateway_mac = kernel::parse_mac(&request.gateway_mac).context("--gateway-mac")?;
    let (source_v4, source_v6) = split_sources(&request.sources)?;
    pins::ensure_bpffs()?;
    let iface = kernel::interface_info(&request.iface).context("--iface")?;
    let dir = pins::pin_dir(&request.iface)?;
    let link_pin = pins::link_pin(&dir);
    if dir.join(crate::decap::LINK_PIN).exists() {
        bail!("the ballast decapsulator runs on {}; `ballast decap detach --iface {}` first", request.iface, request.iface);
    }
    if link_pin.exists() {
        bail!(
            "a generation already runs on {} (pinned at {}); replacing it is `ballast swap` (issue B), \
             removing it is `ballast detach --iface {}`",
            request.iface,
            link_pin.display(),
            request.iface
        );
    }
    let host = HostParams { gateway_mac, iface_mac: iface.mac, source_v4, source_v6, mtu: iface.mtu };
    let created_dir = !dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = load_and_attach(&generation, &host, &dir, iface.index, request.mode);
    if let Err(err) = result {
        // Leave nothing behind: counters pinned by this attempt go with it.
        if created_dir {
            if let Err(cleanup) = pins::remove_pins(&dir, &pins::generation_pins(&dir)) {
                return Err(err.context(format!("and cleaning up {} failed: {cleanup:#}", dir.display())));
            }
        }
        return Err(err);
    }
    Ok(Attached { pin_dir: dir, vips: generation.vip_count(), backends: generation.backends.len() })
}

fn load_and_attach(
    generation: &Generation,
    host: &HostParams,
    dir: &Path,
    if_index: u32,
    mode: AttachMode,
) -> anyhow::Result<()> {
    let mut loaded = LoadedGeneration::load(generation, host, Some(dir))?;
    let link = loaded.attach(if_index, mode.xdp_mode())?;
    // The pin is what keeps the link, and so the program, alive after this process exits.
    link.pin(pins::link_pin(dir)).context("pinning the XDP link")?;
    Ok(())
}

/// Detaches the generation running on `iface` (in the current network namespace) by
/// removing its pins: the link goes with its last reference, the program and maps with it.
pub fn detach(iface: &str) -> anyhow::Result<PathBuf> {
    pins::ensure_bpffs()?;
    let dir = pins::pin_dir(iface)?;
    if !pins::link_pin(&dir).exists() {
        bail!("no ballast generation runs on {iface} in this network namespace (nothing pinned at {})", dir.display());
    }
    pins::remove_pins(&dir, &pins::generation_pins(&dir))?;
    Ok(dir)
}

/// Enters `--netns NAME` when given.
pub fn enter_netns(name: Option<&str>) -> anyhow::Result<()> {
    match name {
        Some(name) => netns::enter(name),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sources_one_per_family() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(split_sources(&[v4, v6]).unwrap(), (Some("10.0.0.1".parse().unwrap()), Some("fd00::1".parse().unwrap())));
        assert!(split_sources(&[v4, "10.0.0.2".parse().unwrap()]).unwrap_err().to_string().contains("more than one IPv4"));
        assert!(split_sources(&["0.0.0.0".parse().unwrap()]).unwrap_err().to_string().contains("cannot be"));
    }
}
