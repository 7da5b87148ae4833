//! The TOML configuration of ballast and its validation.
//!
//! A config is parsed into loose raw structs (addresses as strings, numbers as `i64`,
//! optional fields as `Option`) and then checked by hand, so that every refusal names the
//! offending field by path (`vip[2].backends[5].address`) and quotes the offending value.
//! Unknown keys are refused by serde (`deny_unknown_fields`): a misspelt optional key such
//! as `tabel_size` would otherwise be silently ignored. A [`Config`] that comes out of
//! [`Config::from_toml_str`] fits one generation: the loader need not check again.
pub use crate::error::ConfigError;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use lb_common::maglev;
use lb_common::maps::{MAX_BACKENDS, MAX_TABLE_ENTRIES, MAX_VIPS};
use lb_common::wire::{IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

use super::address::is_link_local;

/// A small valid config: what `ballast` users start from, and what the demo runs.
pub const EXAMPLE_CONFIG: &str = r#"# ballast example config.

# Fleet-wide flow hash seed (u32). Every load balancer in front of the same backends must
# use the same seed, so that each sends a given flow to the same backend.
hash_seed = 0x5eed

# Web: TCP port 80 of 192.0.2.10. 10.1.0.3 gets twice the share of each other backend.
# table_size is left out: the default (65537 here) suits up to 655 backends.
[[vip]]
address = "192.0.2.10"
port = 80
protocol = "tcp"
backends = [
    { address = "10.1.0.1" },             # weight defaults to 1
    { address = "10.1.0.2", weight = 1 },
    { address = "10.1.0.3", weight = 2 },
]

# DNS: UDP port 53 of the same address. A small table (a prime, at least 100 entries per
# backend) costs less kernel memory; port = 0 would serve every port of the address.
[[vip]]
address = "192.0.2.10"
port = 53
protocol = "udp"
table_size = 1021
backends = [
    { address = "10.2.0.1" },
    { address = "10.2.0.2" },
]

# HTTPS over IPv6. Backends of an IPv6 VIP are IPv6 (IP6IP6); of an IPv4 VIP, IPv4 (IPIP).
[[vip]]
address = "2001:db8::10"
port = 443
protocol = "tcp"
backends = [
    { address = "2001:db8:1::1" },
    { address = "2001:db8:1::2" },
]
"#;

/// The largest config file read (16 MiB): the largest config a generation holds (4096 VIPs,
/// 16384 backends) takes about 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Weights are relative shares; 16 bits is plenty, and the bound catches a stray extra digit
/// that would otherwise starve every other backend.
pub const MAX_WEIGHT: u32 = 65_535;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as in the packet and in `VipKey::protocol`.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// Same family as the VIP's address.
    pub address: IpAddr,
    /// 0 to [`MAX_WEIGHT`]; 0 drains the backend (it keeps no table entries).
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VipConfig {
    pub address: IpAddr,
    /// 0 serves every port of the address.
    pub port: u16,
    pub protocol: Protocol,
    /// Maglev table size: the configured one, or the default for the backend count.
    pub table_size: u32,
    /// In file order; at least one has a positive weight.
    pub backends: Vec<BackendConfig>,
    /// How `ballast run` checks this VIP's backends; None: they are always taken as healthy.
    /// Not part of the generation (it does not change forwarding).
    pub health: Option<HealthCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    pub hash_seed: u32,
    /// In file order.
    pub vips: Vec<VipConfig>,
    /// Settings of `ballast run`; not part of the generation.
    pub daemon: DaemonSettings,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HealthProbe {
    /// A TCP connection that opens within the timeout.
    Tcp,
    /// An HTTP/1.0 GET of `path` answered with `expect_status`.
    Http { path: String, expect_status: u16 },
}

/// How a health check reaches a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum HealthVia {
    /// To the VIP's address, encapsulated toward the backend as the load balancer forwards
    /// (the daemon's TC egress program): a pass proves the whole path real traffic takes.
    Tunnel,
    /// To the backend's own address.
    Direct,
}

impl HealthVia {
    pub fn name(self) -> &'static str {
        match self {
            HealthVia::Tunnel => "tunnel",
            HealthVia::Direct => "direct",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    /// Port probed (default: the VIP's port): on the VIP's address through the tunnel, on the
    /// backend's own address directly.
    pub port: u16,
    /// As configured; None: through the tunnel where the daemon can attach its program, else
    /// directly (with a warning).
    pub via: Option<HealthVia>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy backend healthy, failures the reverse.
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DaemonSettings {
    /// Below this fraction of healthy backends a VIP fails open: it keeps its last good set.
    pub min_healthy: f64,
    /// Health-driven swaps happen at most this often; changes in between wait for the next.
    pub min_swap_interval_ms: u64,
    /// Predecessors a swapped-in generation remembers for the second chance (0: none).
    pub lineage_depth: u64,
    /// A generation with lineage serves this long, then the settled one takes over.
    pub drain_period_s: u64,
}

// min_healthy is validated finite (0.0 to 1.0), so equality is an equivalence.
impl Eq for DaemonSettings {}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            min_healthy: 0.5,
            min_swap_interval_ms: 5_000,
            lineage_depth: super::lineage::DEFAULT_DEPTH as u64,
            drain_period_s: super::lineage::DEFAULT_DRAIN_PERIOD_SECS,
        }
    }
}

/// The file as written. Numbers are `i64` (what TOML integers are) so that out-of-range
/// values get our path-named message rather than serde's; optional-looking fields are
/// `Option` so that a missing one does too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hash_seed: Option<i64>,
    #[serde(default)]
    vip: Vec<RawVip>,
    daemon: Option<RawDaemon>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    min_healthy: Option<f64>,
    min_swap_interval_ms: Option<i64>,
    lineage_depth: Option<i64>,
    drain_period_s: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    via: Option<String>,
    port: Option<i64>,
    path: Option<String>,
    expect_status: Option<i64>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
    table_size: Option<i64>,
    backends: Option<Vec<RawBackend>>,
    health: Option<RawHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<String>,
    weight: Option<i64>,
}

impl Config {
    /// Parses and validates a config; the first problem found is the error.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_refusal(text, &e))?;
        validate(raw)
    }

    /// Reads and validates the config at `path`; errors name the file, e.g.
    /// "lb.toml: vip[2].port: 70000 is not a port (0 to 65535)". Only a regular file (or a
    /// symlink to one) of at most [`MAX_CONFIG_BYTES`] is read: a FIFO, a device such as
    /// `/dev/zero` or a directory is refused at once, without blocking or reading it.
    pub fn load(path: &Path) -> crate::Result<Config> {
        let bytes = crate::files::read_regular(path, MAX_CONFIG_BYTES, "config")?;
        Config::from_file_bytes(path, &bytes)
    }

    /// Validates the bytes read from the config file `path` (errors name the file).
    pub fn from_file_bytes(path: &Path, bytes: &[u8]) -> crate::Result<Config> {
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(crate::Error::Config(ConfigError::new(
                "",
                format!("larger than {} (MAX_CONFIG_BYTES)", crate::files::human_size(MAX_CONFIG_BYTES)),
            ))
            .context(path.display()));
        }
        if bytes.starts_with(super::artifact::MAGIC) {
            return Err(crate::Error::Config(ConfigError::new(
                "",
                "a generation artifact (`ballast build` output), not a TOML config: give the config it was \
                 built from (`ballast inspect` reads artifacts)",
            ))
            .context(path.display()));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            crate::Error::Config(ConfigError::new("", format!("not UTF-8 text (byte {})", e.valid_up_to())))
                .context(path.display())
        })?;
        Config::from_toml_str(text).map_err(|e| crate::Error::Config(e).context(path.display()))
    }

    /// The config as canonical JSON, for content-addressed digests: VIPs sorted by
    /// (family, address, port, protocol), backends by address, table sizes resolved, no
    /// whitespace. Configs that differ only in order render identically.
    pub fn to_canonical_json(&self) -> String {
        let mut vips: Vec<&VipConfig> = self.vips.iter().collect();
        // IpAddr orders every IPv4 address before every IPv6 one: family first.
        vips.sort_by_key(|v| (v.address, v.port, v.protocol));
        let vips: Vec<serde_json::Value> = vips
            .into_iter()
            .map(|v| {
                let mut backends: Vec<&BackendConfig> = v.backends.iter().collect();
                backends.sort_by_key(|b| b.address);
                let backends: Vec<serde_json::Value> = backends
                    .into_iter()
                    .map(|b| serde_json::json!({ "address": b.address.to_string(), "weight": b.weight }))
                    .collect();
                // Keys in alphabetical order, so the output is the same whether or not some
                // crate turns on serde_json's `preserve_order`.
                serde_json::json!({
                    "address": v.address.to_string(),
                    "backends": backends,
                    "port": v.port,
                    "protocol": v.protocol.name(),
                    "table_size": v.table_size,
                })
            })
            .collect();
        // Same keys as the TOML, so `from_canonical_json` reads it back through `validate`.
        serde_json::json!({ "hash_seed": self.hash_seed, "vip": vips }).to_string()
    }

    /// Reads back what [`Config::to_canonical_json`] wrote (from a generation artifact),
    /// validating it like a TOML config.
    pub fn from_canonical_json(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ConfigError::new("", plain_words(&e.to_string())))?;
        validate(raw)
    }
}

/// What a config's values must be, for messages that name the field: serde's own say
/// "invalid type: string \"80\", expected i64" or "expected struct RawBackend".
#[derive(Clone, Copy)]
enum Shape {
    Integer,
    /// An integer or a float.
    Number,
    Text,
    /// A table with these keys, described as `what` ("a backend table such as ...").
    Table(&'static str, &'static [(&'static str, Shape)]),
    ArrayOf(&'static str, &'static Shape),
}

const BACKEND_SHAPE: Shape = Shape::Table(
    "a backend table such as { address = \"10.1.0.1\", weight = 1 }",
    &[("address", Shape::Text), ("weight", Shape::Integer)],
);
const HEALTH_SHAPE: Shape = Shape::Table(
    "a health table such as { kind = \"tcp\", interval_ms = 1000 }",
    &[
        ("kind", Shape::Text),
        ("via", Shape::Text),
        ("port", Shape::Integer),
        ("path", Shape::Text),
        ("expect_status", Shape::Integer),
        ("interval_ms", Shape::Integer),
        ("timeout_ms", Shape::Integer),
        ("rise", Shape::Integer),
        ("fall", Shape::Integer),
    ],
);
const VIP_SHAPE: Shape = Shape::Table(
    "a [[vip]] table",
    &[
        ("address", Shape::Text),
        ("port", Shape::Integer),
        ("protocol", Shape::Text),
        ("table_size", Shape::Integer),
        ("backends", Shape::ArrayOf("an array of backend tables", &BACKEND_SHAPE)),
        ("health", HEALTH_SHAPE),
    ],
);
const CONFIG_SHAPE: Shape = Shape::Table(
    "a config",
    &[
        ("hash_seed", Shape::Integer),
        ("vip", Shape::ArrayOf("[[vip]] tables", &VIP_SHAPE)),
        (
            "daemon",
            Shape::Table(
                "a [daemon] table",
                &[
                    ("min_healthy", Shape::Number),
                    ("min_swap_interval_ms", Shape::Integer),
                    ("lineage_depth", Shape::Integer),
                    ("drain_period_s", Shape::Integer),
                ],
            ),
        ),
    ],
);

/// A TOML text serde refused: a syntax error keeps toml's message (line, column, the line
/// itself); a document of the wrong shape gets a message naming the field, in plain words.
fn toml_refusal(text: &str, error: &toml::de::Error) -> ConfigError {
    let Ok(document) = text.parse::<toml::Table>() else {
        return ConfigError::new("", plain_words(error.to_string().trim_end()));
    };
    let mut problems = Vec::new();
    shape_problems(&toml::Value::Table(document), &CONFIG_SHAPE, "", &mut problems);
    match problems.len() {
        0 => ConfigError::new("", plain_words(error.to_string().trim_end())),
        // serde stopped at the one problem there is: its position is this one's.
        1 => {
            let mut problem = problems.remove(0);
            if let Some(span) = error.span() {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                problem.message.push_str(&format!(" (line {line}, column {column})"));
            }
            problem
        }
        _ => problems.remove(0),
    }
}

/// Every value of `value` (at `path`) that does not have its shape, in key order.
fn shape_problems(value: &toml::Value, shape: &Shape, path: &str, problems: &mut Vec<ConfigError>) {
    let at = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match (shape, value) {
        (Shape::Integer, toml::Value::Integer(_))
        | (Shape::Number, toml::Value::Integer(_) | toml::Value::Float(_))
        | (Shape::Text, toml::Value::String(_)) => {}
        (Shape::Table(_, keys), toml::Value::Table(table)) => {
            for (key, value) in table {
                match keys.iter().find(|(name, _)| name == key) {
                    Some((_, shape)) => shape_problems(value, shape, &at(key), problems),
                    None => {
                        let known: Vec<&str> = keys.iter().map(|(name, _)| *name).collect();
                        problems.push(ConfigError::new(
                            path,
                            format!("unknown key '{key}' (known here: {})", known.join(", ")),
                        ));
                    }
                }
            }
        }
        (Shape::ArrayOf(_, element), toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                shape_problems(item, element, &format!("{path}[{i}]"), problems);
            }
        }
        (shape, value) => {
            let expected = match shape {
                Shape::Integer => "an integer",
                Shape::Number => "a number",
                Shape::Text => "a string (in quotes)",
                Shape::Table(what, _) | Shape::ArrayOf(what, _) => what,
            };
            let path = if path.is_empty() { "(the file)" } else { path };
            problems.push(ConfigError::new(path, format!("{} is {}; expected {expected}", shown(value), kind(value))));
        }
    }
}

/// A TOML value as a message quotes it (short).
fn shown(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::Table(_) => "{ ... }".to_owned(),
        toml::Value::Array(items) if !items.is_empty() => "[ ... ]".to_owned(),
        other => other.to_string(),
    };
    if text.chars().count() > 40 {
        format!("{}...", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

fn kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number with a fraction",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date or time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// serde's words for types, in the config's words: no Rust type names in a message.
fn plain_words(message: &str) -> String {
    [
        ("struct RawConfig", "a config"),
        ("struct RawVip", "a [[vip]] table"),
        ("struct RawBackend", "a backend table"),
        ("struct RawHealth", "a health table"),
        ("struct RawDaemon", "a [daemon] table"),
        ("expected i64", "expected an integer"),
        ("expected u64", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected f64", "expected a number"),
        ("a sequence", "an array"),
        ("a map", "a table"),
        ("unknown field", "unknown key"),
        ("invalid type: ", ""),
        ("floating point", "number"),
    ]
    .iter()
    .fold(message.to_owned(), |text, (from, to)| text.replace(from, to))
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let hash_seed = match raw.hash_seed {
        None => {
            return Err(ConfigError::new(
                "hash_seed",
                "missing; set the fleet-wide flow hash seed, a u32 (e.g. hash_seed = 0x5eed)",
            ))
        }
        Some(seed) => u32::try_from(seed)
            .map_err(|_| ConfigError::new("hash_seed", format!("{seed} does not fit in a u32 (0 to 4294967295)")))?,
    };
    if raw.vip.is_empty() {
        return Err(ConfigError::new("vip", "no [[vip]] table; a config serves at least one VIP"));
    }
    // Generation limits that need no validated field come first: a config far too large is
    // refused for that, not for whatever its thousandth VIP gets wrong.
    if raw.vip.len() as u64 > MAX_VIPS as u64 {
        return Err(ConfigError::new(
            "",
            format!("{} VIPs; a generation holds at most {MAX_VIPS} (MAX_VIPS)", raw.vip.len()),
        ));
    }
    let total_backends: u64 = raw.vip.iter().map(|v| v.backends.as_ref().map_or(0, Vec::len) as u64).sum();
    if total_backends > MAX_BACKENDS as u64 {
        return Err(ConfigError::new(
            "",
            format!(
                "{total_backends} backends over all VIPs; a generation holds at most {MAX_BACKENDS} (MAX_BACKENDS)"
            ),
        ));
    }

    let mut vips = Vec::with_capacity(raw.vip.len());
    let mut seen: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
    for (i, raw_vip) in raw.vip.into_iter().enumerate() {
        let vip = validate_vip(i, raw_vip)?;
        if let Some(first) = seen.insert((vip.address, vip.port, vip.protocol), i) {
            return Err(ConfigError::new(
                format!("vip[{i}]"),
                format!("duplicates vip[{first}] ({}/{})", SocketAddr::new(vip.address, vip.port), vip.protocol.name()),
            ));
        }
        vips.push(vip);
    }

    // A backend at a VIP's address: encapsulated packets would be sent to the load balancer's
    // own VIP, to come back through it (or to be dropped), never to reach a server.
    let vip_addresses: HashMap<IpAddr, usize> =
        vips.iter().enumerate().rev().map(|(k, vip)| (vip.address, k)).collect();
    for (i, vip) in vips.iter().enumerate() {
        for (j, backend) in vip.backends.iter().enumerate() {
            if let Some(&k) = vip_addresses.get(&backend.address) {
                return Err(ConfigError::new(
                    format!("vip[{i}].backends[{j}].address"),
                    format!(
                        "'{}' is the address of vip[{k}]: a backend must be a server behind the load \
                         balancer, not one of its VIPs",
                        backend.address
                    ),
                ));
            }
        }
    }

    let total_entries: u64 = vips.iter().map(|v| v.table_size as u64).sum();
    if total_entries > MAX_TABLE_ENTRIES as u64 {
        return Err(ConfigError::new(
            "",
            format!(
                "{total_entries} Maglev table entries over all VIPs; a generation holds at most \
                 {MAX_TABLE_ENTRIES} (MAX_TABLE_ENTRIES): set smaller table_size values"
            ),
        ));
    }
    let daemon = validate_daemon(raw.daemon)?;
    Ok(Config { hash_seed, vips, daemon })
}

fn validate_daemon(raw: Option<RawDaemon>) -> Result<DaemonSettings, ConfigError> {
    let defaults = DaemonSettings::default();
    let Some(raw) = raw else { return Ok(defaults) };
    let min_healthy = raw.min_healthy.unwrap_or(defaults.min_healthy);
    if !(0.0..=1.0).contains(&min_healthy) {
        return Err(ConfigError::new("daemon.min_healthy", format!("{min_healthy} is not a fraction (0.0 to 1.0)")));
    }
    let min_swap_interval_ms =
        in_range("daemon.min_swap_interval_ms", raw.min_swap_interval_ms, defaults.min_swap_interval_ms, 0, 3_600_000)?;
    let max_depth = super::lineage::MAX_DEPTH as u64;
    let lineage_depth = in_range("daemon.lineage_depth", raw.lineage_depth, defaults.lineage_depth, 0, max_depth)?;
    let drain_period_s = in_range("daemon.drain_period_s", raw.drain_period_s, defaults.drain_period_s, 1, 604_800)?;
    Ok(DaemonSettings { min_healthy, min_swap_interval_ms, lineage_depth, drain_period_s })
}

/// An optional integer field within `min..=max`, or `default` when absent.
fn in_range(path: &str, value: Option<i64>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => u64::try_from(v)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| ConfigError::new(path, format!("{v} is out of range ({min} to {max})"))),
    }
}

fn validate_health(at: &dyn Fn(&str) -> String, raw: RawHealth, vip_port: u16) -> Result<HealthCheck, ConfigError> {
    let probe = match raw.kind.as_deref() {
        None | Some("tcp") => {
            if raw.path.is_some() || raw.expect_status.is_some() {
                return Err(ConfigError::new(at("health"), "path and expect_status go with kind = \"http\""));
            }
            HealthProbe::Tcp
        }
        Some("http") => {
            let path = raw.path.unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::new(
                    at("health.path"),
                    format!("'{path}' is not an HTTP path (starts with /, no spaces)"),
                ));
            }
            let expect_status = in_range(&at("health.expect_status"), raw.expect_status, 200, 100, 599)? as u16;
            HealthProbe::Http { path, expect_status }
        }
        Some(other) => return Err(ConfigError::new(at("health.kind"), format!("'{other}' is not tcp or http"))),
    };
    let port = match raw.port {
        None if vip_port == 0 => {
            return Err(ConfigError::new(
                at("health.port"),
                "missing: the VIP serves every port, so say which to probe",
            ))
        }
        None => vip_port,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| ConfigError::new(at("health.port"), format!("{p} is not a port (1 to 65535)")))?,
    };
    let via = match raw.via.as_deref() {
        None => None,
        Some("tunnel") => Some(HealthVia::Tunnel),
        Some("direct") => Some(HealthVia::Direct),
        Some(other) => return Err(ConfigError::new(at("health.via"), format!("'{other}' is not tunnel or direct"))),
    };
    let interval_ms = in_range(&at("health.interval_ms"), raw.interval_ms, 1_000, 10, 3_600_000)?;
    let timeout_ms = in_range(&at("health.timeout_ms"), raw.timeout_ms, interval_ms.min(1_000) / 2, 1, interval_ms)?;
    let rise = in_range(&at("health.rise"), raw.rise, 2, 1, 100)? as u32;
    let fall = in_range(&at("health.fall"), raw.fall, 3, 1, 100)? as u32;
    Ok(HealthCheck { probe, port, via, interval_ms, timeout_ms, rise, fall })
}

fn validate_vip(i: usize, raw: RawVip) -> Result<VipConfig, ConfigError> {
    let at = |field: &str| format!("vip[{i}].{field}");
    let address = parse_address(&at("address"), raw.address.as_deref(), "VIP")?;
    let port = match raw.port {
        None => return Err(ConfigError::new(at("port"), "missing (0 serves every port of the address)")),
        Some(p) => {
            u16::try_from(p).map_err(|_| ConfigError::new(at("port"), format!("{p} is not a port (0 to 65535)")))?
        }
    };
    let protocol = match raw.protocol.as_deref() {
        None => return Err(ConfigError::new(at("protocol"), "missing (tcp or udp)")),
        Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => return Err(ConfigError::new(at("protocol"), format!("'{other}' is not tcp or udp"))),
    };

    let raw_backends = match raw.backends {
        None => return Err(ConfigError::new(at("backends"), "missing; a VIP needs at least one backend")),
        Some(b) if b.is_empty() => {
            return Err(ConfigError::new(at("backends"), "empty; a VIP needs at least one backend"))
        }
        Some(b) => b,
    };
    let mut backends = Vec::with_capacity(raw_backends.len());
    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    for (j, raw_backend) in raw_backends.into_iter().enumerate() {
        let at = |field: &str| format!("vip[{i}].backends[{j}].{field}");
        let backend_address = parse_address(&at("address"), raw_backend.address.as_deref(), "backend")?;
        if backend_address.is_ipv4() != address.is_ipv4() {
            return Err(ConfigError::new(
                at("address"),
                format!("'{backend_address}' is {} but the VIP is {}", family(backend_address), family(address)),
            ));
        }
        if let Some(first) = seen.insert(backend_address, j) {
            return Err(ConfigError::new(
                at("address"),
                format!("'{backend_address}' duplicates vip[{i}].backends[{first}]"),
            ));
        }
        let weight = match raw_backend.weight {
            None => 1,
            Some(w) => u32::try_from(w)
                .ok()
                .filter(|&w| w <= MAX_WEIGHT)
                .ok_or_else(|| ConfigError::new(at("weight"), format!("{w} is not a weight (0 to {MAX_WEIGHT})")))?,
        };
        backends.push(BackendConfig { address: backend_address, weight });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(ConfigError::new(
            at("backends"),
            "every weight is 0; at least one backend needs a positive weight",
        ));
    }

    let table_size = table_size(&at("table_size"), raw.table_size, backends.len())?;
    let health = raw.health.map(|h| validate_health(&at, h, port)).transpose()?;
    Ok(VipConfig { address, port, protocol, table_size, backends, health })
}

/// The explicit table size if it is usable, else the default for `backends` backends.
fn table_size(path: &str, explicit: Option<i64>, backends: usize) -> Result<u32, ConfigError> {
    let min = maglev::min_table_size(backends);
    let Some(size) = explicit else {
        return maglev::default_table_size(backends).ok_or_else(|| {
            ConfigError::new(
                path,
                format!(
                    "no default table size for {backends} backends (the largest default serves {}); \
                     set table_size to a prime of at least {min}",
                    maglev::DEFAULT_TABLE_SIZES.last().map_or(0, |&m| m as u64 / maglev::ENTRIES_PER_BACKEND)
                ),
            )
        });
    };
    // Checked before primality so that 0 and negative sizes get the clearer message.
    if size < min as i64 {
        return Err(ConfigError::new(
            path,
            format!(
                "{size} is below {min}: {} entries per backend x {backends} backends keep each share within 1%",
                maglev::ENTRIES_PER_BACKEND
            ),
        ));
    }
    // Not negative any more: failing the conversion means too large as well.
    let size = match u32::try_from(size) {
        Ok(size) if size <= MAX_TABLE_ENTRIES => size,
        _ => {
            return Err(ConfigError::new(
                path,
                format!("{size} is larger than {MAX_TABLE_ENTRIES} (MAX_TABLE_ENTRIES), the most a generation holds"),
            ))
        }
    };
    if !maglev::is_prime(size) {
        return Err(ConfigError::new(
            path,
            format!("{size} is not prime; Maglev needs a prime size so that every permutation covers the table"),
        ));
    }
    Ok(size)
}

/// Parses a VIP or backend address and refuses those no packet can be forwarded to or from.
fn parse_address(path: &str, text: Option<&str>, what: &str) -> Result<IpAddr, ConfigError> {
    let Some(text) = text else {
        return Err(ConfigError::new(path, "missing"));
    };
    let address: IpAddr = text.parse().map_err(|_| ConfigError::new(path, format!("'{text}' is not an IP address")))?;
    let unusable = match address {
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("an IPv4-mapped IPv6 address (write the IPv4 address)"),
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_loopback() => Some("a loopback address"),
        a if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.octets()[0] == 0 => Some("in 0.0.0.0/8 (\"this network\", RFC 1122: never a destination)"),
        IpAddr::V4(a) if a.octets()[0] >= 240 => Some("in 240.0.0.0/4 (reserved, RFC 1112: hosts drop it)"),
        IpAddr::V4(a) if is_link_local(a.into()) => {
            Some("link-local (169.254.0.0/16: reachable on one link only, never through the gateway)")
        }
        IpAddr::V6(a) if is_link_local(a.into()) => {
            Some("link-local (fe80::/10: needs an interface scope, never routed through the gateway)")
        }
        IpAddr::V6(a) if a.segments()[..4] == [0x100, 0, 0, 0] => {
            Some("in 100::/64 (discard-only, RFC 6666; ballast's synthetic outer sources)")
        }
        _ => None,
    };
    match unusable {
        Some(kind) => {
            Err(ConfigError::new(path, format!("'{text}' is {kind}; a {what} needs a routable unicast address")))
        }
        None => Ok(address),
    }
}

fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid one-VIP config with `vip_extra` lines added to the VIP table and `backends`
    /// as its backend array.
    fn one_vip(vip_extra: &str, backends: &str) -> String {
        format!(
            "hash_seed = 7\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n{vip_extra}\nbackends = {backends}\n"
        )
    }

    fn two_backends() -> &'static str {
        r#"[{ address = "10.1.0.1" }, { address = "10.1.0.2" }]"#
    }

    /// Asserts that `text` is refused at `path` with a message containing every one of `needles`.
    fn refused(text: &str, path: &str, needles: &[&str]) -> ConfigError {
        let err = Config::from_toml_str(text).expect_err("config should be refused");
        assert_eq!(err.path, path, "wrong path in {err}");
        for needle in needles {
            assert!(err.message.contains(needle), "message of {err:?} lacks {needle:?}");
        }
        err
    }

    #[test]
    fn example_config_parses() {
        let config = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        assert_eq!(config.hash_seed, 0x5eed);
        assert_eq!(config.vips.len(), 3);
        let web = &config.vips[0];
        assert_eq!(web.address, "192.0.2.10".parse::<IpAddr>().unwrap());
        assert_eq!((web.port, web.protocol, web.table_size), (80, Protocol::Tcp, 65_537));
        let weights: Vec<u32> = web.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 1, 2]);
        assert_eq!(web.backends[2].address, "10.1.0.3".parse::<IpAddr>().unwrap());
        let dns = &config.vips[1];
        assert_eq!((dns.port, dns.protocol, dns.table_size, dns.backends.len()), (53, Protocol::Udp, 1021, 2));
        let https = &config.vips[2];
        assert_eq!(https.address, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!((https.port, https.protocol, https.backends.len()), (443, Protocol::Tcp, 2));
        assert_eq!(https.backends[1].address, "2001:db8:1::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn defaults_weight_one_and_default_table_size() {
        let config = Config::from_toml_str(&one_vip("", two_backends())).unwrap();
        let vip = &config.vips[0];
        assert!(vip.backends.iter().all(|b| b.weight == 1));
        assert_eq!(vip.table_size, maglev::default_table_size(2).unwrap());
        assert_eq!(vip.table_size, 65_537);

        // 656 backends need the next rung of the default ladder.
        let many: Vec<String> =
            (0..656).map(|j| format!("{{ address = \"10.1.{}.{}\" }}", j / 250, j % 250 + 1)).collect();
        let config = Config::from_toml_str(&one_vip("", &format!("[{}]", many.join(", ")))).unwrap();
        assert_eq!(config.vips[0].table_size, 131_071);
    }

    #[test]
    fn explicit_values_are_kept() {
        let text = one_vip(
            "table_size = 1021",
            r#"[{ address = "10.1.0.1", weight = 0 }, { address = "10.1.0.2", weight = 65535 }]"#,
        );
        let vip = &Config::from_toml_str(&text).unwrap().vips[0];
        assert_eq!(vip.table_size, 1021);
        assert_eq!(vip.backends[0].weight, 0);
        assert_eq!(vip.backends[1].weight, 65_535);
    }

    #[test]
    fn port_zero_and_other_ports_of_one_address_coexist() {
        let text = format!(
            "{}[[vip]]\naddress = \"192.0.2.10\"\nport = 0\nprotocol = \"tcp\"\nbackends = {}\n",
            one_vip("", two_backends()),
            two_backends()
        );
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.vips[1].port, 0);
    }

    #[test]
    fn protocol_numbers_and_names() {
        assert_eq!((Protocol::Tcp.number(), Protocol::Tcp.name()), (6, "tcp"));
        assert_eq!((Protocol::Udp.number(), Protocol::Udp.name()), (17, "udp"));
    }

    #[test]
    fn display_prefixes_the_path() {
        let err = ConfigError::new("vip[2].port", "70000 is not a port (0 to 65535)");
        assert_eq!(err.to_string(), "vip[2].port: 70000 is not a port (0 to 65535)");
        assert_eq!(ConfigError::new("", "whole file").to_string(), "whole file");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("ballast-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE_CONFIG).unwrap();
        assert_eq!(Config::load(&good).unwrap(), Config::from_toml_str(EXAMPLE_CONFIG).unwrap());
        let bad = dir.join("lb.toml");
        std::fs::write(&bad, one_vip("", "[]")).unwrap();
        let message = Config::load(&bad).unwrap_err().to_string();
        assert_eq!(message, format!("{}: vip[0].backends: empty; a VIP needs at least one backend", bad.display()));
        let missing = dir.join("missing.toml");
        assert!(format!("{:#}", Config::load(&missing).unwrap_err()).contains("missing.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Unknown keys and TOML errors.

    #[test]
    fn unknown_top_level_key() {
        // First: written after the [[vip]] table it would belong to the VIP.
        let text = format!("hash_sed = 1\n{}", one_vip("", two_backends()));
        let err = refused(&text, "", &["'hash_sed'", "line 1"]);
        assert!(err.to_string().contains("unknown key"), "{err}");
    }

    #[test]
    fn unknown_key_inside_a_vip() {
        let err = refused(&one_vip("tabel_size = 1021", two_backends()), "vip[0]", &["'tabel_size'", "line 6"]);
        assert!(err.message.contains("unknown key") && err.message.contains("table_size"), "{err}");
    }

    #[test]
    fn unknown_key_inside_a_backend() {
        let err = refused(
            &one_vip("", r#"[{ address = "10.1.0.1", wieght = 2 }]"#),
            "vip[0].backends[0]",
            &["'wieght'", "line 7"],
        );
        assert!(err.message.contains("unknown key"));
    }

    /// Wrong types are named by field, in the config's words: no `i64`, `RawBackend`, ...
    #[test]
    fn wrong_types_name_the_field_in_plain_words() {
        let base = one_vip("", two_backends());
        for (from, to, path, message) in [
            ("port = 80", "port = \"80\"", "vip[0].port", "\"80\" is a string; expected an integer"),
            (
                two_backends(),
                "[5]",
                "vip[0].backends[0]",
                "5 is an integer; expected a backend table such as { address = \"10.1.0.1\", weight = 1 }",
            ),
            (two_backends(), "5", "vip[0].backends", "5 is an integer; expected an array of backend tables"),
            (two_backends(), "[{ address = 1 }]", "vip[0].backends[0].address", "1 is an integer; expected a string"),
            (
                two_backends(),
                "[{ address = \"10.1.0.1\", weight = 1.5 }]",
                "vip[0].backends[0].weight",
                "1.5 is a number with a fraction; expected an integer",
            ),
            ("protocol = \"tcp\"", "protocol = true", "vip[0].protocol", "true is a boolean; expected a string"),
            ("port = 80", "port = 80\nhealth = 3", "vip[0].health", "3 is an integer; expected a health table"),
        ] {
            let text = base.replace(from, to);
            let err = Config::from_toml_str(&text).expect_err(to);
            assert_eq!(err.path, path, "{to}: {err}");
            assert!(err.message.starts_with(message), "{to}: {err}");
            assert!(err.message.contains("(line "), "{to}: the position is kept: {err}");
            for internal in ["i64", "f64", "u32", "Raw", "struct", "sequence", "invalid type"] {
                assert!(!err.to_string().contains(internal), "{to}: '{internal}' leaks into: {err}");
            }
        }
        let err = Config::from_toml_str("hash_seed = 1\nvip = 3\n").unwrap_err();
        assert_eq!(err.to_string(), "vip: 3 is an integer; expected [[vip]] tables (line 2, column 7)");
        let err = Config::from_toml_str("hash_seed = 1\n[daemon]\nmin_healthy = \"a\"\n").unwrap_err();
        assert_eq!(err.path, "daemon.min_healthy");
        // The second chance's settings: named, in range, and not part of the generation.
        for (line, path) in [
            ("lineage_depth = 5", "daemon.lineage_depth"),
            ("lineage_depth = -1", "daemon.lineage_depth"),
            ("drain_period_s = 0", "daemon.drain_period_s"),
            ("drain_period_s = \"10m\"", "daemon.drain_period_s"),
        ] {
            let err = Config::from_toml_str(&format!("{EXAMPLE_CONFIG}\n[daemon]\n{line}\n")).unwrap_err();
            assert_eq!(err.path, path, "{line}: {err}");
        }
        let set =
            Config::from_toml_str(&format!("{EXAMPLE_CONFIG}\n[daemon]\nlineage_depth = 0\ndrain_period_s = 30\n"))
                .unwrap();
        assert_eq!((set.daemon.lineage_depth, set.daemon.drain_period_s), (0, 30));
        assert_eq!(set.to_canonical_json(), Config::from_toml_str(EXAMPLE_CONFIG).unwrap().to_canonical_json());
        // Several problems: the first is reported, without a position that may be another's.
        let err = Config::from_toml_str("hash_seed = \"1\"\nvip = 3\n").unwrap_err();
        assert_eq!(err.to_string(), "hash_seed: \"1\" is a string; expected an integer");
        // The canonical JSON of an artifact gets plain words too.
        let err = Config::from_canonical_json(r#"{"hash_seed":"7","vip":[]}"#).unwrap_err();
        assert!(!err.message.contains("i64") && err.message.contains("an integer"), "{err}");
        let err = Config::from_canonical_json(r#"{"hash_seed":7,"vip":[{"backends":[5]}]}"#).unwrap_err();
        assert!(!err.message.contains("RawBackend") && err.message.contains("backend table"), "{err}");
    }

    #[test]
    fn misspelt_vip_table_is_an_unknown_key() {
        let text = one_vip("", two_backends()).replace("[[vip]]", "[[vips]]");
        refused(&text, "", &["vips"]);
    }

    #[test]
    fn toml_syntax_error_keeps_line_and_column() {
        refused("hash_seed = = 3\n", "", &["line 1", "column"]);
    }

    // hash_seed.

    #[test]
    fn missing_hash_seed() {
        let text = one_vip("", two_backends()).replace("hash_seed = 7\n", "");
        refused(&text, "hash_seed", &["missing"]);
    }

    #[test]
    fn hash_seed_out_of_range() {
        refused(&one_vip("", two_backends()).replace("= 7", "= 4294967296"), "hash_seed", &["4294967296", "u32"]);
        refused(&one_vip("", two_backends()).replace("= 7", "= -1"), "hash_seed", &["-1"]);
        let max = Config::from_toml_str(&one_vip("", two_backends()).replace("= 7", "= 0xffffffff")).unwrap();
        assert_eq!(max.hash_seed, u32::MAX);
    }

    #[test]
    fn hash_seed_of_the_wrong_type() {
        let err = refused(&one_vip("", two_backends()).replace("= 7", "= \"7\""), "hash_seed", &["\"7\""]);
        assert_eq!(err.message, "\"7\" is a string; expected an integer (line 1, column 13)");
    }

    #[test]
    fn no_vip() {
        refused("hash_seed = 1\n", "vip", &["[[vip]]"]);
    }

    // Addresses.

    #[test]
    fn vip_address_not_an_ip_address() {
        let text = one_vip("", two_backends()).replace("192.0.2.10", "192.0.2.300");
        refused(&text, "vip[0].address", &["'192.0.2.300'", "is not an IP address"]);
    }

    #[test]
    fn backend_address_not_an_ip_address() {
        let text = one_vip("", r#"[{ address = "10.1.0.1" }, { address = "10.1.0.300" }]"#);
        refused(&text, "vip[0].backends[1].address", &["'10.1.0.300'", "is not an IP address"]);
    }

    #[test]
    fn missing_addresses() {
        let text = one_vip("", two_backends()).replace("address = \"192.0.2.10\"\n", "");
        refused(&text, "vip[0].address", &["missing"]);
        refused(&one_vip("", "[{ weight = 1 }]"), "vip[0].backends[0].address", &["missing"]);
    }

    #[test]
    fn ipv6_backend_of_an_ipv4_vip() {
        let text = format!(
            "{}[[vip]]\naddress = \"192.0.2.11\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{{ address = \"2001:db8::1\" }}]\n",
            one_vip("", two_backends())
        );
        let err = refused(&text, "vip[1].backends[0].address", &["'2001:db8::1'"]);
        assert_eq!(err.to_string(), "vip[1].backends[0].address: '2001:db8::1' is IPv6 but the VIP is IPv4");
    }

    #[test]
    fn ipv4_backend_of_an_ipv6_vip() {
        let text = one_vip("", two_backends()).replace("192.0.2.10", "2001:db8::10");
        let err = refused(&text, "vip[0].backends[0].address", &["'10.1.0.1'"]);
        assert_eq!(err.message, "'10.1.0.1' is IPv4 but the VIP is IPv6");
    }

    #[test]
    fn unusable_vip_addresses() {
        for (address, kind) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:192.0.2.10", "IPv4-mapped"),
        ] {
            let backends = if address.contains(':') { r#"[{ address = "2001:db8:1::1" }]"# } else { two_backends() };
            let text = one_vip("", backends).replace("192.0.2.10", address);
            refused(&text, "vip[0].address", &[&format!("'{address}'"), kind]);
        }
    }

    #[test]
    fn unusable_backend_addresses() {
        for (address, kind) in [
            ("0.0.0.0", "unspecified"),
            ("239.1.1.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.2", "loopback"),
            ("169.254.1.1", "link-local"),
            ("0.1.2.3", "0.0.0.0/8"),
            ("240.0.0.1", "240.0.0.0/4"),
            ("254.255.255.255", "240.0.0.0/4"),
        ] {
            let text = one_vip("", &format!(r#"[{{ address = "10.1.0.1" }}, {{ address = "{address}" }}]"#));
            refused(&text, "vip[0].backends[1].address", &[&format!("'{address}'"), kind]);
        }
    }

    #[test]
    fn link_local_and_reserved_ipv6_addresses() {
        for (address, kind) in [("fe80::1", "link-local"), ("febf::1", "link-local"), ("100::1", "100::/64")] {
            let text = one_vip("", &format!(r#"[{{ address = "2001:db8:1::1" }}, {{ address = "{address}" }}]"#))
                .replace("192.0.2.10", "2001:db8::10");
            refused(&text, "vip[0].backends[1].address", &[&format!("'{address}'"), kind]);
            let text = one_vip("", r#"[{ address = "2001:db8:1::1" }]"#).replace("192.0.2.10", address);
            refused(&text, "vip[0].address", &[&format!("'{address}'"), kind]);
        }
        let text = one_vip("", r#"[{ address = "169.254.0.9" }]"#).replace("192.0.2.10", "169.254.0.10");
        refused(&text, "vip[0].address", &["link-local"]);
    }

    /// Addresses next to the refused ones, and the documented ranges tests and labs use, stay
    /// usable: 198.18.0.0/15 (benchmarking, RFC 2544), 192.0.2.0/24 and 2001:db8::/32
    /// (documentation), fec0::/10 (not link-local), 101::/64.
    #[test]
    fn neighbours_of_refused_ranges_are_accepted() {
        for backend in ["198.18.0.1", "198.19.255.254", "1.0.0.1", "239.255.255.255", "169.253.0.1", "169.255.0.1"] {
            let text = one_vip("", &format!(r#"[{{ address = "{backend}" }}]"#));
            let accepted = Config::from_toml_str(&text);
            assert_eq!(accepted.is_ok(), backend != "239.255.255.255", "{backend}: {accepted:?}");
        }
        for backend in ["fec0::1", "101::1", "100:0:0:1::1", "2001:db8:1::1"] {
            let text = one_vip("", &format!(r#"[{{ address = "{backend}" }}]"#)).replace("192.0.2.10", "2001:db8::10");
            assert!(Config::from_toml_str(&text).is_ok(), "{backend}");
        }
    }

    #[test]
    fn a_backend_at_a_vip_address_is_refused() {
        // Same VIP.
        let text = one_vip("", r#"[{ address = "10.1.0.1" }, { address = "192.0.2.10" }]"#);
        let err = refused(&text, "vip[0].backends[1].address", &["'192.0.2.10'", "vip[0]"]);
        assert!(err.message.contains("not one of its VIPs"), "{err}");
        // Another VIP's address (another port): still the load balancer itself.
        let text = format!(
            "{}[[vip]]\naddress = \"192.0.2.11\"\nport = 53\nprotocol = \"udp\"\nbackends = [{{ address = \"192.0.2.10\" }}]\n",
            one_vip("", two_backends())
        );
        refused(&text, "vip[1].backends[0].address", &["'192.0.2.10'", "vip[0]"]);
        // IPv6, written another way.
        let text = one_vip("", r#"[{ address = "2001:DB8::0:10" }]"#).replace("192.0.2.10", "2001:db8::10");
        refused(&text, "vip[0].backends[0].address", &["vip[0]"]);
    }

    #[test]
    fn load_refuses_what_is_not_a_regular_config_file() {
        let dir = std::env::temp_dir().join(format!("ballast-config-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // An artifact handed where a config goes (`ballast run --config gen.bal`).
        let artifact = dir.join("gen.bal");
        let mut bytes = crate::generation::artifact::MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xfe]);
        std::fs::write(&artifact, &bytes).unwrap();
        let err = Config::load(&artifact).unwrap_err();
        assert!(matches!(err.root(), crate::Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("generation artifact") && err.to_string().contains("gen.bal"), "{err}");
        // Not text.
        let binary = dir.join("binary.toml");
        std::fs::write(&binary, [0xffu8, 0xfe, 0]).unwrap();
        assert!(Config::load(&binary).unwrap_err().to_string().contains("not UTF-8"));
        // Too large: refused from its size, without reading it.
        let large = dir.join("large.toml");
        let file = std::fs::File::create(&large).unwrap();
        file.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let err = Config::load(&large).unwrap_err().to_string();
        assert!(err.contains("larger than 16 MiB") && err.contains("large.toml"), "{err}");
        // Devices and directories.
        for path in [Path::new("/dev/zero"), dir.as_path()] {
            let err = Config::load(path).unwrap_err().to_string();
            assert!(err.contains("not a regular file") && err.contains(&path.display().to_string()), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Port and protocol.

    #[test]
    fn port_out_of_range() {
        refused(&one_vip("", two_backends()).replace("port = 80", "port = 70000"), "vip[0].port", &["70000"]);
        refused(&one_vip("", two_backends()).replace("port = 80", "port = -1"), "vip[0].port", &["-1"]);
        refused(&one_vip("", two_backends()).replace("port = 80\n", ""), "vip[0].port", &["missing"]);
    }

    #[test]
    fn protocol_other_than_tcp_or_udp() {
        let text = one_vip("", two_backends()).replace("\"tcp\"", "\"sctp\"");
        let err = refused(&text, "vip[0].protocol", &["'sctp'"]);
        assert_eq!(err.to_string(), "vip[0].protocol: 'sctp' is not tcp or udp");
        refused(&one_vip("", two_backends()).replace("\"tcp\"", "\"TCP\""), "vip[0].protocol", &["'TCP'"]);
        refused(&one_vip("", two_backends()).replace("protocol = \"tcp\"\n", ""), "vip[0].protocol", &["missing"]);
    }

    // Duplicates.

    #[test]
    fn duplicate_vip_names_the_first() {
        let vip = |port: u16, protocol: &str| {
            format!("[[vip]]\naddress = \"192.0.2.10\"\nport = {port}\nprotocol = \"{protocol}\"\nbackends = [{{ address = \"10.1.0.1\" }}]\n")
        };
        let text = format!("hash_seed = 1\n{}{}{}{}", vip(80, "tcp"), vip(80, "udp"), vip(81, "tcp"), vip(80, "udp"));
        let err = refused(&text, "vip[3]", &["vip[1]"]);
        assert_eq!(err.to_string(), "vip[3]: duplicates vip[1] (192.0.2.10:80/udp)");
    }

    #[test]
    fn duplicate_ipv6_vip_in_another_spelling() {
        let vip = |address: &str| {
            format!("[[vip]]\naddress = \"{address}\"\nport = 443\nprotocol = \"tcp\"\nbackends = [{{ address = \"2001:db8:1::1\" }}]\n")
        };
        let text = format!("hash_seed = 1\n{}{}", vip("2001:db8::10"), vip("2001:0DB8:0:0::0010"));
        let err = refused(&text, "vip[1]", &["vip[0]"]);
        assert_eq!(err.message, "duplicates vip[0] ([2001:db8::10]:443/tcp)");
    }

    #[test]
    fn duplicate_backend_address() {
        let text = one_vip(
            "",
            r#"[{ address = "10.1.0.1" }, { address = "10.1.0.2" }, { address = "10.1.0.1", weight = 3 }]"#,
        );
        refused(&text, "vip[0].backends[2].address", &["'10.1.0.1'", "backends[0]"]);
    }

    #[test]
    fn same_backend_in_two_vips_is_fine() {
        let text = format!(
            "{}[[vip]]\naddress = \"192.0.2.10\"\nport = 81\nprotocol = \"tcp\"\nbackends = {}\n",
            one_vip("", two_backends()),
            two_backends()
        );
        assert_eq!(Config::from_toml_str(&text).unwrap().vips.len(), 2);
    }

    // Backends and weights.

    #[test]
    fn empty_backend_set() {
        refused(&one_vip("", "[]"), "vip[0].backends", &["empty"]);
        let text = one_vip("", two_backends()).replace(&format!("backends = {}\n", two_backends()), "");
        refused(&text, "vip[0].backends", &["missing"]);
    }

    #[test]
    fn every_weight_zero() {
        let text = one_vip("", r#"[{ address = "10.1.0.1", weight = 0 }, { address = "10.1.0.2", weight = 0 }]"#);
        let err = refused(&text, "vip[0].backends", &[]);
        assert_eq!(err.to_string(), "vip[0].backends: every weight is 0; at least one backend needs a positive weight");
    }

    #[test]
    fn weight_out_of_range() {
        let text = one_vip("", r#"[{ address = "10.1.0.1" }, { address = "10.1.0.2", weight = 65536 }]"#);
        refused(&text, "vip[0].backends[1].weight", &["65536", "65535"]);
        let text = one_vip("", r#"[{ address = "10.1.0.1", weight = -2 }]"#);
        refused(&text, "vip[0].backends[0].weight", &["-2"]);
    }

    // Table size.

    #[test]
    fn table_size_not_prime() {
        refused(&one_vip("table_size = 65536", two_backends()), "vip[0].table_size", &["65536", "not prime"]);
    }

    #[test]
    fn table_size_below_the_minimum() {
        // 199 is prime but two backends need 200 entries.
        refused(&one_vip("table_size = 199", two_backends()), "vip[0].table_size", &["199", "200"]);
        refused(&one_vip("table_size = 0", two_backends()), "vip[0].table_size", &["0 is below 200"]);
        refused(&one_vip("table_size = -5", two_backends()), "vip[0].table_size", &["-5"]);
        // 211 is the smallest prime allowed for two backends.
        assert_eq!(
            Config::from_toml_str(&one_vip("table_size = 211", two_backends())).unwrap().vips[0].table_size,
            211
        );
    }

    #[test]
    fn table_size_above_the_generation_limit() {
        // 67108879 is the first prime above MAX_TABLE_ENTRIES.
        assert!(maglev::is_prime(67_108_879));
        let err = refused(&one_vip("table_size = 67108879", two_backends()), "vip[0].table_size", &["67108879"]);
        assert!(err.message.contains(&MAX_TABLE_ENTRIES.to_string()));
        refused(&one_vip("table_size = 9999999999", two_backends()), "vip[0].table_size", &["9999999999"]);
    }

    #[test]
    fn no_default_table_size() {
        // Past the default ladder (83886 backends) and under MAX_BACKENDS cannot both hold in one
        // config, so exercise the helper directly.
        let err = table_size("vip[0].table_size", None, 100_000).unwrap_err();
        assert_eq!(err.path, "vip[0].table_size");
        assert!(err.message.contains("100000 backends") && err.message.contains("set table_size"), "{err}");
        assert!(err.message.contains("10000000"), "{err}");
    }

    // Generation limits.

    /// A config of `count` one-backend VIPs on distinct ports, each with `table_size`.
    fn many_vips(count: usize, table_size: u32) -> String {
        let mut text = String::from("hash_seed = 1\n");
        for i in 0..count {
            text.push_str(&format!(
                "[[vip]]\naddress = \"192.0.2.10\"\nport = {}\nprotocol = \"tcp\"\ntable_size = {table_size}\nbackends = [{{ address = \"10.1.0.1\" }}]\n",
                i + 1
            ));
        }
        text
    }

    #[test]
    fn too_many_vips() {
        assert_eq!(Config::from_toml_str(&many_vips(MAX_VIPS as usize, 101)).unwrap().vips.len(), MAX_VIPS as usize);
        let err = refused(&many_vips(MAX_VIPS as usize + 1, 101), "", &["4097", "4096", "MAX_VIPS"]);
        assert!(err.message.starts_with("4097 VIPs"), "{err}");
    }

    #[test]
    fn too_many_backends() {
        // Two VIPs of 8193 backends each: 16386 in all.
        let backends: Vec<String> =
            (0..8193).map(|j| format!("{{ address = \"10.1.{}.{}\" }}", j / 250, j % 250 + 1)).collect();
        let backends = format!("[{}]", backends.join(", "));
        let text = format!(
            "{}[[vip]]\naddress = \"192.0.2.10\"\nport = 81\nprotocol = \"tcp\"\nbackends = {backends}\n",
            one_vip("", &backends)
        );
        refused(&text, "", &["16386", "16384", "MAX_BACKENDS"]);
    }

    #[test]
    fn too_many_table_entries() {
        // 7 x 8388617 = 58720319 fits in MAX_TABLE_ENTRIES; 8 x 8388617 = 67108936 does not.
        assert_eq!(Config::from_toml_str(&many_vips(7, 8_388_617)).unwrap().vips.len(), 7);
        refused(&many_vips(8, 8_388_617), "", &["67108936", "67108864", "MAX_TABLE_ENTRIES"]);
        // With default sizes, 1024 VIPs are already too many.
        refused(&many_vips(1024, 65_537), "", &["67109888", "MAX_TABLE_ENTRIES"]);
    }

    // Canonical JSON.

    #[test]
    fn canonical_json_is_order_independent() {
        let a = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        let mut b = a.clone();
        b.vips.reverse();
        for vip in &mut b.vips {
            vip.backends.reverse();
        }
        assert_ne!(a, b);
        assert_eq!(a.to_canonical_json(), b.to_canonical_json());

        // The same from text: VIPs and backends written in another order, defaults spelt out.
        let reordered = r#"
            hash_seed = 24301
            [[vip]]
            address = "2001:db8::10"
            port = 443
            protocol = "tcp"
            table_size = 65537
            backends = [{ address = "2001:db8:1::2", weight = 1 }, { address = "2001:db8:1::1" }]
            [[vip]]
            address = "192.0.2.10"
            port = 53
            protocol = "udp"
            table_size = 1021
            backends = [{ address = "10.2.0.2" }, { address = "10.2.0.1" }]
            [[vip]]
            address = "192.0.2.10"
            port = 80
            protocol = "tcp"
            backends = [{ address = "10.1.0.3", weight = 2 }, { address = "10.1.0.2" }, { address = "10.1.0.1" }]
        "#;
        assert_eq!(Config::from_toml_str(reordered).unwrap().to_canonical_json(), a.to_canonical_json());
    }

    #[test]
    fn canonical_json_changes_with_any_field() {
        let a = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        let canonical = a.to_canonical_json();
        let mut b = a.clone();
        b.vips[0].backends[2].weight = 3;
        assert_ne!(b.to_canonical_json(), canonical);
        let mut c = a.clone();
        c.hash_seed += 1;
        assert_ne!(c.to_canonical_json(), canonical);
        let mut d = a.clone();
        d.vips[1].table_size = 1031;
        assert_ne!(d.to_canonical_json(), canonical);
    }

    #[test]
    fn canonical_json_reads_back() {
        let config = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        let again = Config::from_canonical_json(&config.to_canonical_json()).unwrap();
        assert_eq!(again.to_canonical_json(), config.to_canonical_json());
        let err = Config::from_canonical_json(r#"{"hash_seed":7,"vip":[{"address":"1.2.3.999"}]}"#).unwrap_err();
        assert_eq!(err.path, "vip[0].address");
    }

    #[test]
    fn canonical_json_form() {
        let config =
            Config::from_toml_str(&one_vip("", r#"[{ address = "10.1.0.2", weight = 3 }, { address = "10.1.0.1" }]"#))
                .unwrap();
        assert_eq!(
            config.to_canonical_json(),
            r#"{"hash_seed":7,"vip":[{"address":"192.0.2.10","backends":[{"address":"10.1.0.1","weight":1},{"address":"10.1.0.2","weight":3}],"port":80,"protocol":"tcp","table_size":65537}]}"#
        );
        // IPv4 VIPs sort before IPv6 ones, then by address, port and protocol.
        let order: Vec<(String, u64, String)> = {
            let json: serde_json::Value =
                serde_json::from_str(&Config::from_toml_str(EXAMPLE_CONFIG).unwrap().to_canonical_json()).unwrap();
            json["vip"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    (
                        v["address"].as_str().unwrap().to_owned(),
                        v["port"].as_u64().unwrap(),
                        v["protocol"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        assert_eq!(
            order,
            [
                ("192.0.2.10".to_owned(), 53, "udp".to_owned()),
                ("192.0.2.10".to_owned(), 80, "tcp".to_owned()),
                ("2001:db8::10".to_owned(), 443, "tcp".to_owned()),
            ]
        );
    }

    /// `health.via`: absent means "the daemon decides" (None), "tunnel" and "direct" are
    /// kept; anything else is refused naming the field.
    #[test]
    fn health_via_parses_and_bad_values_are_refused_by_name() {
        let via_of = |via: &str| {
            let text = one_vip(&format!("health = {{ kind = \"tcp\"{via} }}"), two_backends());
            Config::from_toml_str(&text).map(|c| c.vips[0].health.clone().unwrap().via)
        };
        assert_eq!(via_of(""), Ok(None));
        assert_eq!(via_of(", via = \"tunnel\""), Ok(Some(HealthVia::Tunnel)));
        assert_eq!(via_of(", via = \"direct\""), Ok(Some(HealthVia::Direct)));
        for (bad, message) in [
            ("\"Tunnel\"", "'Tunnel' is not tunnel or direct"),
            ("\"ipip\"", "'ipip' is not tunnel or direct"),
            ("\"\"", "'' is not tunnel or direct"),
            ("true", "true is a boolean; expected a string"),
            ("1", "1 is an integer; expected a string"),
        ] {
            refused(
                &one_vip(&format!("health = {{ kind = \"http\", via = {bad} }}"), two_backends()),
                "vip[0].health.via",
                &[message],
            );
        }
    }

    /// How health checks run is a daemon setting: it changes no forwarding, so neither the
    /// canonical config (what the digest covers) nor the generation sees it.
    #[test]
    fn health_via_is_not_part_of_the_generation() {
        let canonical = |via: &str| {
            let text = one_vip(&format!("health = {{ kind = \"tcp\"{via} }}"), two_backends());
            Config::from_toml_str(&text).unwrap().to_canonical_json()
        };
        let without = Config::from_toml_str(&one_vip("", two_backends())).unwrap().to_canonical_json();
        for via in ["", ", via = \"tunnel\"", ", via = \"direct\""] {
            assert_eq!(canonical(via), without, "{via}");
        }
    }
}
