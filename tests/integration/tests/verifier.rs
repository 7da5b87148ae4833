//! What the per-generation `.rodata` constants save: the same program loaded with the
//! generation's constants and with every path kept, compared by the verifier's own counts.

use anyhow::Context as _;
use ballast::generation::{config::Config, Generation};
use ballast::kernel::loader::{Constants, HostParams, LoadedGeneration, VerifierStats};
use ballast_test_support::require_root;

fn host() -> HostParams {
    HostParams {
        gateway_mac: [2, 0, 0, 0, 0, 1],
        iface_mac: [2, 0, 0, 0, 0, 2],
        source_v4: None,
        source_v6: None,
        mtu: 1500,
    }
}

fn vip(address: &str, port: u16, backend: &str) -> String {
    format!("[[vip]]\naddress = \"{address}\"\nport = {port}\nprotocol = \"tcp\"\ntable_size = 1021\nbackends = [ {{ address = \"{backend}\" }} ]\n")
}

fn stats(config: &str, constants: Option<Constants>) -> anyhow::Result<VerifierStats> {
    let config = Config::from_toml_str(&format!("hash_seed = 1\n{config}")).context("parsing the config")?;
    let generation = Generation::build(&config).context("building the generation")?;
    let loaded = match constants {
        Some(c) => LoadedGeneration::load_with_constants(&generation, &host(), &c)
            .context("loading the generation with constants")?,
        None => LoadedGeneration::load(&generation, &host(), None).context("loading the generation")?,
    };
    loaded.verifier_stats().context("reading the verifier's stats")
}

#[test]
fn rodata_constants_prune_what_a_generation_cannot_do() -> anyhow::Result<()> {
    if !require_root("rodata_constants_prune_what_a_generation_cannot_do") {
        return Ok(());
    }
    let shapes = [
        ("IPv4 only", vip("192.0.2.10", 80, "10.1.0.1")),
        ("IPv6 only", vip("2001:db8::10", 80, "2001:db8:1::1")),
        ("IPv4 + IPv6", vip("192.0.2.10", 80, "10.1.0.1") + &vip("2001:db8::10", 80, "2001:db8:1::1")),
        ("IPv4 + every-port VIP", vip("192.0.2.10", 80, "10.1.0.1") + &vip("192.0.2.11", 0, "10.1.0.2")),
    ];
    let all_paths = stats(&shapes[2].1, Some(Constants::ALL_PATHS))?;
    println!("| generation | verified insns | xlated insns | verified, every path kept | xlated, every path kept |");
    println!("|---|---|---|---|---|");
    for (name, config) in &shapes {
        let pruned = stats(config, None)?;
        let unpruned = stats(config, Some(Constants::ALL_PATHS))?;
        println!(
            "| {name} | {} | {} | {} | {} |",
            pruned.verified_instructions.unwrap_or(0),
            pruned.xlated_instructions.unwrap_or(0),
            unpruned.verified_instructions.unwrap_or(0),
            unpruned.xlated_instructions.unwrap_or(0)
        );
        assert!(pruned.xlated_instructions <= unpruned.xlated_instructions, "{name}: pruning added instructions");
    }
    let v4 = stats(&shapes[0].1, None)?;
    assert!(
        v4.xlated_instructions.unwrap() < all_paths.xlated_instructions.unwrap(),
        "an IPv4-only generation must not carry the IPv6 path: {v4:?} vs {all_paths:?}"
    );
    assert!(v4.verified_instructions.unwrap() < all_paths.verified_instructions.unwrap());
    Ok(())
}
