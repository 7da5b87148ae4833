//! Generations (config and host parameters) for the differential fuzzer: a few written by
//! hand to cover every kind of VIP, and random small ones.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ballast::loader::HostParams;
use lb_common::maglev::is_prime;

use crate::fuzz_frames::Dice;
use crate::{host_params, XorShift, DEFAULT_MTU};

/// A config and the host it is loaded for.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub config: String,
    pub host: HostParams,
}

/// Both families, exact-port and every-port VIPs (and an exact port inside an every-port
/// address), weights, and two protocols on one address.
pub const MIXED_CONFIG: &str = r#"
hash_seed = 0x5eed

[[vip]]
address = "192.0.2.10"
port = 80
protocol = "tcp"
table_size = 307
backends = [{ address = "10.1.0.1" }, { address = "10.1.0.2" }, { address = "10.1.0.3", weight = 2 }]

[[vip]]
address = "192.0.2.10"
port = 53
protocol = "udp"
table_size = 211
backends = [{ address = "10.2.0.1" }, { address = "10.2.0.2" }]

[[vip]]
address = "192.0.2.20"
port = 0
protocol = "tcp"
table_size = 307
backends = [{ address = "10.3.0.1" }, { address = "10.3.0.2", weight = 0 }, { address = "10.3.0.3" }]

[[vip]]
address = "192.0.2.20"
port = 443
protocol = "tcp"
table_size = 101
backends = [{ address = "10.4.0.1" }]

[[vip]]
address = "2001:db8::10"
port = 443
protocol = "tcp"
table_size = 211
backends = [{ address = "2001:db8:1::1" }, { address = "2001:db8:1::2" }]

[[vip]]
address = "2001:db8::10"
port = 53
protocol = "udp"
table_size = 307
backends = [{ address = "2001:db8:2::1" }, { address = "2001:db8:2::2", weight = 2 }, { address = "2001:db8:2::3" }]

[[vip]]
address = "2001:db8::30"
port = 0
protocol = "udp"
table_size = 211
backends = [{ address = "2001:db8:4::1" }, { address = "2001:db8:4::2" }]

[[vip]]
address = "2001:db8::30"
port = 8443
protocol = "udp"
table_size = 101
backends = [{ address = "2001:db8:5::1" }]
"#;

/// One IPv4 VIP: the program is built without its IPv6 path.
pub const IPV4_ONLY_CONFIG: &str = r#"
hash_seed = 1
[[vip]]
address = "198.18.0.1"
port = 80
protocol = "tcp"
table_size = 401
backends = [{ address = "10.9.0.1" }, { address = "10.9.0.2" }, { address = "10.9.0.3" }, { address = "10.9.0.4" }]
"#;

/// One every-port IPv6 VIP: no IPv4 path.
pub const IPV6_ONLY_CONFIG: &str = r#"
hash_seed = 0xffffffff
[[vip]]
address = "2001:db8:99::1"
port = 0
protocol = "tcp"
table_size = 211
backends = [{ address = "2001:db8:9::1" }, { address = "2001:db8:9::2", weight = 3 }]
"#;

/// The hand-written scenarios: every kind of VIP, synthetic and fixed outer sources, and MTUs
/// from the IPv6 minimum to jumbo.
pub fn fixed_scenarios() -> Vec<Scenario> {
    let fixed_sources = HostParams {
        source_v4: Some(Ipv4Addr::new(203, 0, 113, 1)),
        source_v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1)),
        ..host_params(9000)
    };
    vec![
        scenario("mixed", MIXED_CONFIG, host_params(DEFAULT_MTU)),
        scenario("mixed-jumbo-fixed-sources", MIXED_CONFIG, fixed_sources),
        scenario("ipv4-only", IPV4_ONLY_CONFIG, host_params(576)),
        scenario("ipv6-only-every-port", IPV6_ONLY_CONFIG, host_params(1280)),
    ]
}

fn scenario(name: &str, config: &str, host: HostParams) -> Scenario {
    Scenario { name: name.to_owned(), config: config.to_owned(), host }
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
    Scenario { name: format!("random-{seed:016x}"), config, host }
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
