//! Config and artifact fuzzing (proptest). Config text, generated field by field from valid
//! and hostile values or mutated from valid configs, must never make `Config::from_toml_str`
//! or `Generation::build` panic: it is accepted as a config that fits one generation and
//! builds, or refused with a `ConfigError` that has a message and a well-formed field path.
//! Artifact bytes with a flipped byte anywhere, cut short, or made of garbage must be refused
//! as what they are (`ballast::Error::ArtifactUnreadable` or `DigestMismatch`), never panic,
//! and never yield an `Artifact` (the only thing the loader loads). No kernel needed.

use anyhow::Context as _;
use ballast::generation::artifact::{load_generation_file, Artifact};
use ballast::generation::config::{Config, ConfigError, EXAMPLE_CONFIG};
use ballast::generation::program::LOAD_BALANCER;
use ballast::generation::Generation;
use ballast::Error;
use ballast_test_support::fixture;
use lb_common::maglev::{is_prime, min_table_size};
use lb_common::maps::{MAX_BACKENDS, MAX_TABLE_ENTRIES, MAX_VIPS};
use proptest::prelude::*;
use proptest::sample::select;

/// Valid configs are built into tables only up to this many entries (a default-sized table
/// of 65537 entries takes tens of milliseconds in a debug build; mutations can produce
/// tables of millions).
const BUILD_AT_MOST_ENTRIES: u64 = 1 << 20;

/// The example config and the fuzzer's test configs (tests/fixtures/).
fn seed_configs() -> anyhow::Result<Vec<String>> {
    let mut configs = vec![EXAMPLE_CONFIG.to_owned()];
    for name in ["mixed", "ipv4-only", "ipv6-only-every-port"] {
        configs.push(fixture(name)?);
    }
    Ok(configs)
}

fn mixed_config() -> anyhow::Result<String> {
    fixture("mixed")
}

/// `count` random cases per property. A failure prints its shrunk input, which reproduces it;
/// nothing is written next to the sources.
fn cases(count: u32) -> ProptestConfig {
    ProptestConfig { cases: count, failure_persistence: None, ..ProptestConfig::default() }
}

// ---- Judging a config text ------------------------------------------------------------

/// `vip[3].backends[0].address`, `hash_seed`, `vip[1].health.port`: identifiers, each
/// optionally indexed, joined by dots.
fn is_well_formed_path(path: &str) -> bool {
    path.split('.').all(|segment| {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.strip_suffix(']')),
            None => (segment, Some("0")),
        };
        let identifier = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        identifier && index.is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn judge_refusal(error: &ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(!error.message.trim().is_empty(), "a refusal without a message: {error:?}");
    prop_assert!(error.path.is_empty() || is_well_formed_path(&error.path), "malformed path in {error:?}");
    prop_assert!(!error.to_string().is_empty());
    Ok(())
}

/// An accepted config fits one generation, as `Config` promises, so the loader need not check.
fn judge_acceptance(config: &Config) -> Result<(), TestCaseError> {
    prop_assert!(!config.vips.is_empty() && config.vips.len() <= MAX_VIPS as usize);
    let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    prop_assert!(backends <= MAX_BACKENDS as usize);
    let entries: u64 = config.vips.iter().map(|v| u64::from(v.table_size)).sum();
    prop_assert!(entries <= u64::from(MAX_TABLE_ENTRIES));
    for vip in &config.vips {
        prop_assert!(is_prime(vip.table_size) && u64::from(vip.table_size) >= min_table_size(vip.backends.len()));
        prop_assert!(vip.backends.iter().any(|b| b.weight > 0));
        prop_assert!(vip.backends.iter().all(|b| b.address.is_ipv4() == vip.address.is_ipv4()));
    }
    let canonical = config.to_canonical_json();
    let again = Config::from_canonical_json(&canonical)
        .map_err(|e| TestCaseError::fail(format!("canonical JSON refused: {e}")))?;
    prop_assert_eq!(again.to_canonical_json(), canonical);
    if entries <= BUILD_AT_MOST_ENTRIES {
        let generation = Generation::build(config)
            .map_err(|e| TestCaseError::fail(format!("an accepted config does not build: {e:#}")))?;
        prop_assert_eq!(generation.maglev.len() as u64, entries);
        prop_assert!(generation.maglev.iter().all(|&e| (e as usize) < generation.backends.len()));
    }
    Ok(())
}

fn judge_config_text(text: &str) -> Result<(), TestCaseError> {
    match Config::from_toml_str(text) {
        Ok(config) => judge_acceptance(&config),
        Err(error) => judge_refusal(&error),
    }
}

// ---- Config text, field by field ------------------------------------------------------
//
// Each field is present and valid most of the time, so that about half of the configs are
// accepted and the rest are refused for one or two hostile values each.

/// A valid value 97 times in a hundred, else a hostile one.
fn mostly(
    valid: impl Strategy<Value = String> + 'static,
    hostile: impl Strategy<Value = String> + 'static,
) -> BoxedStrategy<String> {
    prop_oneof![97 => valid, 3 => hostile].boxed()
}

/// A TOML value of the wrong type for any field.
fn wrong_type() -> impl Strategy<Value = String> {
    select(vec!["true", "1.5", "[]", "{}", "[1, 2]", "\"\"", "1979-05-27", "nan", "-inf"]).prop_map(str::to_owned)
}

fn quoted(text: &str) -> String {
    format!("{text:?}") // Rust's escaping is valid TOML basic-string escaping for these
}

/// Addresses that are no IP address or that no packet can use.
fn hostile_address() -> impl Strategy<Value = String> {
    let bad = vec![
        "192.0.2.300",
        "",
        " 192.0.2.10",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "127.0.0.1",
        "::1",
        "::ffff:192.0.2.10",
        "192.0.2.10/24",
        "fe80::1%eth0",
        "localhost",
        "1.2.3",
        "2001:db8::10:80",
        "10.1.0.1",
        "2001:db8:1::1",
    ];
    prop_oneof![4 => select(bad).prop_map(quoted), 1 => "\\PC{0,16}".prop_map(|a| quoted(&a)), 1 => wrong_type()]
}

/// VIP addresses: few, so that VIPs share addresses (and sometimes collide).
fn vip_address(ipv4: bool) -> BoxedStrategy<String> {
    let valid = if ipv4 {
        vec!["192.0.2.10", "192.0.2.11", "198.18.0.1"]
    } else {
        vec!["2001:db8::10", "2001:DB8:0::11", "2001:db8::12"]
    };
    mostly(select(valid).prop_map(quoted), hostile_address())
}

/// Backend addresses: many, so that a VIP's backends rarely collide.
fn backend_address(ipv4: bool) -> BoxedStrategy<String> {
    let valid = any::<u8>().prop_map(move |n| {
        if ipv4 {
            quoted(&format!("10.1.{}.{}", n / 100, n % 100 + 1))
        } else {
            quoted(&format!("2001:db8:1::{:x}", u16::from(n) + 1))
        }
    });
    mostly(valid, hostile_address())
}

/// Integers around every bound a field has, or any integer, or another type.
fn hostile_integer() -> impl Strategy<Value = String> {
    let interesting = vec![
        -9_223_372_036_854_775_808i64,
        -1,
        0,
        1,
        2,
        53,
        80,
        100,
        101,
        199,
        211,
        65_535,
        65_536,
        65_537,
        4_294_967_295,
        4_294_967_296,
        8_388_617,
        67_108_864,
        67_108_879,
        9_999_999_999,
        i64::MAX,
    ];
    prop_oneof![4 => select(interesting).prop_map(|n| n.to_string()), 2 => any::<i64>().prop_map(|n| n.to_string()), 1 => wrong_type()]
}

fn protocol() -> BoxedStrategy<String> {
    let hostile = prop_oneof![select(vec!["TCP", "sctp", "", "icmp", "tcp "]).prop_map(quoted), wrong_type()];
    mostly(select(vec!["tcp", "udp"]).prop_map(quoted), hostile)
}

/// `key = value` lines, each key present or not (mostly present), and now and then a key
/// nobody knows.
fn fields(entries: Vec<(&'static str, BoxedStrategy<String>)>) -> impl Strategy<Value = Vec<String>> {
    let lines: Vec<_> = entries
        .into_iter()
        .map(|(key, value)| {
            proptest::option::weighted(0.98, value).prop_map(move |v| v.map(|v| format!("{key} = {v}")))
        })
        .collect();
    (lines, proptest::option::weighted(0.02, select(vec!["tabel_size = 211", "ports = 80", "backend = []"])))
        .prop_map(|(lines, unknown)| lines.into_iter().flatten().chain(unknown.map(str::to_owned)).collect())
}

fn backend(ipv4: bool) -> impl Strategy<Value = String> {
    let weight = mostly(select(vec!["1", "1", "2", "3", "0", "65535"]).prop_map(str::to_owned), hostile_integer());
    fields(vec![("address", backend_address(ipv4)), ("weight", weight)]).prop_map(|f| format!("{{ {} }}", f.join(", ")))
}

fn vip() -> impl Strategy<Value = String> {
    any::<bool>().prop_flat_map(|ipv4| {
        // Primes of at least 100 x 4 backends; "default" (65537) when the key is left out.
        let table_size = mostly(select(vec!["401", "409", "503", "1021"]).prop_map(str::to_owned), hostile_integer());
        let backends = proptest::collection::vec(backend(ipv4), 1..5).prop_map(|b| format!("[{}]", b.join(", ")));
        let backends = mostly(backends, prop_oneof![Just("[]".to_owned()), wrong_type()]);
        let port = mostly(
            prop_oneof![select(vec![0u16, 53, 80, 443]), any::<u16>()].prop_map(|p| p.to_string()),
            hostile_integer(),
        );
        fields(vec![
            ("address", vip_address(ipv4)),
            ("port", port),
            ("protocol", protocol()),
            ("table_size", table_size),
            ("backends", backends),
        ])
        .prop_map(|lines| format!("[[vip]]\n{}\n", lines.join("\n")))
    })
}

fn config_text() -> impl Strategy<Value = String> {
    let seed = mostly(any::<u32>().prop_map(|s| format!("{s:#x}")), hostile_integer());
    let vips = prop_oneof![20 => proptest::collection::vec(vip(), 1..6), 1 => Just(vec![])];
    (proptest::option::weighted(0.98, seed), vips).prop_map(|(seed, vips)| {
        let seed_line = seed.map(|s| format!("hash_seed = {s}\n")).unwrap_or_default();
        format!("{seed_line}{}", vips.concat())
    })
}

// ---- Config text, mutated -------------------------------------------------------------

#[derive(Clone, Debug)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: &'static str },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    ReplaceNumber { nth: usize, with: String },
}

fn edit() -> impl Strategy<Value = Edit> {
    let tokens = vec![
        "=",
        "[",
        "]",
        "{",
        "}",
        "\"",
        ",",
        "\n",
        "[[vip]]\n",
        "0",
        "-",
        "99999999999999999999",
        "#",
        "port = 0\n",
        "weight = 0",
        "\u{0}",
        "é",
        "table_size = 211\n",
        "backends = []\n",
        "'",
        "\\",
        "[vip]\n",
        "0x",
        "1e3",
    ];
    let number = prop_oneof![hostile_integer(), Just(String::new())];
    prop_oneof![
        (any::<usize>(), 1..8usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), select(tokens)).prop_map(|(at, text)| Edit::Insert { at, text }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), number).prop_map(|(nth, with)| Edit::ReplaceNumber { nth, with }),
    ]
}

/// The char boundary at or before `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, edit: &Edit) {
    match edit {
        Edit::Delete { at, len } => {
            let start = boundary(text, *at);
            let end = boundary(text, start + len);
            text.replace_range(start..end.max(start), "");
        }
        Edit::Insert { at, text: token } => {
            let at = boundary(text, *at);
            text.insert_str(at, token);
        }
        Edit::DuplicateLine { line } => edit_lines(text, |lines| {
            let copy = lines[line % lines.len()].clone();
            lines.insert(line % lines.len(), copy);
        }),
        Edit::SwapLines { a, b } => edit_lines(text, |lines| {
            let len = lines.len();
            lines.swap(a % len, b % len);
        }),
        Edit::ReplaceNumber { nth, with } => replace_number(text, *nth, with),
    }
}

fn edit_lines(text: &mut String, change: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if !lines.is_empty() {
        change(&mut lines);
        *text = lines.join("\n");
    }
}

/// Replaces the `nth` run of decimal digits (modulo how many there are).
fn replace_number(text: &mut String, nth: usize, with: &str) {
    let bytes = text.as_bytes();
    let runs: Vec<(usize, usize)> = (0..bytes.len())
        .filter(|&i| bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_digit()))
        .map(|start| (start, (start..bytes.len()).find(|&i| !bytes[i].is_ascii_digit()).unwrap_or(bytes.len())))
        .collect();
    if let Some(&(start, end)) = runs.get(nth % runs.len().max(1)) {
        text.replace_range(start..end, with);
    }
}

fn mutated_config() -> anyhow::Result<impl Strategy<Value = String>> {
    Ok((select(seed_configs()?), proptest::collection::vec(edit(), 1..4)).prop_map(|(seed, edits)| {
        let mut text = seed.to_owned();
        for edit in &edits {
            apply(&mut text, edit);
        }
        text
    }))
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn generated_configs_are_accepted_whole_or_refused_cleanly(text in config_text()) {
        judge_config_text(&text)?;
    }

    #[test]
    fn mutated_configs_are_accepted_whole_or_refused_cleanly(text in mutated_config().unwrap()) {
        judge_config_text(&text)?;
    }

    #[test]
    fn mutated_canonical_json_is_accepted_whole_or_refused_cleanly(edits in proptest::collection::vec(edit(), 1..4)) {
        let mut json = Config::from_toml_str(&mixed_config().unwrap()).unwrap().to_canonical_json();
        for edit in &edits {
            apply(&mut json, edit);
        }
        match Config::from_canonical_json(&json) {
            Ok(config) => judge_acceptance(&config)?,
            Err(error) => judge_refusal(&error)?,
        }
    }
}

#[test]
fn the_path_check_knows_good_paths_from_bad() {
    for good in ["hash_seed", "vip", "vip[12]", "vip[0].backends[3].address", "vip[1].health.port"] {
        assert!(is_well_formed_path(good), "{good}");
    }
    for bad in ["", "vip[", "vip[]", "vip[x]", ".vip", "vip..port", "Vip", "vip[0]]"] {
        assert!(!is_well_formed_path(bad), "{bad}");
    }
}

// ---- Artifacts ------------------------------------------------------------------------

/// Whether `error` is a refusal of corrupt artifact bytes as such: unreadable (magic, format
/// version, truncated, trailing bytes) or altered (digest mismatch).
fn is_artifact_refusal(error: &Error) -> bool {
    matches!(error.root(), Error::ArtifactUnreadable { .. } | Error::DigestMismatch { .. })
}

fn small_config() -> anyhow::Result<Config> {
    Config::from_toml_str(&mixed_config()?).context("parsing the mixed config")
}

/// An artifact whose program is a few bytes: cheap to check exhaustively.
fn small_artifact() -> anyhow::Result<Vec<u8>> {
    let artifact = Artifact::build(&small_config()?, b"\x7fELF not really a program")
        .context("building an artifact of the mixed config and a fake program")?;
    Ok(artifact.to_bytes())
}

/// An artifact with the real XDP program (about 200 KB, hashed on every read).
fn real_artifact() -> anyhow::Result<Vec<u8>> {
    let artifact =
        Artifact::build(&small_config()?, LOAD_BALANCER).context("building an artifact of the mixed config")?;
    Ok(artifact.to_bytes())
}

/// `bytes` must be refused as corrupt artifact bytes; the error.
fn assert_refused(bytes: &[u8], what: &str) -> Error {
    match Artifact::from_bytes(bytes) {
        Ok(artifact) => panic!("{what}: accepted as {}", artifact.digest_string()),
        Err(error) => {
            assert!(is_artifact_refusal(&error), "{what}: not refused as an artifact: {error:?}");
            error
        }
    }
}

#[test]
fn every_flipped_byte_of_an_artifact_is_refused() -> anyhow::Result<()> {
    let bytes = small_artifact()?;
    assert!(Artifact::from_bytes(&bytes).is_ok());
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= mask;
            assert_refused(&corrupt, &format!("byte {at} xor {mask:#04x}"));
        }
    }
    Ok(())
}

#[test]
fn every_truncation_of_an_artifact_is_refused() -> anyhow::Result<()> {
    let bytes = small_artifact()?;
    for len in 0..bytes.len() {
        assert_refused(&bytes[..len], &format!("cut to {len} of {} bytes", bytes.len()));
    }
    Ok(())
}

#[test]
fn a_corrupt_artifact_file_is_never_loaded() {
    let mut bytes = real_artifact().unwrap();
    let middle_of_the_program = bytes.len() - 32 - LOAD_BALANCER.len() / 2;
    bytes[middle_of_the_program] ^= 0x10;
    let path = std::env::temp_dir().join(format!("ballast-config-fuzz-{}.bal", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    // Both ways a file becomes a generation to load: as an artifact, and as "artifact or config".
    let read = Artifact::read(&path).map(|_| ());
    let either = load_generation_file(&path).map(|_| ());
    std::fs::remove_file(&path).unwrap();
    for outcome in [read, either] {
        let error = outcome.expect_err("a corrupt artifact file was accepted");
        assert!(matches!(error.root(), Error::DigestMismatch { .. }), "not a digest mismatch: {error:?}");
        assert!(error.to_string().contains(path.to_str().unwrap()), "the error does not name the file: {error}");
    }
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn real_artifacts_with_a_flipped_byte_are_refused(at in any::<usize>(), mask in 1..=255u8) {
        let mut bytes = real_artifact().unwrap();
        let at = at % bytes.len();
        bytes[at] ^= mask;
        assert_refused(&bytes, &format!("byte {at} xor {mask:#04x}"));
    }

    #[test]
    fn real_artifacts_cut_short_are_refused(len in any::<usize>()) {
        let bytes = real_artifact().unwrap();
        let len = len % bytes.len();
        assert_refused(&bytes[..len], &format!("cut to {len}"));
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn garbage_is_refused(garbage in proptest::collection::vec(any::<u8>(), 0..4096)) {
        assert_refused(&garbage, "random bytes");
    }

    #[test]
    fn garbage_after_the_magic_is_refused(version in prop_oneof![Just(1u32), any::<u32>()], garbage in proptest::collection::vec(any::<u8>(), 0..512)) {
        let bytes = [b"BALLAST\0".as_slice(), &version.to_le_bytes(), &garbage].concat();
        assert_refused(&bytes, "the magic, a version and random bytes");
    }

    #[test]
    fn garbage_after_a_whole_artifact_is_refused(garbage in proptest::collection::vec(any::<u8>(), 1..64)) {
        let bytes = [small_artifact().unwrap(), garbage].concat();
        let error = assert_refused(&bytes, "a whole artifact and random bytes");
        prop_assert!(matches!(error.root(), Error::ArtifactUnreadable { .. }), "{:?}", error);
        prop_assert!(error.to_string().contains("after the artifact's digest"), "{}", error);
    }
}

/// The generators must reach both sides: configs accepted (and built) as well as refused.
#[test]
fn the_generators_reach_acceptance_and_refusal() -> anyhow::Result<()> {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for (name, strategy) in [("generated", config_text().boxed()), ("mutated", mutated_config()?.boxed())] {
        let samples = 500;
        let accepted = (0..samples)
            .filter(|_| Config::from_toml_str(&strategy.new_tree(&mut runner).unwrap().current()).is_ok())
            .count();
        println!("{name} configs: {accepted} of {samples} accepted");
        assert!((samples / 50..samples * 49 / 50).contains(&accepted), "{name}: {accepted} of {samples} accepted");
    }
    Ok(())
}
