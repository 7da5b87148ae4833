//! The lab's record (`/run/ballast-lab/NAME/lab.json`): what `up` created, written before
//! each step so that `down` can undo a partial `up`, and the servers' process ids, so that
//! `down` ends those processes and no other. It also keeps each namespace's cookie (the
//! name of its pin directory, `/sys/fs/bpf/ballast/netns-COOKIE`), so that `down` removes a
//! namespace's pins even after the namespace was deleted by hand.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Where every lab keeps its run directory.
pub const RUN_ROOT: &str = "/run/ballast-lab";
const RECORD_FILE: &str = "lab.json";
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Record {
    pub name: String,
    pub backends: usize,
    pub lbs: usize,
    /// The network namespaces created so far (each recorded just before it is created).
    pub namespaces: Vec<String>,
    /// Each created namespace's cookie (recorded just after it is created); never reused by
    /// the kernel, so it names that namespace's pins even once the namespace is gone.
    #[serde(default)]
    pub cookies: BTreeMap<String, u64>,
    pub servers: Vec<Server>,
}

/// A backend's server process: its pid and the start time the kernel gave it, so that a
/// pid reused by another process is never mistaken for it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Server {
    pub backend: String,
    pub pid: u32,
    pub start_time: u64,
}

/// The lab's run directory: the record, the state directory of its generations, configs,
/// artifacts and the servers' logs.
pub fn run_dir(name: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(name)
}

impl Record {
    pub fn path(name: &str) -> PathBuf {
        run_dir(name).join(RECORD_FILE)
    }

    pub fn load(name: &str) -> anyhow::Result<Option<Record>> {
        let path = Record::path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the record whole (a temporary file renamed over the old one).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = Record::path(&self.name);
        let temporary = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).context("rendering the lab record")?;
        let written = std::fs::write(&temporary, text)
            .with_context(|| format!("writing {}", temporary.display()))
            .and_then(|()| std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display())));
        if written.is_err() {
            // Not left behind by a failed write.
            let _never_written = std::fs::remove_file(&temporary);
        }
        written
    }
}

/// The fields of /proc/PID/stat after the command name: (state, start time).
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // Field 3 (state) is the first after the name, field 22 (starttime) the 20th.
    Some((fields.first()?.chars().next()?, fields.get(19)?.parse().ok()?))
}

/// The start time of a live process, to record with its pid.
pub fn start_time(pid: u32) -> anyhow::Result<u64> {
    match process_stat(pid) {
        Some((_, start)) => Ok(start),
        None => bail!("process {pid} is gone"),
    }
}

impl Server {
    /// Whether the recorded process still runs (same pid and start time, not a zombie).
    pub fn is_running(&self) -> bool {
        process_stat(self.pid).is_some_and(|(state, start)| start == self.start_time && state != 'Z')
    }

    /// Ends the recorded process, if it still runs, and waits until it is gone. Returns
    /// whether it had to end it.
    pub fn stop(&self) -> anyhow::Result<bool> {
        if !self.is_running() {
            return Ok(false);
        }
        let pid = libc::pid_t::try_from(self.pid).context("pid out of range")?;
        // SAFETY: kill(2) on the pid just checked to be the recorded process.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("ending server {} (pid {pid})", self.backend));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_running() {
            if Instant::now() > deadline {
                bail!("server {} (pid {pid}) still runs {STOP_TIMEOUT:?} after SIGKILL", self.backend);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(true)
    }
}
