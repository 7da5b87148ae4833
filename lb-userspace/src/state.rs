//! The state directory (default /var/lib/ballast): what runs where, what ran before, and the
//! audit trail. The kernel stays the authority on what runs (the digest in the running
//! program's .rodata); these records add what the kernel cannot hold: the artifacts for
//! rollback and verify, the host parameters, the history.
//!
//! Layout: `generations/<hex>.bal` (content-addressed artifacts), `ifaces/<key>/record.json`
//! and `ifaces/<key>/lock` per interface (key = the pin key: `IF` or `netns-COOKIE/IF`),
//! `audit.jsonl` (append-only, one JSON object a line). Retention: each interface keeps its
//! current generation and the [`ROLLBACK_DEPTH`] before it; artifacts no interface keeps are
//! deleted.
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::{
    artifact::{hex, write_atomically, Artifact},
    counter_slots::CounterSlots,
    kernel,
    loader::HostParams,
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/ballast";
/// Generations kept per interface for rollback, besides the current one.
pub const ROLLBACK_DEPTH: usize = 9;

pub struct StateDir {
    root: PathBuf,
}

/// Host parameters as recorded at attach time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub gateway_mac: String,
    pub iface_mac: String,
    pub source_v4: Option<std::net::Ipv4Addr>,
    pub source_v6: Option<std::net::Ipv6Addr>,
    pub mtu: u32,
}

impl HostRecord {
    pub fn of(host: &HostParams) -> HostRecord {
        HostRecord {
            gateway_mac: kernel::format_mac(&host.gateway_mac),
            iface_mac: kernel::format_mac(&host.iface_mac),
            source_v4: host.source_v4,
            source_v6: host.source_v6,
            mtu: host.mtu,
        }
    }

    pub fn params(&self) -> anyhow::Result<HostParams> {
        Ok(HostParams {
            gateway_mac: kernel::parse_mac(&self.gateway_mac)?,
            iface_mac: kernel::parse_mac(&self.iface_mac)?,
            source_v4: self.source_v4,
            source_v6: self.source_v6,
            mtu: self.mtu,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceRecord {
    /// Digest (sha256:...) of the generation attached; None until a first attach completes.
    pub current: Option<String>,
    /// Earlier generations, most recent first: the rollback targets.
    pub previous: Vec<String>,
    pub host: HostRecord,
    /// Set while a swap is under way: the generation it installs. A command that finds it
    /// set after a crash asks the kernel which generation runs and settles the record.
    pub pending: Option<String>,
    /// Where the current generation's VIPs and backends count (host state, see counter_slots).
    #[serde(default)]
    pub counter_slots: CounterSlots,
    /// The pending generation's slots, settled with `pending`.
    #[serde(default)]
    pub pending_counter_slots: Option<CounterSlots>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub action: String,
    pub iface: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub host: Option<HostRecord>,
    /// Why, when the change had a cause beyond an operator's command (health, reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub result: String,
}

/// Holds the interface's lock until dropped (or the process dies: flock is released then).
pub struct IfaceLock {
    _file: File,
}

impl StateDir {
    /// `--state-dir`, else $BALLAST_STATE_DIR, else /var/lib/ballast.
    pub fn open(explicit: Option<&Path>) -> anyhow::Result<StateDir> {
        let root = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("BALLAST_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        for dir in [root.join("generations"), root.join("ifaces")] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn artifact_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        let hex_digest = digest.strip_prefix("sha256:").unwrap_or(digest);
        if hex_digest.len() != 64 || !hex_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{digest}' is not a generation digest (sha256: and 64 hex digits)");
        }
        Ok(self.root.join("generations").join(format!("{hex_digest}.bal")))
    }

    pub fn store(&self, artifact: &Artifact) -> anyhow::Result<()> {
        let path = self.artifact_path(&hex(&artifact.digest))?;
        if !path.exists() {
            artifact.write(&path)?;
        }
        Ok(())
    }

    pub fn artifact(&self, digest: &str) -> anyhow::Result<Artifact> {
        Artifact::read(&self.artifact_path(digest)?).with_context(|| format!("stored generation {digest}"))
    }

    fn iface_dir(&self, key: &str) -> PathBuf {
        self.root.join("ifaces").join(key)
    }

    /// Takes the interface's lock, or fails at once if another command holds it.
    pub fn lock(&self, key: &str) -> anyhow::Result<IfaceLock> {
        let dir = self.iface_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another ballast command is changing {key} right now (lock {} held); try again when it is done",
                    path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        Ok(IfaceLock { _file: file })
    }

    pub fn record(&self, key: &str) -> anyhow::Result<Option<IfaceRecord>> {
        let path = self.iface_dir(key).join("record.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write_record(&self, key: &str, record: &IfaceRecord) -> anyhow::Result<()> {
        let dir = self.iface_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(record).context("rendering the record")?;
        write_atomically(&dir.join("record.json"), &json)
    }

    pub fn remove_record(&self, key: &str) -> anyhow::Result<()> {
        let path = self.iface_dir(key).join("record.json");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    pub fn audit(&self, entry: &AuditEntry) -> anyhow::Result<()> {
        let path = self.root.join("audit.jsonl");
        let mut line = serde_json::to_string(entry).context("rendering the audit entry")?;
        line.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // One write of one line to an O_APPEND file: entries never interleave.
        file.write_all(line.as_bytes()).with_context(|| format!("appending to {}", path.display()))
    }

    pub fn history(&self, key: &str) -> anyhow::Result<Vec<AuditEntry>> {
        let path = self.root.join("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let entry: AuditEntry =
                serde_json::from_str(line).with_context(|| format!("{}: line {}", path.display(), n + 1))?;
            if entry.iface == key {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Deletes stored artifacts that no interface record refers to.
    pub fn collect_garbage(&self) -> anyhow::Result<usize> {
        let mut kept = std::collections::BTreeSet::new();
        for record in self.all_records()? {
            kept.extend(record.pending.iter().chain(&record.current).chain(&record.previous).cloned());
        }
        let mut removed = 0;
        let dir = self.root.join("generations");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            if path.extension().is_some_and(|e| e == "bal") && !kept.contains(&format!("sha256:{stem}")) {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn all_records(&self) -> anyhow::Result<Vec<IfaceRecord>> {
        let mut records = Vec::new();
        let mut stack = vec![self.root.join("ifaces")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n == "record.json") {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    records.push(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?);
                }
            }
        }
        Ok(records)
    }
}

pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Test hook for crash-safety tests: with BALLAST_TEST_PAUSE_AT=<step>, the command stops at
/// that step (printing "paused at <step>") until it is killed.
pub fn checkpoint(step: &str) {
    if std::env::var("BALLAST_TEST_PAUSE_AT").is_ok_and(|s| s == step) {
        eprintln!("ballast: paused at {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
