//! Generations (config and host parameters) for the differential fuzzer: a few test configs
//! (`tests/fixtures/`) that cover every kind of VIP, and random small ones.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use ballast::generation::config::Config;
use ballast::kernel::loader::HostParams;
use lb_common::maglev::is_prime;

use crate::fuzz_frames::Dice;
use crate::{host_params, XorShift, DEFAULT_MTU};

/// A config and the host it is loaded for.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// The test config's name (`tests/fixtures/FIXTURE.toml`). A random scenario's config is
    /// generated: its fixture (named as the scenario) is written only when a reproducer needs
    /// it ([`Scenario::save_fixture`]).
    pub fixture: String,
    pub config: String,
    pub host: HostParams,
}

impl Scenario {
    /// The scenario of test config `fixture` on `host`.
    pub fn of_fixture(name: &str, fixture: &str, host: HostParams) -> Scenario {
        let config = ballast_test_support::fixture(fixture).unwrap_or_else(|e| panic!("scenario {name}: {e:#}"));
        Scenario { name: name.to_owned(), fixture: fixture.to_owned(), config, host }
    }

    /// Makes sure `tests/fixtures/FIXTURE.toml` holds this scenario's config (writes it for a
    /// random scenario), so that a reproducer can name it.
    pub fn save_fixture(&self) -> anyhow::Result<()> {
        let canonical = |text: &str| -> anyhow::Result<String> { Ok(Config::from_toml_str(text)?.to_canonical_json()) };
        let path = ballast_test_support::fixture_path(&self.fixture);
        if path.exists() {
            let saved = ballast_test_support::fixture(&self.fixture)?;
            anyhow::ensure!(
                canonical(&saved)? == canonical(&self.config)?,
                "{} holds another config than scenario {}",
                path.display(),
                self.name
            );
            return Ok(());
        }
        let text = format!("# Random scenario {}, written by the differential fuzzer.\n{}", self.name, self.config);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// The hand-written scenarios: every kind of VIP (`mixed`), one family only (`ipv4-only`,
/// `ipv6-only-every-port`), synthetic and fixed outer sources, and MTUs from the IPv6 minimum
/// to jumbo.
pub fn fixed_scenarios() -> Vec<Scenario> {
    let fixed_sources = HostParams {
        source_v4: Some(Ipv4Addr::new(203, 0, 113, 1)),
        source_v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1)),
        ..host_params(9000)
    };
    vec![
        Scenario::of_fixture("mixed", "mixed", host_params(DEFAULT_MTU)),
        Scenario::of_fixture("mixed-jumbo-fixed-sources", "mixed", fixed_sources),
        Scenario::of_fixture("ipv4-only", "ipv4-only", host_params(576)),
        Scenario::of_fixture("ipv6-only-every-port", "ipv6-only-every-port", host_params(1280)),
    ]
}

/// A random small generation: 1 to 6 VIPs over three addresses of each family (so addresses
/// share protocols and ports), 1 to 4 backends each, random weights, seed, MTU and sources.
pub fn random_scenario(seed: u64) -> Scenario {
    let rng = &mut XorShift::new(seed);
    let mut config = format!("hash_seed = {}\n", rng.next_u32());
    let mut seen = Vec::new();
    for _ in 0..=rng.below(6) {
        let ipv4 = rng.chance(50);
        let address =
            if ipv4 { format!("192.0.2.{}", 10 + rng.below(3)) } else { format!("2001:db8::{}", 10 + rng.below(3)) };
        let any = rng.next_u16();
        let port = rng.pick(&[0, 53, 80, 443, any]);
        let protocol = rng.pick(&["tcp", "udp"]);
        if seen.contains(&(address.clone(), port, protocol)) {
            continue;
        }
        seen.push((address.clone(), port, protocol));
        write_vip(rng, &mut config, &address, port, protocol, ipv4);
    }
    let between = 1500 + rng.below(8000) as u32;
    let mtu = rng.pick(&[576, 1280, DEFAULT_MTU, between, 9000]);
    let host = HostParams {
        source_v4: rng.chance(30).then(|| Ipv4Addr::from(rng.next_u32() | 1)),
        source_v6: rng.chance(30).then(|| Ipv6Addr::new(0x2001, 0xdb8, 0xfffe, 0, 0, 0, 0, rng.next_u16() | 1)),
        ..host_params(mtu)
    };
    let name = format!("random-{seed:016x}");
    Scenario { fixture: name.clone(), name, config, host }
}

fn write_vip(rng: &mut XorShift, config: &mut String, address: &str, port: u16, protocol: &str, ipv4: bool) {
    let backends = 1 + rng.below(4);
    let mut weights: Vec<usize> = (0..backends).map(|_| rng.below(4)).collect();
    weights[rng.below(backends)] = 1 + rng.below(3);
    let table_size = next_prime(100 * backends as u32 + rng.below(200) as u32);
    let _ = write!(config, "[[vip]]\naddress = \"{address}\"\nport = {port}\nprotocol = \"{protocol}\"\ntable_size = {table_size}\nbackends = [");
    for (i, weight) in weights.iter().enumerate() {
        let backend: IpAddr = if ipv4 {
            IpAddr::from([10, 7, rng.below(4) as u8, 1 + i as u8])
        } else {
            IpAddr::from([0x2001, 0xdb8, 7, rng.below(4) as u16, 0, 0, 0, 1 + i as u16])
        };
        let _ = write!(config, "{{ address = \"{backend}\", weight = {weight} }}, ");
    }
    config.push_str("]\n");
}

/// The smallest prime at least `n`.
pub fn next_prime(n: u32) -> u32 {
    (n..).find(|&m| is_prime(m)).unwrap_or(n)
}
