//! `ballast history`.
use serde::Serialize;

use super::args::IfaceArgs;
use crate::{
    ops::Target,
    state::{
        chain::{self, ChainReport},
        AuditEntry, BadLine, StateDir,
    },
    Error, Result,
};

/// An entry as `--json` prints it: the entry's own fields (`time` in seconds since the epoch,
/// as recorded) and the same time in RFC 3339, UTC.
#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    entry: &'a AuditEntry,
    time_rfc3339: String,
}

pub fn run(state: &StateDir, target: Option<IfaceArgs>, json: bool, verify: bool) -> Result<()> {
    if verify {
        return verify_chain(state, json);
    }
    // clap requires --iface or --verify (args.rs).
    let Some(target) = target else { return Err(Error::other("history needs --iface IF, or --verify")) };
    let iface = target.enter()?;
    let log = state.audit_log(&Target::new(&iface)?.key)?;
    // Lines that are not whole entries do not hide the others: they are named on stderr.
    for bad in &log.bad_lines {
        eprintln_lossy(&describe_bad_line(&state.root().join("audit.jsonl").display().to_string(), bad));
    }
    if json {
        let shown: Vec<Shown<'_>> =
            log.entries.iter().map(|entry| Shown { entry, time_rfc3339: rfc3339(entry.time) }).collect();
        super::print(shown.as_slice(), true, |_| String::new())
    } else {
        super::out(&render(&log.entries))
    }
}

/// `ballast history --verify`: the report, then an error (exit 1) if a link is broken.
fn verify_chain(state: &StateDir, json: bool) -> Result<()> {
    let path = state.root().join("audit.jsonl").display().to_string();
    let report = chain::verify(state)?;
    super::print(&report, json, |report| render_chain(&path, report))?;
    match &report.broken {
        None => Ok(()),
        Some(broken) => {
            Err(Error::Other(format!("{path}: the audit log's hash chain is broken at {}", broken.message)))
        }
    }
}

/// What `history --verify` prints.
pub fn render_chain(path: &str, report: &ChainReport) -> String {
    let mut text = String::new();
    if report.unchained > 0 {
        text += &format!(
            "{} entries are unchained (written before chaining began), not verified{}\n",
            report.unchained,
            report.chain_begins_line.map(|l| format!("; the chain begins at line {l}")).unwrap_or_default()
        );
    }
    for skipped in &report.skipped {
        text += &format!(
            "line {} is not an entry (an append cut short, e.g. by a crash); the chain links across it\n",
            skipped.line
        );
    }
    match &report.broken {
        None if report.entries == report.unchained => {
            text += &format!("ok   {path}: no chained entries (nothing to verify)\n");
        }
        None => {
            let chained = report.entries - report.unchained;
            let head = report.head_line.map(|l| format!(" (line {l})")).unwrap_or_default();
            text += &format!("ok   {path}: {chained} chained entries intact; last entry{head} {}\n", report.head);
        }
        Some(broken) => {
            let when = broken.time.map(|t| format!(" at {}", rfc3339(t))).unwrap_or_default();
            text += &format!("FAIL {path}: the chain breaks at line {} (entry {}){when}\n", broken.line, broken.index);
            text += &format!("     {}\n", broken.message);
            text += &format!("     expected prev {}\n", broken.expected);
            text += &format!("     found prev    {}\n", broken.found.as_deref().unwrap_or("(none)"));
        }
    }
    text
}

/// The warning for a line of the audit log that is not an entry.
pub fn describe_bad_line(path: &str, bad: &BadLine) -> String {
    if bad.last {
        format!(
            "ballast: warning: {path}: the last line ({}) is torn (an append cut short, e.g. by a crash) and is \
             skipped; every whole entry is shown",
            bad.line
        )
    } else {
        format!("ballast: warning: {path}: line {} is not a whole entry and is skipped ({})", bad.line, bad.why)
    }
}

/// eprintln! that cannot panic (a closed stderr is no reason to fail).
fn eprintln_lossy(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{text}");
}

pub fn render(entries: &[AuditEntry]) -> String {
    let short = |d: &Option<String>| d.as_deref().map_or("-".to_owned(), |d| d.chars().take(19).collect());
    entries
        .iter()
        .map(|e| {
            let reason = e.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            format!(
                "{}  {:<9} {} -> {}  {}{reason}\n",
                rfc3339(e.time),
                e.action,
                short(&e.from),
                short(&e.to),
                e.result
            )
        })
        .collect()
}

/// Seconds since the Unix epoch as RFC 3339 in UTC, to the millisecond:
/// `2024-05-01T12:34:56.789Z`. Times before 1970 or not finite print as the epoch.
pub fn rfc3339(seconds: f64) -> String {
    let millis = if seconds.is_finite() && seconds > 0.0 { (seconds * 1000.0).round() as u64 } else { 0 };
    let (days, rest) = (millis / 86_400_000, millis % 86_400_000);
    let (hour, minute, second, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day count since
/// 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000.123_4), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(4_107_542_399.999), "2100-02-28T23:59:59.999Z");
        assert_eq!(rfc3339(f64::NAN), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5.0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn render_shows_rfc3339_not_epoch_seconds() {
        let entry = AuditEntry {
            time: 1_700_000_000.5,
            action: "swap".into(),
            iface: "eth0".into(),
            from: Some("sha256:aaaa".into()),
            to: Some("sha256:bbbb".into()),
            result: "ok".into(),
            ..AuditEntry::default()
        };
        let text = render(&[entry]);
        assert!(text.starts_with("2023-11-14T22:13:20.500Z  swap"), "{text}");
        assert!(!text.contains("1700000000"), "{text}");
    }
}
