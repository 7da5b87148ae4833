//! What the commands do to the kernel and the state directory, in the order an operator meets
//! them. Shared here: the interface a command works on and the audit entry it writes.
pub mod attach;
pub mod decap;
pub mod preflight;
pub mod prune;
pub mod registry;
pub mod status;
pub mod swap;
pub mod verify;

use std::net::IpAddr;

use crate::{
    generation::{artifact::Artifact, describe, program::LOAD_BALANCER, signature::Signed},
    kernel::{pins, sys},
    state::{self, AuditEntry, IfaceRecord, StateDir},
};

/// Explicit consent to what attach, swap and rollback refuse by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// A generation whose program is not the one this ballast carries
    /// (`--allow-foreign-program`): a digest is SHA-256 over public content, so it proves
    /// nothing about who made the program.
    pub foreign_program: bool,
    /// An every-port (port 0) VIP on one of the host's own addresses
    /// (`--allow-every-port-vip-on-host-address`): it captures all TCP or UDP to that address
    /// arriving on the interface, SSH included.
    pub every_port_vip_on_host_address: bool,
}

/// Host parameters a swap or rollback changes. The interface's MAC and MTU are always read
/// again; the gateway MAC and the outer sources are kept unless given here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostChange {
    /// `--gateway-mac`.
    pub gateway_mac: Option<String>,
    /// `--source`: replaces the fixed outer source of its family.
    pub sources: Vec<IpAddr>,
    /// `--synthetic-source`: drop the fixed outer sources (before `sources` apply).
    pub synthetic_source: bool,
}

/// How a swap or rollback goes: the host parameters it changes, what it allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwapOptions {
    pub host: HostChange,
    pub allow: Allow,
    /// Build the incoming generation after the one that runs, with these options, unless it
    /// carries a lineage of its own. None: swap it in exactly as given.
    pub lineage: Option<crate::generation::lineage::LineageOptions>,
}

/// Refuses a generation whose program is not the one this binary carries, unless allowed.
pub(crate) fn check_program(artifact: &Artifact, allow: Allow) -> crate::Result<()> {
    if artifact.program == LOAD_BALANCER || allow.foreign_program {
        return Ok(());
    }
    Err(crate::Error::ForeignProgram(format!(
        "generation {}: its program ({} bytes) is not the one this ballast carries ({} bytes); its digest proves \
         only that the artifact is whole, not who made the program. Pass --allow-foreign-program to load it anyway",
        artifact.digest_string(),
        artifact.program.len(),
        LOAD_BALANCER.len()
    )))
}

/// Refuses a gateway MAC no frame should be sent to: zero, broadcast, multicast, or the
/// interface's own.
pub(crate) fn check_gateway_mac(mac: &[u8; 6], text: &str, iface: &str, iface_mac: &[u8; 6]) -> crate::Result<()> {
    let problem = if *mac == [0; 6] {
        "is the zero MAC address, no next hop"
    } else if *mac == [0xff; 6] {
        "is the broadcast address: every host on the segment would get every forwarded packet"
    } else if mac[0] & 1 != 0 {
        "is a multicast address, not a next hop"
    } else if mac == iface_mac {
        "is the MAC of the interface itself: forwarded packets would be sent back to it"
    } else {
        return Ok(());
    };
    Err(crate::Error::other(format!(
        "--gateway-mac {text} {problem}{}; give the MAC of the router toward the backends",
        if mac == iface_mac { format!(" ({iface})") } else { String::new() }
    )))
}

/// Refuses an every-port VIP on one of the addresses of the calling thread's network
/// namespace, unless allowed: XDP on `iface` would take every TCP (or UDP) packet to that
/// address, SSH to the host included, and send it to the backends.
pub(crate) fn check_vips_on_host(artifact: &Artifact, iface: &str, allow: Allow) -> crate::Result<()> {
    if allow.every_port_vip_on_host_address {
        return Ok(());
    }
    let addresses = sys::host_addresses()?;
    for vip in artifact.generation.config.vips.iter().filter(|v| v.port == 0) {
        if let Some((owner, _)) = addresses.iter().find(|(_, a)| *a == vip.address) {
            return Err(crate::Error::other(format!(
                "VIP {}: an every-port VIP on {}, an address of this host ({owner}), would capture all {} traffic \
                 to the host arriving on {iface} (SSH included) and send it to the backends; use an address of its \
                 own, or pass --allow-every-port-vip-on-host-address if that is what you want",
                describe(vip),
                vip.address,
                vip.protocol.name().to_uppercase()
            )));
        }
    }
    Ok(())
}

/// The interface's record, and why it could not be read: a corrupt or unreadable record must
/// not block the commands that replace it (attach, swap's adoption, detach).
pub(crate) fn read_record(state: &StateDir, key: &str) -> (Option<IfaceRecord>, Option<String>) {
    match state.record(key) {
        Ok(record) => (record, None),
        Err(err) => (None, Some(format!("{err:#}"))),
    }
}

/// The interface a command works on, in the calling thread's network namespace.
pub struct Target {
    pub iface: String,
    /// `IF` or `netns-COOKIE/IF`: names its pins and its records.
    pub key: String,
}

/// What a change was and why, for the audit log.
pub struct Change {
    pub action: &'static str,
    pub reason: Option<String>,
    /// Who signed the generation that goes live (a trust policy requires it).
    pub signed: Option<Signed>,
}

/// Appends one audit entry; `failure` is the error of a failed attempt.
pub fn audit(
    state: &StateDir,
    target: &Target,
    change: &Change,
    from: Option<String>,
    to: Option<String>,
    record: Option<&IfaceRecord>,
    failure: Option<&crate::Error>,
) -> crate::Result<()> {
    state.audit(&AuditEntry {
        time: state::now(),
        action: change.action.to_owned(),
        iface: target.key.clone(),
        from,
        to,
        host: record.map(|r| r.host.clone()),
        reason: change.reason.clone(),
        signed: change.signed.clone(),
        result: failure.map_or_else(|| "ok".to_owned(), |e| format!("failed: {e:#}")),
    })
}

impl Target {
    pub fn new(iface: &str) -> crate::Result<Target> {
        Ok(Target { iface: iface.to_owned(), key: pins::iface_key(iface)? })
    }
}

impl Change {
    pub fn command(action: &'static str) -> Change {
        Change { action, reason: None, signed: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::config::{Config, EXAMPLE_CONFIG};

    #[test]
    fn gateway_macs_no_frame_should_go_to_are_refused_naming_flag_and_value() {
        let own = [0x02, 0, 0, 0, 0, 0x10];
        for (mac, why) in [
            ([0u8; 6], "zero"),
            ([0xff; 6], "broadcast"),
            ([0x01, 0x00, 0x5e, 0, 0, 1], "multicast"),
            ([0x33, 0x33, 0, 0, 0, 1], "multicast"),
            (own, "interface itself"),
        ] {
            let text = crate::generation::address::format_mac(&mac);
            let err = check_gateway_mac(&mac, &text, "eth0", &own).unwrap_err().to_string();
            assert!(err.contains("--gateway-mac") && err.contains(&text) && err.contains(why), "{err}");
        }
        check_gateway_mac(&[0x02, 0, 0, 0, 0, 0x11], "02:00:00:00:00:11", "eth0", &own).unwrap();
        check_gateway_mac(&[0x00, 0x1b, 0x21, 1, 2, 3], "00:1b:21:01:02:03", "eth0", &own).unwrap();
    }

    #[test]
    fn only_the_embedded_program_passes_unless_allowed() {
        let config = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        check_program(&Artifact::build(&config, LOAD_BALANCER).unwrap(), Allow::default()).unwrap();
        let mut other = LOAD_BALANCER.to_vec();
        other.push(0);
        let foreign = Artifact::build(&config, &other).unwrap();
        let err = check_program(&foreign, Allow::default()).unwrap_err();
        assert!(matches!(err, crate::Error::ForeignProgram(_)) && err.exit_code() == 4, "{err}");
        assert!(err.to_string().contains("--allow-foreign-program"), "{err}");
        check_program(&foreign, Allow { foreign_program: true, ..Allow::default() }).unwrap();
    }
}
