//! `ballast version`: this ballast's version and the digest of each program it carries (what
//! a generation's digest covers besides its config, the same wherever this commit is built).
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    generation::{digest::format_digest, program},
    Result,
};

/// What `--json` prints.
#[derive(Serialize)]
pub struct Version {
    /// The crate version.
    pub version: &'static str,
    /// The git commit `BALLAST_COMMIT` named at build time; absent when it was not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<&'static str>,
    pub programs: Vec<Program>,
}

/// One embedded eBPF object.
#[derive(Serialize)]
pub struct Program {
    /// The object's name (lb-ebpf's binary).
    pub name: &'static str,
    pub role: &'static str,
    /// `sha256:<hex>` of the object's bytes.
    pub digest: String,
    pub bytes: usize,
}

/// This binary's version and programs.
pub fn version() -> Version {
    let programs = [
        ("lb-ebpf", "load balancer (XDP)", program::LOAD_BALANCER),
        ("lb-decap", "decapsulator (XDP)", program::DECAPSULATOR),
        ("lb-health", "health checks through the tunnel (TC egress)", program::HEALTH_TUNNEL),
    ]
    .into_iter()
    .map(|(name, role, bytes)| Program {
        name,
        role,
        digest: format_digest(&Sha256::digest(bytes).into()),
        bytes: bytes.len(),
    })
    .collect();
    Version { version: env!("CARGO_PKG_VERSION"), commit: option_env!("BALLAST_COMMIT"), programs }
}

pub fn run(json: bool) -> Result<()> {
    super::print(&version(), json, render)
}

pub fn render(version: &Version) -> String {
    let mut text = format!("ballast {}", version.version);
    if let Some(commit) = version.commit {
        text.push_str(&format!(" (commit {commit})"));
    }
    text.push('\n');
    for p in &version.programs {
        text.push_str(&format!("{:<10} {} {:>7} bytes  {}\n", p.name, p.digest, p.bytes, p.role));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_the_sha256_of_the_embedded_objects() {
        let version = version();
        assert_eq!(version.version, env!("CARGO_PKG_VERSION"));
        let embedded = [program::LOAD_BALANCER, program::DECAPSULATOR, program::HEALTH_TUNNEL];
        assert_eq!(version.programs.len(), embedded.len());
        for (p, bytes) in version.programs.iter().zip(embedded) {
            assert!(bytes.starts_with(b"\x7fELF"), "{} is an ELF object", p.name);
            let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(p.digest, format!("sha256:{hex}"), "{}", p.name);
            assert_eq!(p.bytes, bytes.len());
        }
        let text = render(&version);
        for p in &version.programs {
            assert!(text.contains(&p.digest), "{text}");
        }
        assert!(text.starts_with(&format!("ballast {}", version.version)), "{text}");
    }
}
