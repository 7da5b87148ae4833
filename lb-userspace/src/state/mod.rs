//! The state directory (default /var/lib/ballast): what runs where, what ran before, and the
//! audit trail. The kernel stays the authority on what runs (the digest in the running
//! program's .rodata); these records add what the kernel cannot hold: the artifacts for
//! rollback and verify, the host parameters, the history.
//!
//! Layout: `generations/<hex>.bal` (content-addressed artifacts), `ifaces/<key>/record.json`
//! and `ifaces/<key>/lock` per interface (key = the pin key: `IF` or `netns-COOKIE/IF`),
//! `audit.jsonl` (append-only, one JSON object a line, hash-chained: [`chain`]). Retention:
//! each interface keeps its current generation and the [`ROLLBACK_DEPTH`] before it; artifacts
//! no interface keeps are deleted.
pub mod chain;

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::{bail, error::Context as _};
use serde::{Deserialize, Serialize};

use crate::{
    files::{self, write_atomically},
    generation::{
        address::{format_mac, parse_mac},
        artifact::Artifact,
        counter_slots::{CounterDiscount, CounterSlots},
        digest::hex,
        lineage::LineageSummary,
        signature::Signed,
    },
    kernel::loader::HostParams,
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/ballast";
/// Generations kept per interface for rollback, besides the current one.
pub const ROLLBACK_DEPTH: usize = 9;

#[derive(Clone, Debug)]
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
            gateway_mac: format_mac(&host.gateway_mac),
            iface_mac: format_mac(&host.iface_mac),
            source_v4: host.source_v4,
            source_v6: host.source_v6,
            mtu: host.mtu,
        }
    }

    pub fn params(&self) -> crate::Result<HostParams> {
        Ok(HostParams {
            gateway_mac: parse_mac(&self.gateway_mac)?,
            iface_mac: parse_mac(&self.iface_mac)?,
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
    /// What pre-flight probes counted into the pinned counters, subtracted by their readers.
    #[serde(default)]
    pub counter_discount: CounterDiscount,
    /// The pending generation's host parameters (a swap re-reads or changes them), settled
    /// with `pending`.
    #[serde(default)]
    pub pending_host: Option<HostRecord>,
    /// The lineage of the generation `digest` as it was swapped in, so that `status` need not
    /// rebuild the artifact to show it (`verify` checks the kernel's tables in full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<RecordedLineage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedLineage {
    pub digest: String,
    pub summary: LineageSummary,
}

impl RecordedLineage {
    pub fn of(artifact: &Artifact) -> Option<RecordedLineage> {
        let summary = LineageSummary::of(artifact, artifact.generation.lineage.len())?;
        Some(RecordedLineage { digest: artifact.digest_string(), summary })
    }
}

impl IfaceRecord {
    /// `digest` is what runs now; what ran before it becomes the first rollback target.
    pub(crate) fn make_current(&mut self, digest: String) {
        if let Some(old) = self.current.replace(digest.clone()) {
            if old != digest {
                self.previous.retain(|d| *d != digest);
                self.previous.insert(0, old);
                self.previous.truncate(ROLLBACK_DEPTH);
            }
        }
    }
}

/// A signature kept beside a generation, and the bytes it signs when those are not the
/// artifact ([`StateDir::store_signature`]).
pub type KeptSignature = (Vec<u8>, Option<Vec<u8>>);

/// One line of `audit.jsonl`. Fields are added as `Option` with `#[serde(default)]`, so that
/// older entries still parse; build entries with `..Default::default()`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
    /// Who signed what went live, when a trust policy requires signatures (see
    /// `generation::signature`): the key's fingerprint and what the signature covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
    pub result: String,
}

/// An entry as `audit.jsonl` holds it: its fields, then the hash chain's link `prev`
/// (`sha256:<hex>` of the previous entry's line, or [`chain::GENESIS`]), which
/// [`StateDir::audit`] adds. None in entries written before chaining began.
#[derive(Serialize, Deserialize)]
struct ChainedEntry<E> {
    #[serde(flatten)]
    entry: E,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev: Option<String>,
}

/// What [`StateDir::audit_log`] read: the entries of one interface, and the lines of the
/// whole log that are not entries.
#[derive(Clone, Debug, Default)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    pub bad_lines: Vec<BadLine>,
}

/// A line of `audit.jsonl` that is not a whole entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadLine {
    /// 1-based.
    pub line: usize,
    /// It is the log's last line: what a crash in the middle of an append leaves.
    pub last: bool,
    pub why: String,
}

/// The largest record read (records hold the counter slots of at most MAX_VIPS VIPs and
/// MAX_BACKENDS backends: about 2 MiB).
pub const MAX_RECORD_BYTES: u64 = 64 << 20;
/// Audit lines longer than this are skipped (an entry takes a few hundred bytes).
const MAX_AUDIT_LINE_BYTES: u64 = 1 << 20;

/// One line of `audit.jsonl` as [`StateDir::scan_audit_log`] reads it.
pub(crate) enum LogLine<'a> {
    /// An entry: its 1-based line number, its bytes as written (without the newline), its link.
    Entry { line: usize, raw: &'a [u8], entry: Box<AuditEntry>, prev: Option<String> },
    /// Not an entry (`last` is left false: the scan's caller knows the last line's number).
    Bad(BadLine),
}

/// An audit line (without its newline) as an entry and its link.
fn parse_entry(raw: &[u8]) -> serde_json::Result<(AuditEntry, Option<String>)> {
    let chained = serde_json::from_str::<ChainedEntry<AuditEntry>>(String::from_utf8_lossy(raw).trim_end())?;
    Ok((chained.entry, chained.prev))
}

/// Opens (creating, 0600, in a private directory) and locks `path` without waiting: None when
/// another process holds it.
fn try_flock(path: &Path) -> crate::Result<Option<File>> {
    if let Some(dir) = path.parent() {
        files::private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(files::PRIVATE_FILE_MODE)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    Ok(Some(file))
}

/// Holds the interface's lock until dropped (or the process dies: flock is released then).
pub struct IfaceLock {
    _file: File,
}

impl StateDir {
    /// `--state-dir`, else $BALLAST_STATE_DIR, else /var/lib/ballast.
    pub fn open(explicit: Option<&Path>) -> crate::Result<StateDir> {
        let root = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("BALLAST_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        // A new state directory is made 0700; an existing one is left as it is (it may be
        // shared, e.g. `--state-dir /tmp/x`), but everything ballast makes in it is private:
        // its directories 0700, its files 0600 (artifacts and records carry hash_seed).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(files::PRIVATE_DIR_MODE)
            .create(&root)
            .with_context(|| format!("creating {}", root.display()))?;
        for dir in [root.join("generations"), root.join("ifaces")] {
            files::private_dir(&dir)?;
        }
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn artifact_path(&self, digest: &str) -> crate::Result<PathBuf> {
        let hex_digest = digest.strip_prefix("sha256:").unwrap_or(digest);
        if hex_digest.len() != 64 || !hex_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{digest}' is not a generation digest (sha256: and 64 hex digits)");
        }
        Ok(self.root.join("generations").join(format!("{hex_digest}.bal")))
    }

    pub fn store(&self, artifact: &Artifact) -> crate::Result<()> {
        let path = self.artifact_path(&hex(&artifact.digest))?;
        if !path.exists() {
            artifact.write(&path)?;
        } else if path.is_file() {
            // Kept by an older ballast, perhaps world-readable: it holds hash_seed.
            files::tighten(&path, files::PRIVATE_FILE_MODE)?;
        }
        Ok(())
    }

    /// Keeps the signature of generation `digest` beside it (`<hex>.sig`), and the file it
    /// signs when that is not the artifact itself (`<hex>.signed`: the config it was built
    /// from), so that a rollback can check it again. Removed with the artifact.
    pub fn store_signature(&self, digest: &str, signature: &[u8], signed_file: Option<&[u8]>) -> crate::Result<()> {
        let path = self.artifact_path(digest)?;
        write_atomically(&path.with_extension("sig"), signature)?;
        let source = path.with_extension("signed");
        match signed_file {
            Some(bytes) => write_atomically(&source, bytes),
            None => match std::fs::remove_file(&source) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", source.display()))
                }
                _ => Ok(()),
            },
        }
    }

    /// The signature kept for generation `digest` and the file it signs when that is not the
    /// artifact ([`StateDir::store_signature`]); None: none kept.
    pub fn signature(&self, digest: &str) -> crate::Result<Option<KeptSignature>> {
        let path = self.artifact_path(digest)?;
        let Some(signature) = files::read_regular_if_exists(&path.with_extension("sig"), 1 << 20, "signature")? else {
            return Ok(None);
        };
        let source = files::read_regular_if_exists(
            &path.with_extension("signed"),
            crate::generation::artifact::MAX_ARTIFACT_BYTES,
            "signed file",
        )?;
        Ok(Some((signature, source)))
    }

    /// The digests (sha256:...) of the artifacts kept in `generations/`.
    pub fn stored_digests(&self) -> crate::Result<Vec<String>> {
        let dir = self.root.join("generations");
        let mut digests = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "bal") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    digests.push(format!("sha256:{stem}"));
                }
            }
        }
        digests.sort();
        Ok(digests)
    }

    pub fn artifact(&self, digest: &str) -> crate::Result<Artifact> {
        Artifact::read(&self.artifact_path(digest)?).with_context(|| format!("stored generation {digest}"))
    }

    fn iface_dir(&self, key: &str) -> PathBuf {
        self.root.join("ifaces").join(key)
    }

    /// Takes the interface's lock, or fails at once if another command holds it.
    pub fn lock(&self, key: &str) -> crate::Result<IfaceLock> {
        let path = self.iface_dir(key).join("lock");
        try_flock(&path)?.map(|file| IfaceLock { _file: file }).ok_or_else(|| {
            crate::Error::LockHeld(format!(
                "another ballast command is changing {key} right now (lock {} held); try again when it is done",
                path.display()
            ))
        })
    }

    /// The lock `ballast run` holds for its whole life (`ifaces/<key>/daemon`): one daemon per
    /// interface. Not [`StateDir::lock`], which every command (the daemon too, for each change)
    /// takes only while it changes the interface. Fails at once, naming the holder's pid.
    pub fn daemon_lock(&self, key: &str) -> crate::Result<IfaceLock> {
        let path = self.iface_dir(key).join("daemon");
        let Some(mut file) = try_flock(&path)? else {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let pid = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            return Err(crate::Error::LockHeld(format!(
                "another `ballast run`{pid} already serves {key} (lock {} held): one daemon per interface; \
                 stop that one first",
                path.display()
            )));
        };
        // Ours now: say who holds it, for the next one's message.
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| std::io::Seek::rewind(&mut file))
            .and_then(|()| file.write_all(pid.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(IfaceLock { _file: file })
    }

    pub fn record(&self, key: &str) -> crate::Result<Option<IfaceRecord>> {
        let path = self.iface_dir(key).join("record.json");
        match files::read_regular_if_exists(&path, MAX_RECORD_BYTES, "record")? {
            Some(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn write_record(&self, key: &str, record: &IfaceRecord) -> crate::Result<()> {
        let dir = self.iface_dir(key);
        files::private_dir(&dir)?;
        let json = serde_json::to_vec_pretty(record).context("rendering the record")?;
        write_atomically(&dir.join("record.json"), &json)
    }

    pub(crate) fn remove_record(&self, key: &str) -> crate::Result<()> {
        let path = self.iface_dir(key).join("record.json");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Appends `entry` with its link to the log's last entry ([`chain`]). Every audit entry
    /// is written through here.
    pub fn audit(&self, entry: &AuditEntry) -> crate::Result<()> {
        let path = self.root.join("audit.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(files::PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let meta = file.metadata().with_context(|| format!("examining {}", path.display()))?;
        if !meta.file_type().is_file() {
            bail!("{} is not a regular file; the audit entry was not written", path.display());
        }
        files::tighten(&path, files::PRIVATE_FILE_MODE)?;
        // One append at a time, from reading the last entry to writing this one: two appenders
        // linking to the same entry would fork the chain. Released when `file` is closed.
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
        let meta = file.metadata().with_context(|| format!("examining {}", path.display()))?;
        let last = chain::last_entry_line(&file, meta.len()).with_context(|| format!("reading {}", path.display()))?;
        let prev = Some(last.as_deref().map_or_else(|| chain::GENESIS.to_owned(), chain::link));
        let mut line = serde_json::to_string(&ChainedEntry { entry, prev }).context("rendering the audit entry")?;
        line.push('\n');
        // A crash mid-append leaves a line without its newline: start on a line of our own.
        if meta.len() > 0 {
            let mut last = [0u8; 1];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, meta.len() - 1)
                .with_context(|| format!("reading {}", path.display()))?;
            if last[0] != b'\n' {
                line.insert(0, '\n');
            }
        }
        // One write of one line to an O_APPEND file: entries never interleave.
        file.write_all(line.as_bytes()).with_context(|| format!("appending to {}", path.display()))
    }

    /// The audit entries of interface `key`, in order.
    pub fn history(&self, key: &str) -> crate::Result<Vec<AuditEntry>> {
        Ok(self.audit_log(key)?.entries)
    }

    /// The audit entries of interface `key` and the lines of the log that are not whole
    /// entries (a crash mid-append tears the last one): those are skipped, not fatal.
    pub fn audit_log(&self, key: &str) -> crate::Result<AuditLog> {
        let mut log = AuditLog::default();
        let last_line = self.scan_audit_log(|line| match line {
            LogLine::Entry { entry, .. } => {
                if entry.iface == key {
                    log.entries.push(*entry);
                }
            }
            LogLine::Bad(bad) => log.bad_lines.push(bad),
        })?;
        if let Some(bad) = log.bad_lines.last_mut() {
            bad.last = bad.line == last_line;
        }
        Ok(log)
    }

    /// Reads `audit.jsonl` line by line (blank lines skipped); the number of its last line
    /// (0 when it is empty or absent).
    pub(crate) fn scan_audit_log(&self, mut visit: impl FnMut(LogLine<'_>)) -> crate::Result<usize> {
        use std::io::BufRead as _;
        let path = self.root.join("audit.jsonl");
        let file = match files::open_regular(&path, "the audit log") {
            Ok((file, _)) => file,
            Err(e) if files::is_not_found(&e) => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut buf = Vec::new();
        let mut number = 0usize;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_AUDIT_LINE_BYTES + 1)
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            number += 1;
            let whole = buf.last() == Some(&b'\n');
            if !whole && buf.len() as u64 > MAX_AUDIT_LINE_BYTES {
                // Skip the rest of an overlong line.
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    let m = (&mut reader)
                        .take(MAX_AUDIT_LINE_BYTES)
                        .read_until(b'\n', &mut rest)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if m == 0 || rest.last() == Some(&b'\n') {
                        break;
                    }
                }
                visit(LogLine::Bad(BadLine { line: number, last: false, why: "longer than 1 MiB".to_owned() }));
                continue;
            }
            let raw = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if raw.trim_ascii().is_empty() {
                continue;
            }
            match parse_entry(raw) {
                Ok((entry, prev)) => visit(LogLine::Entry { line: number, raw, entry: Box::new(entry), prev }),
                Err(e) => visit(LogLine::Bad(BadLine { line: number, last: false, why: e.to_string() })),
            }
        }
        Ok(number)
    }

    /// Deletes stored artifacts that no interface record refers to.
    /// A record that cannot be read may keep any of them: then none is deleted.
    pub(crate) fn collect_garbage(&self) -> crate::Result<usize> {
        let mut kept = std::collections::BTreeSet::new();
        let Ok(records) = self.all_records() else { return Ok(0) };
        for record in records {
            kept.extend(record.pending.iter().chain(&record.current).chain(&record.previous).cloned());
        }
        let mut removed = 0;
        let dir = self.root.join("generations");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            let kept_kind = path.extension().is_some_and(|e| e == "bal" || e == "sig" || e == "signed");
            if kept_kind && !kept.contains(&format!("sha256:{stem}")) {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed += usize::from(path.extension().is_some_and(|e| e == "bal"));
            }
        }
        Ok(removed)
    }

    fn all_records(&self) -> crate::Result<Vec<IfaceRecord>> {
        let mut records = Vec::new();
        let mut stack = vec![self.root.join("ifaces")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n == "record.json") {
                    let bytes = files::read_regular(&path, MAX_RECORD_BYTES, "record")?;
                    records
                        .push(serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    pub(super) use crate::files::Scratch;

    pub(super) fn entry(iface: &str, action: &str) -> AuditEntry {
        AuditEntry {
            time: 1_700_000_000.0,
            action: action.to_owned(),
            iface: iface.to_owned(),
            to: Some(format!("sha256:{}", "a".repeat(64))),
            result: "ok".to_owned(),
            ..AuditEntry::default()
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    pub(super) fn append_raw(path: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(bytes).unwrap();
    }

    #[test]
    fn a_torn_last_line_hides_no_entry_and_the_next_append_starts_a_line() {
        let scratch = Scratch::new("state-torn-last");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        state.audit(&entry("eth0", "attach")).unwrap();
        state.audit(&entry("eth0", "swap")).unwrap();
        let log_path = scratch.0.join("audit.jsonl");
        // A crash in the middle of the third append.
        let whole = serde_json::to_string(&entry("eth0", "swap")).unwrap();
        append_raw(&log_path, &whole.as_bytes()[..whole.len() / 2]);
        let log = state.audit_log("eth0").unwrap();
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.bad_lines.len(), 1);
        assert_eq!((log.bad_lines[0].line, log.bad_lines[0].last), (3, true));
        assert_eq!(state.history("eth0").unwrap().len(), 2);

        // The next entry is whole, on a line of its own; the torn one is now in the middle.
        state.audit(&entry("eth0", "rollback")).unwrap();
        let log = state.audit_log("eth0").unwrap();
        let actions: Vec<&str> = log.entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["attach", "swap", "rollback"]);
        assert_eq!(log.bad_lines.len(), 1);
        assert_eq!((log.bad_lines[0].line, log.bad_lines[0].last), (3, false));
    }

    #[test]
    fn a_bad_line_in_the_middle_is_named_by_its_number() {
        let scratch = Scratch::new("state-torn-middle");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        state.audit(&entry("eth0", "attach")).unwrap();
        append_raw(&scratch.0.join("audit.jsonl"), b"{\"time\": 1, \"garbage\n\n");
        state.audit(&entry("eth1", "attach")).unwrap();
        state.audit(&entry("eth0", "detach")).unwrap();
        let log = state.audit_log("eth0").unwrap();
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.bad_lines, [BadLine { line: 2, last: false, why: log.bad_lines[0].why.clone() }]);
        assert_eq!(state.audit_log("eth1").unwrap().entries.len(), 1);
    }

    #[test]
    fn the_state_directory_is_private() {
        let scratch = Scratch::new("state-modes");
        // A state directory that does not exist yet: ballast makes it.
        std::fs::remove_dir(&scratch.0).unwrap();
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        assert_eq!(mode(&scratch.0), 0o700, "a new state directory");
        for dir in ["generations", "ifaces"] {
            assert_eq!(mode(&scratch.0.join(dir)), 0o700, "{dir}");
        }
        state.audit(&entry("eth0", "attach")).unwrap();
        assert_eq!(mode(&scratch.0.join("audit.jsonl")), 0o600);
        drop(state.lock("eth0").unwrap());
        assert_eq!(mode(&scratch.0.join("ifaces/eth0")), 0o700);
        assert_eq!(mode(&scratch.0.join("ifaces/eth0/lock")), 0o600);

        // What an older ballast left world-readable is tightened when next written.
        for (path, m) in [
            (scratch.0.join("generations"), 0o755),
            (scratch.0.join("ifaces/eth0"), 0o755),
            (scratch.0.join("audit.jsonl"), 0o644),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        state.audit(&entry("eth0", "swap")).unwrap();
        drop(state.lock("eth0").unwrap());
        assert_eq!(mode(&scratch.0.join("generations")), 0o700);
        assert_eq!(mode(&scratch.0.join("ifaces/eth0")), 0o700);
        assert_eq!(mode(&scratch.0.join("audit.jsonl")), 0o600);
    }

    #[test]
    fn records_that_are_not_regular_files_are_refused_without_blocking() {
        let scratch = Scratch::new("state-fifo-record");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        let dir = scratch.0.join("ifaces/eth0");
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = std::ffi::CString::new(dir.join("record.json").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let err = state.record("eth0").unwrap_err().to_string();
        assert!(err.contains("FIFO") && err.contains("record.json"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(state.record("eth1").unwrap(), None);
        // And audit.jsonl as a FIFO neither blocks an append nor history.
        let log = std::ffi::CString::new(scratch.0.join("audit.jsonl").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::mkfifo(log.as_ptr(), 0o600) }, 0);
        assert!(state.audit(&entry("eth0", "attach")).is_err());
        assert!(state.audit_log("eth0").is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
