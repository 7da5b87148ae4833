//! Reproducers of the differential fuzzer: one JSON file per case in `regressions/` of this
//! crate, replayed by `tests/fuzz.rs` on every run. A divergence the fuzzer finds is written
//! there; the seed cases were written by hand.
//!
//! ```json
//! { "name": "...", "note": "why this case is tricky",
//!   "origin": "fuzz seed 0x... frame #123 (or: seed case)",
//!   "fixture": "mixed",
//!   "host": { "mtu": 1500, "source_v4": null, "source_v6": null },
//!   "frame": "<hex>",
//!   "reason": "forwarded" }
//! ```
//! The scenario is named, not embedded: `fixture` is a test config in `tests/fixtures/`
//! (`ballast_test_support::fixture`), `host` the host parameters it is loaded for. `reason` is
//! what the documented rules give (the model's reason when the file was written); kernel and
//! model must both give it, and agree on the output bytes and counters.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use ballast::kernel::loader::HostParams;
use serde_json::{json, Value};

use crate::host_params;
use crate::scenarios::Scenario;

/// `regressions/` of this crate.
pub fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reproducer {
    /// Also the file name (without `.json`).
    pub name: String,
    pub note: String,
    pub origin: String,
    /// The test config of the generation (`tests/fixtures/FIXTURE.toml`).
    pub fixture: String,
    pub host: HostParams,
    pub frame: Vec<u8>,
    /// Name of the reason the documented rules give.
    pub reason: String,
}

impl Reproducer {
    /// The case of `frame` in `scenario`, whose config must be a fixture (see
    /// [`Scenario::save_fixture`]).
    pub fn of(name: String, scenario: &Scenario, origin: &str, frame: &[u8], note: &str, reason: &str) -> Reproducer {
        Reproducer {
            name,
            note: note.to_owned(),
            origin: origin.to_owned(),
            fixture: scenario.fixture.clone(),
            host: scenario.host.clone(),
            frame: frame.to_vec(),
            reason: reason.to_owned(),
        }
    }

    /// The text of its generation's config.
    pub fn config(&self) -> anyhow::Result<String> {
        ballast_test_support::fixture(&self.fixture)
    }

    pub fn to_json(&self) -> String {
        let value = json!({
            "name": self.name,
            "note": self.note,
            "origin": self.origin,
            "fixture": self.fixture,
            "host": {
                "mtu": self.host.mtu,
                "source_v4": self.host.source_v4.map(|a| a.to_string()),
                "source_v6": self.host.source_v6.map(|a| a.to_string()),
            },
            "frame": to_hex(&self.frame),
            "reason": self.reason,
        });
        serde_json::to_string_pretty(&value).unwrap_or_else(|e| unreachable!("a JSON value serializes: {e}")) + "\n"
    }

    pub fn from_json(text: &str) -> anyhow::Result<Reproducer> {
        let value: Value = serde_json::from_str(text).context("not JSON")?;
        if value.get("config").is_some() {
            anyhow::bail!("embeds its config: name a test config of tests/fixtures/ as \"fixture\" instead");
        }
        let string = |key: &str| value[key].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no string \"{key}\""));
        let host = &value["host"];
        let mtu = host["mtu"].as_u64().and_then(|m| u32::try_from(m).ok()).ok_or_else(|| anyhow!("no host.mtu"))?;
        let source_v4: Option<Ipv4Addr> =
            host["source_v4"].as_str().map(str::parse).transpose().context("host.source_v4")?;
        let source_v6: Option<Ipv6Addr> =
            host["source_v6"].as_str().map(str::parse).transpose().context("host.source_v6")?;
        Ok(Reproducer {
            name: string("name")?,
            note: string("note").unwrap_or_default(),
            origin: string("origin").unwrap_or_default(),
            fixture: string("fixture")?,
            host: HostParams { source_v4, source_v6, ..host_params(mtu) },
            frame: from_hex(&string("frame")?)?,
            reason: string("reason")?,
        })
    }

    /// Writes `<dir>/<name>.json`; its path.
    pub fn save(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, self.to_json()).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Every reproducer in `dir`, sorted by file name.
pub fn load_all(dir: &Path) -> anyhow::Result<Vec<Reproducer>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Reproducer::from_json(&text).with_context(|| format!("{}", path.display()))
        })
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits, whitespace ignored.
pub fn from_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        anyhow::bail!("odd number of hex digits");
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).context("hex digits")?;
            u8::from_str_radix(pair, 16).with_context(|| format!("'{pair}' is not a hex byte"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reproducer_reads_back_as_written() -> anyhow::Result<()> {
        let reproducer = Reproducer {
            name: "example".to_owned(),
            note: "a note".to_owned(),
            origin: "fuzz seed 0x1 frame #2".to_owned(),
            fixture: "mixed".to_owned(),
            host: HostParams { source_v4: Some(Ipv4Addr::new(203, 0, 113, 1)), ..host_params(1280) },
            frame: vec![0, 1, 0xfe, 0xff],
            reason: "forwarded".to_owned(),
        };
        assert_eq!(Reproducer::from_json(&reproducer.to_json())?, reproducer);
        assert_eq!(from_hex("00 01\nfeff")?, [0, 1, 0xfe, 0xff]);
        assert!(from_hex("abc").is_err() && from_hex("zz").is_err());
        Ok(())
    }

    #[test]
    fn every_shipped_reproducer_parses() -> anyhow::Result<()> {
        let reproducers = load_all(&regressions_dir())?;
        assert!(!reproducers.is_empty());
        for reproducer in &reproducers {
            let config = reproducer.config().with_context(|| reproducer.name.clone())?;
            ballast::generation::config::Config::from_toml_str(&config)
                .with_context(|| format!("{}: fixture {}", reproducer.name, reproducer.fixture))?;
        }
        Ok(())
    }

    #[test]
    fn the_fixed_scenarios_are_their_fixtures() -> anyhow::Result<()> {
        for scenario in crate::scenarios::fixed_scenarios() {
            // Already there with the same config: nothing to write.
            scenario.save_fixture()?;
        }
        let mut changed = crate::scenarios::fixed_scenarios().remove(0);
        changed.config = ballast_test_support::fixture("ipv4-only")?;
        assert!(changed.save_fixture().is_err(), "a fixture was taken for another config");
        Ok(())
    }

    #[test]
    fn a_reproducer_that_embeds_its_config_is_refused() {
        let embedded = r#"{ "name": "x", "config": "hash_seed = 1", "host": { "mtu": 1500 }, "frame": "00", "reason": "forwarded" }"#;
        let Err(error) = Reproducer::from_json(embedded) else {
            panic!("a reproducer with an embedded config was read")
        };
        assert!(format!("{error:#}").contains("fixture"), "{error:#}");
    }
}
