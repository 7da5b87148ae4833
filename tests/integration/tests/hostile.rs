//! Hostile flows: can clients concentrate traffic on one backend? One VIP per family with 10
//! equal backends. A million random flows, and crafted sets (one client varying only its
//! source port, a /16 or a /64 of clients on one source port), must spread over the backends
//! like the Maglev table does, within the hash's statistical spread: each set's chi-square
//! against the table shares is asserted (loosely: far past the 0.001% quantile fails), and
//! every backend's share must stay within a few percent of its ideal. The distributions are
//! printed. The million flows go through the reference model (fast, user space); a sample of
//! 10,000 goes through the kernel too (BPF_PROG_TEST_RUN), which must agree flow by flow and in
//! its backend counters. (An attacker who knows `hash_seed` can of course aim at one backend:
//! the seed is the fleet's secret.)

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use ballast::generation::address::{addr_words, family, words_addr};
use ballast::generation::config::Config;
use ballast::generation::Generation;
use ballast_test_support::{fixture, require_root};
use ballast_tests::*;
use lb_common::maps::FAMILY_IPV4;
use lb_common::model::{select, Flow, GenerationView};

/// Ten backends behind one VIP of each family (tests/fixtures/ten-backends.toml).
fn config() -> anyhow::Result<String> {
    fixture("ten-backends")
}

const VIP_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const VIP_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
const TCP: u8 = 6;
const BACKENDS: usize = 10;
/// Chi-square with 9 degrees of freedom is above 37.3 with probability 1e-5: beyond this the
/// spread is not chance.
const CHI_SQUARE_LIMIT: f64 = 40.0;

fn generation() -> anyhow::Result<Generation> {
    let config = Config::from_toml_str(&config()?).context("parsing the ten-backends config")?;
    Generation::build(&config).context("building the ten-backends generation")
}

fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Flow {
    Flow { family: family(dst), saddr: addr_words(src), daddr: addr_words(dst), sport, dport, protocol: TCP }
}

/// Flows per backend (index into BACKENDS) as the model sends them.
fn spread(view: &GenerationView<'_>, flows: impl Iterator<Item = Flow>) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for flow in flows {
        let selection = select(view, &flow).unwrap_or_else(|e| panic!("{flow:?}: {e:?}"));
        *counts.entry(selection.backend_index).or_default() += 1;
    }
    counts
}

/// Each backend's share of the table of the VIP at `vip`:`port`, by backend index.
fn table_shares(generation: &Generation, vip: IpAddr, port: u16) -> anyhow::Result<BTreeMap<u32, f64>> {
    let meta = generation.find_vip(vip, port, TCP).with_context(|| format!("no TCP VIP {vip} port {port}"))?;
    let table = &generation.maglev[meta.table_offset as usize..(meta.table_offset + meta.table_size) as usize];
    let mut shares = BTreeMap::new();
    for &backend in table {
        *shares.entry(backend).or_default() += 1.0 / table.len() as f64;
    }
    Ok(shares)
}

/// Chi-square of `counts` against `shares`, and the largest relative deviation of a
/// backend's flows from its share.
fn judge(counts: &BTreeMap<u32, u64>, shares: &BTreeMap<u32, f64>) -> (f64, f64) {
    let total: u64 = counts.values().sum();
    let mut chi_square = 0.0;
    let mut worst = 0.0f64;
    for (backend, share) in shares {
        let expected = share * total as f64;
        let observed = counts.get(backend).copied().unwrap_or(0) as f64;
        chi_square += (observed - expected).powi(2) / expected;
        worst = worst.max((observed - expected).abs() / expected);
    }
    (chi_square, worst)
}

/// A table of each backend of the VIP at `vip`: its table share, flows, flow share.
fn print_distribution(
    title: &str,
    generation: &Generation,
    vip: IpAddr,
    counts: &BTreeMap<u32, u64>,
    shares: &BTreeMap<u32, f64>,
) {
    let total: u64 = counts.values().sum();
    println!("{title}: {total} flows");
    println!("  {:<16} {:>11} {:>9} {:>10} {:>10}", "backend", "table share", "flows", "flow share", "deviation");
    for (backend, share) in shares {
        let flows = counts.get(backend).copied().unwrap_or(0);
        let flow_share = flows as f64 / total as f64;
        let address = words_addr(generation.backends[*backend as usize].addr, family(vip));
        println!(
            "  {address:<16} {share:>11.4} {flows:>9} {flow_share:>10.4} {:>+9.2}%",
            (flow_share / share - 1.0) * 100.0
        );
    }
    let (chi_square, worst) = judge(counts, shares);
    println!("  chi-square {chi_square:.1} (9 degrees of freedom), largest deviation {:.2}%\n", worst * 100.0);
}

/// Prints the distribution of `flows` and holds it to the table within `max_deviation`.
fn assert_spread_like_the_table(
    title: &str,
    vip: IpAddr,
    port: u16,
    max_deviation: f64,
    flows: impl Iterator<Item = Flow>,
) -> anyhow::Result<()> {
    let generation = generation()?;
    let counts = spread(&generation.view(), flows);
    let shares = table_shares(&generation, vip, port)?;
    assert_eq!(shares.len(), BACKENDS);
    print_distribution(title, &generation, vip, &counts, &shares);
    let (chi_square, worst) = judge(&counts, &shares);
    assert!(chi_square < CHI_SQUARE_LIMIT, "{title}: chi-square {chi_square:.1}: flows concentrate");
    assert!(worst < max_deviation, "{title}: a backend is {:.1}% off its share", worst * 100.0);
    Ok(())
}

fn random_client_flows(count: usize, seed: u64) -> impl Iterator<Item = Flow> {
    let mut rng = XorShift::new(seed);
    (0..count).map(move |_| flow(IpAddr::V4(Ipv4Addr::from(rng.next_u32())), VIP_V4, rng.next_u16(), 80))
}

#[test]
fn a_million_random_flows_spread_like_the_table() -> anyhow::Result<()> {
    // Standard deviation of a share of 0.1 over 1M flows: 0.3% of it.
    assert_spread_like_the_table(
        "1M random IPv4 clients and ports",
        VIP_V4,
        80,
        0.02,
        random_client_flows(1_000_000, 0x5eed),
    )
}

#[test]
fn one_client_varying_only_its_source_port_cannot_concentrate() -> anyhow::Result<()> {
    let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    // Over 65,536 flows a share's standard deviation is 1.1% of it: 8% is seven of them.
    let flows = (0..=u16::MAX).map(|sport| flow(client, VIP_V4, sport, 80));
    assert_spread_like_the_table("one IPv4 client, every source port", VIP_V4, 80, 0.08, flows)?;
    let client = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1));
    let flows = (0..=u16::MAX).map(|sport| flow(client, VIP_V6, sport, 443));
    assert_spread_like_the_table("one IPv6 client, every source port", VIP_V6, 443, 0.08, flows)
}

#[test]
fn a_block_of_clients_on_one_source_port_cannot_concentrate() -> anyhow::Result<()> {
    let flows =
        (0..=u16::MAX).map(|low| flow(IpAddr::V4(Ipv4Addr::from(0xc633_0000 | u32::from(low))), VIP_V4, 4444, 80));
    assert_spread_like_the_table("a /16 of IPv4 clients, source port 4444", VIP_V4, 80, 0.08, flows)?;
    let prefix = 0x2001_0db8_0bad_0001u128 << 64;
    let flows = (0..=u16::MAX).map(|low| flow(IpAddr::V6(Ipv6Addr::from(prefix | u128::from(low))), VIP_V6, 4444, 443));
    assert_spread_like_the_table("a /64 of IPv6 clients (low 16 bits), source port 4444", VIP_V6, 443, 0.08, flows)
}

/// 10,000 of the random flows as TCP SYNs through the kernel: the same backend for each, and
/// the same per-backend counters.
#[test]
fn the_kernel_agrees_with_the_model_on_a_sample() -> anyhow::Result<()> {
    if !require_root("the_kernel_agrees_with_the_model_on_a_sample") {
        return Ok(());
    }
    let differential = Differential::load(&config()?, host_params(DEFAULT_MTU))?;
    let cases: Vec<Case> = random_client_flows(10_000, 0x5eed)
        .map(|f| {
            let src = words_addr(f.saddr, FAMILY_IPV4);
            Case {
                origin: format!("{src}:{} -> {VIP_V4}:80", f.sport),
                frame: Packet::tcp(src, VIP_V4, f.sport, 80, TcpFlags::SYN).frame(),
            }
        })
        .collect();
    let before = differential.lb.counters();
    let result = differential.compare_batch(&cases);
    let moved = CounterDelta::between(&before, &differential.lb.counters());
    let errors: Vec<String> = result.err().unwrap_or_default().iter().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "the kernel and the model disagree:\n{}", errors.join("\n"));
    let kernel: BTreeMap<u32, u64> =
        moved.backends.iter().map(|(&index, counter)| (index as u32, counter.packets)).collect();
    let generation = &differential.lb.generation;
    let model = spread(&generation.view(), random_client_flows(10_000, 0x5eed));
    print_distribution(
        "the same 10,000 flows through the kernel",
        generation,
        VIP_V4,
        &kernel,
        &table_shares(generation, VIP_V4, 80)?,
    );
    assert_eq!(kernel, model, "backend counters: kernel vs model");
    Ok(())
}
