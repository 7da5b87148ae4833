//! The audit log's hash chain. Every entry [`StateDir::audit`] appends carries `prev`: the
//! SHA-256 (`sha256:<hex>`) of the line of the entry before it in the log (any interface's), as
//! written, without its newline; the log's first entry carries [`GENESIS`]. Editing, deleting,
//! inserting or reordering entries breaks a link that [`verify`] finds and names.
//!
//! Entries written before chaining began (no `prev`) are reported as unchained, not checked:
//! the chain begins at the first entry with `prev`, which links to the last entry before it.
//! Lines that are not entries (an append cut short by a crash) lie outside the chain: the next
//! append links to the last whole entry, and `verify` names them. A hash chain holds no key:
//! whoever can rewrite the log can rewrite every later entry too, and dropping whole entries
//! from the end leaves no trace; keep the reported head (the last entry's hash) elsewhere to
//! catch that.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{parse_entry, BadLine, LogLine, StateDir, MAX_AUDIT_LINE_BYTES};
use crate::generation::digest::format_digest;

/// The `prev` of the log's first entry.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What the next entry's `prev` holds for the entry written as `line` (without its newline).
pub fn link(line: &[u8]) -> String {
    format_digest(&Sha256::digest(line).into())
}

/// The last line of the log's first `len` bytes that is an entry, as written (without its
/// newline); None when no line is. Reads backwards from the end: an append reads only the tail.
pub(super) fn last_entry_line(file: &File, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    const CHUNK: u64 = 64 << 10;
    // `window` holds the bytes from `start` to the end of the line being looked at.
    let mut start = len;
    let mut window: Vec<u8> = Vec::new();
    // In a line longer than MAX_AUDIT_LINE_BYTES (not an entry): looking for where it begins.
    let mut skipping = false;
    loop {
        if !skipping {
            if let Some(at) = window.iter().rposition(|&b| b == b'\n') {
                if parse_entry(&window[at + 1..]).is_ok() {
                    return Ok(Some(window.split_off(at + 1)));
                }
                window.truncate(at);
                continue;
            }
            if window.len() as u64 > MAX_AUDIT_LINE_BYTES {
                skipping = true;
                window.clear();
            }
        }
        if start == 0 {
            return Ok((!skipping && parse_entry(&window).is_ok()).then_some(window));
        }
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0; (start - from) as usize];
        file.read_exact_at(&mut chunk, from)?;
        start = from;
        if skipping {
            if let Some(at) = chunk.iter().rposition(|&b| b == b'\n') {
                chunk.truncate(at);
                window = chunk;
                skipping = false;
            }
        } else {
            chunk.extend_from_slice(&window);
            window = chunk;
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Serialize)]
pub struct ChainReport {
    /// The entries of the log (every interface's).
    pub entries: usize,
    /// Entries before the chain began (written before chaining), not checked.
    pub unchained: usize,
    /// The line of the first entry with `prev`.
    pub chain_begins_line: Option<usize>,
    /// The last entry's line and hash (what the next entry's `prev` will be), or [`GENESIS`].
    pub head_line: Option<usize>,
    pub head: String,
    /// Lines that are not entries and that the chain links across (appends cut short).
    pub skipped: Vec<BadLine>,
    /// The first broken link, if any.
    pub broken: Option<ChainBreak>,
}

impl ChainReport {
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// How a link is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// `prev` is not the hash of the entry before: that entry was changed, or entries between
    /// them (or before the first) were deleted.
    ChangedOrDeleted,
    /// `prev` is the hash of an earlier entry: the entries between were inserted.
    Inserted,
    /// `prev` is the hash of a later entry: entries were reordered.
    Reordered,
    /// A line between this entry and the one before is not an entry: damaged.
    Damaged,
    /// The entry has no `prev` although the chain began before it.
    Unchained,
    /// The log's last line is not a whole entry: an append cut short, or the log truncated.
    Torn,
}

/// The first broken link: the entry at `line` (the `index`th entry of the log, from 0).
#[derive(Clone, Debug, Serialize)]
pub struct ChainBreak {
    pub kind: BreakKind,
    pub line: usize,
    pub index: usize,
    pub time: Option<f64>,
    pub action: Option<String>,
    pub iface: Option<String>,
    /// The `prev` the entry should carry, and the one it carries.
    pub expected: String,
    pub found: Option<String>,
    pub message: String,
}

/// An entry as the chain sees it.
struct Link {
    line: usize,
    hash: String,
    prev: Option<String>,
    time: f64,
    action: String,
    iface: String,
}

/// Walks the whole log's chain; reports the first broken link.
pub fn verify(state: &StateDir) -> crate::Result<ChainReport> {
    let mut links = Vec::new();
    let mut bad = Vec::new();
    let last_line = state.scan_audit_log(|line| match line {
        LogLine::Entry { line, raw, entry, prev } => {
            links.push(Link { line, hash: link(raw), prev, time: entry.time, action: entry.action, iface: entry.iface })
        }
        LogLine::Bad(b) => bad.push(b),
    })?;
    if let Some(b) = bad.last_mut() {
        b.last = b.line == last_line;
    }
    Ok(check(&links, bad))
}

fn check(links: &[Link], mut bad: Vec<BadLine>) -> ChainReport {
    let head = links.last().map_or_else(|| GENESIS.to_owned(), |l| l.hash.clone());
    let torn = if bad.last().is_some_and(|b| b.last) { bad.pop() } else { None };
    let mut report = ChainReport {
        entries: links.len(),
        unchained: 0,
        chain_begins_line: None,
        head_line: links.last().map(|l| l.line),
        head,
        skipped: bad,
        broken: None,
    };
    let index: HashMap<&str, usize> = links.iter().enumerate().rev().map(|(i, l)| (l.hash.as_str(), i)).collect();
    for (i, entry) in links.iter().enumerate() {
        let expected = if i == 0 { GENESIS } else { links[i - 1].hash.as_str() };
        let broken = |kind, message: String| ChainBreak {
            kind,
            line: entry.line,
            index: i,
            time: Some(entry.time),
            action: Some(entry.action.clone()),
            iface: Some(entry.iface.clone()),
            expected: expected.to_owned(),
            found: entry.prev.clone(),
            message: format!("line {} ({} on {}): {message}", entry.line, entry.action, entry.iface),
        };
        let Some(found) = entry.prev.as_deref() else {
            if let Some(began) = report.chain_begins_line {
                report.broken = Some(broken(
                    BreakKind::Unchained,
                    format!(
                        "has no prev although the chain began at line {began}: inserted, or written by a ballast \
                         without chaining"
                    ),
                ));
                return report;
            }
            report.unchained += 1;
            continue;
        };
        if found == expected {
            report.chain_begins_line.get_or_insert(entry.line);
            continue;
        }
        let after = if i == 0 { 0 } else { links[i - 1].line };
        let damaged: Vec<usize> =
            report.skipped.iter().map(|b| b.line).filter(|&n| n > after && n < entry.line).collect();
        let (kind, message) = if let Some(&first) = damaged.first() {
            (
                BreakKind::Damaged,
                format!("its prev is not the hash of line {after}: line {first} before it is not an entry (damaged)"),
            )
        } else if found == GENESIS {
            (
                BreakKind::Inserted,
                format!(
                    "its prev says it is the log's first entry, but {i} entries (from line {}) come before it: \
                     inserted",
                    links[0].line
                ),
            )
        } else {
            match index.get(found) {
                Some(&j) if j + 1 < i => (
                    BreakKind::Inserted,
                    format!(
                        "its prev is the hash of line {}: the {} entries from line {} to line {after} were inserted",
                        links[j].line,
                        i - j - 1,
                        links[j + 1].line
                    ),
                ),
                Some(&j) if j > i => (
                    BreakKind::Reordered,
                    format!(
                        "its prev is the hash of line {}, which comes after it: entries were reordered",
                        links[j].line
                    ),
                ),
                _ if i == 0 => (
                    BreakKind::ChangedOrDeleted,
                    "its prev is not the genesis value, and no entry comes before it: the entries before it were \
                     deleted"
                        .to_owned(),
                ),
                _ => (
                    BreakKind::ChangedOrDeleted,
                    format!(
                        "its prev is not the hash of line {after}: line {after} was changed, or entries after it were \
                         deleted"
                    ),
                ),
            }
        };
        report.broken = Some(broken(kind, message));
        return report;
    }
    if let Some(torn) = torn {
        report.broken = Some(ChainBreak {
            kind: BreakKind::Torn,
            line: torn.line,
            index: links.len(),
            time: None,
            action: None,
            iface: None,
            expected: report.head.clone(),
            found: None,
            message: format!(
                "line {}, the last, is not a whole entry ({}): an append cut short (a crash), or the log was \
                 truncated or changed there; the {} entries before it chain",
                torn.line,
                torn.why,
                links.len()
            ),
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::state::{
        tests::{append_raw, entry, Scratch},
        AuditEntry, ChainedEntry,
    };

    /// A state directory whose log holds `actions` (appended by [`StateDir::audit`]), and the
    /// log's lines as written.
    fn log_of(tag: &str, actions: &[&str]) -> (Scratch, StateDir, Vec<Vec<u8>>) {
        let scratch = Scratch::new(&format!("state-{tag}"));
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        for (i, action) in actions.iter().enumerate() {
            state.audit(&entry(if i % 2 == 0 { "eth0" } else { "eth1" }, action)).unwrap();
        }
        let lines = read_lines(&scratch.0.join("audit.jsonl"));
        (scratch, state, lines)
    }

    fn read_lines(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
    }

    fn write_lines(state: &StateDir, lines: &[Vec<u8>]) {
        let text: Vec<u8> = lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect();
        std::fs::write(state.root().join("audit.jsonl"), text).unwrap();
    }

    fn prev_of(line: &[u8]) -> Option<String> {
        parse_entry(line).unwrap().1
    }

    fn broken(state: &StateDir) -> ChainBreak {
        let report = verify(state).unwrap();
        assert!(!report.ok(), "{report:?}");
        report.broken.unwrap()
    }

    #[test]
    fn each_entry_carries_the_hash_of_the_line_before() {
        let (_scratch, state, lines) = log_of("chain-links", &["attach", "swap", "rollback"]);
        assert_eq!(lines.len(), 3);
        assert_eq!(prev_of(&lines[0]).as_deref(), Some(GENESIS));
        for i in 1..3 {
            let expected = format!("sha256:{}", crate::generation::digest::hex(&Sha256::digest(&lines[i - 1])));
            assert_eq!(prev_of(&lines[i]), Some(expected));
        }
        let report = verify(&state).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.entries, report.unchained, report.chain_begins_line), (3, 0, Some(1)));
        assert_eq!((report.head_line, report.head.clone()), (Some(3), link(&lines[2])));
        // The interfaces' histories still read only their own entries.
        assert_eq!(state.history("eth0").unwrap().len(), 2);
    }

    #[test]
    fn an_empty_or_absent_log_verifies() {
        let scratch = Scratch::new("state-chain-empty");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        let report = verify(&state).unwrap();
        assert!(report.ok());
        assert_eq!((report.entries, report.head.as_str(), report.head_line), (0, GENESIS, None));
    }

    #[test]
    fn an_edited_entry_breaks_the_link_after_it() {
        let (_scratch, state, mut lines) = log_of("chain-edit", &["attach", "swap", "rollback", "detach"]);
        let original = lines[1].clone();
        let at = lines[1].windows(4).position(|w| w == b"\"ok\"").unwrap();
        lines[1][at + 1] = b'k';
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.index), (BreakKind::ChangedOrDeleted, 3, 2));
        assert_eq!((b.expected, b.found), (link(&lines[1]), Some(link(&original))));
        assert_eq!(b.action.as_deref(), Some("rollback"));
        assert!(b.message.contains("line 2 was changed"), "{}", b.message);
    }

    #[test]
    fn a_deleted_entry_is_named_by_the_entry_after_it() {
        let (_scratch, state, mut lines) = log_of("chain-delete", &["attach", "swap", "rollback", "detach"]);
        lines.remove(2);
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.action.as_deref()), (BreakKind::ChangedOrDeleted, 3, Some("detach")));
        assert!(b.message.contains("entries after it were deleted"), "{}", b.message);

        // Deleting the first: the new first entry does not start at the genesis value.
        let (_scratch, state, mut lines) = log_of("chain-delete-first", &["attach", "swap"]);
        lines.remove(0);
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.expected.as_str()), (BreakKind::ChangedOrDeleted, 1, GENESIS));
        assert!(b.message.contains("before it were deleted"), "{}", b.message);
    }

    #[test]
    fn swapped_entries_are_reordered() {
        let (_scratch, state, mut lines) = log_of("chain-swap", &["attach", "swap", "rollback", "detach"]);
        lines.swap(1, 2);
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.action.as_deref()), (BreakKind::Reordered, 2, Some("rollback")));
        assert!(b.message.contains("hash of line 3"), "{}", b.message);
    }

    #[test]
    fn inserted_entries_are_named() {
        let (_scratch, state, mut lines) = log_of("chain-insert", &["attach", "swap", "rollback"]);
        // A forged entry that links to the one before it: the entry after it does not.
        let forged = ChainedEntry { entry: entry("eth0", "swap"), prev: Some(link(&lines[0])) };
        lines.insert(1, serde_json::to_vec(&forged).unwrap());
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line), (BreakKind::Inserted, 3));
        assert!(b.message.contains("from line 2 to line 2 were inserted"), "{}", b.message);

        // One without a link, after the chain began.
        lines.remove(1);
        lines.insert(2, serde_json::to_vec(&entry("eth0", "swap")).unwrap());
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.found), (BreakKind::Unchained, 3, None));
    }

    #[test]
    fn a_damaged_entry_in_the_middle_is_named() {
        let (_scratch, state, mut lines) = log_of("chain-damaged", &["attach", "swap", "rollback"]);
        lines[1].truncate(10);
        write_lines(&state, &lines);
        let b = broken(&state);
        assert_eq!((b.kind, b.line), (BreakKind::Damaged, 3));
        assert!(b.message.contains("line 2 before it is not an entry"), "{}", b.message);
    }

    #[test]
    fn a_torn_last_line_is_a_break_until_the_next_append_links_across_it() {
        let (scratch, state, lines) = log_of("chain-torn", &["attach", "swap"]);
        let path = scratch.0.join("audit.jsonl");
        // A crash in the middle of an append, or the log truncated.
        let mut torn = lines.clone();
        torn[1].truncate(lines[1].len() / 2);
        std::fs::write(&path, [torn[0].as_slice(), b"\n", torn[1].as_slice()].concat()).unwrap();
        let b = broken(&state);
        assert_eq!((b.kind, b.line, b.index), (BreakKind::Torn, 2, 1));
        assert!(b.message.contains("cut short"), "{}", b.message);

        // The next append starts a line of its own and links to the last whole entry.
        state.audit(&entry("eth0", "rollback")).unwrap();
        let now = read_lines(&path);
        assert_eq!(prev_of(&now[2]), Some(link(&lines[0])));
        let report = verify(&state).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.skipped.iter().map(|b| b.line).collect::<Vec<_>>(), [2]);
        assert_eq!(report.entries, 2);
    }

    #[test]
    fn entries_written_before_chaining_are_unchained_and_the_chain_links_to_the_last() {
        let scratch = Scratch::new("state-chain-legacy");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        let path = scratch.0.join("audit.jsonl");
        let legacy: Vec<Vec<u8>> =
            ["attach", "swap"].iter().map(|a| serde_json::to_vec(&entry("eth0", a)).unwrap()).collect();
        std::fs::write(&path, [legacy[0].as_slice(), b"\n", legacy[1].as_slice(), b"\n"].concat()).unwrap();
        let report = verify(&state).unwrap();
        assert!(report.ok());
        assert_eq!((report.entries, report.unchained, report.chain_begins_line), (2, 2, None));

        state.audit(&entry("eth0", "rollback")).unwrap();
        state.audit(&entry("eth0", "detach")).unwrap();
        let lines = read_lines(&path);
        assert_eq!(prev_of(&lines[2]), Some(link(&legacy[1])));
        let report = verify(&state).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.entries, report.unchained, report.chain_begins_line), (4, 2, Some(3)));
        assert_eq!(state.history("eth0").unwrap().len(), 4);

        // The last unchained entry is covered by the first link; the ones before it are not.
        let mut edited = lines.clone();
        edited[1] = serde_json::to_vec(&AuditEntry { result: "forged".into(), ..entry("eth0", "swap") }).unwrap();
        write_lines(&state, &edited);
        assert_eq!(broken(&state).line, 3);
        let mut edited = lines.clone();
        edited[0] = serde_json::to_vec(&AuditEntry { result: "forged".into(), ..entry("eth0", "attach") }).unwrap();
        write_lines(&state, &edited);
        assert!(verify(&state).unwrap().ok());
    }

    #[test]
    fn the_tail_is_found_across_long_lines_blank_lines_and_overlong_ones() {
        let scratch = Scratch::new("state-chain-tail");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        let path = scratch.0.join("audit.jsonl");
        // An entry longer than the backwards read's chunk.
        state.audit(&AuditEntry { reason: Some("r".repeat(200 << 10)), ..entry("eth0", "attach") }).unwrap();
        let long = read_lines(&path).remove(0);
        append_raw(&path, b"\n\n");
        state.audit(&entry("eth0", "swap")).unwrap();
        assert_eq!(prev_of(&read_lines(&path)[1]), Some(link(&long)));
        // A line over 1 MiB is not an entry: the next links across it.
        let second = read_lines(&path).remove(1);
        append_raw(&path, &[vec![b'x'; (1 << 20) + 5], b"\n".to_vec()].concat());
        state.audit(&entry("eth0", "rollback")).unwrap();
        assert_eq!(prev_of(read_lines(&path).last().unwrap()), Some(link(&second)));
        let report = verify(&state).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.entries, report.skipped.len()), (3, 1));
    }

    #[test]
    fn concurrent_appenders_do_not_fork_the_chain() {
        let scratch = Scratch::new("state-chain-concurrent");
        let state = StateDir::open(Some(&scratch.0)).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let state = &state;
                s.spawn(move || {
                    for _ in 0..50 {
                        state.audit(&entry(&format!("eth{t}"), "swap")).unwrap();
                    }
                });
            }
        });
        let report = verify(&state).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.entries, 200);
    }
}
