//! One process at a time uses a lab: `/run/ballast-lab/NAME.lock`, an flock held by the process
//! that builds the lab and uses it (`ballast lab up` while it builds, `ballast demo` and a
//! test's [`crate::Lab`] for as long as they hold it), and by `ballast lab down` while it tears
//! down. A second `up`, `demo` or `down` of that name fails at once, naming the holder, instead
//! of tearing down a lab another process is using. The kernel releases the lock when its
//! holder exits, however it exits. The file holds the holder's pid; a teardown removes it
//! while holding the lock ([`LabLock::release_and_remove`]), and whoever takes the lock checks
//! that it locked the file that is at the path, not one removed meanwhile.
use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::record::RUN_ROOT;

/// The lab is in use by another process: what `up`, `down` and `demo` fail with.
#[derive(Debug)]
pub struct LabInUse {
    pub name: String,
    /// The holder's pid and command line, when it could be read.
    pub holder: Option<(u32, String)>,
}

impl std::fmt::Display for LabInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match &self.holder {
            Some((pid, command)) if !command.is_empty() => format!("process {pid} (`{command}`)"),
            Some((pid, _)) => format!("process {pid}"),
            None => "another process".to_owned(),
        };
        write!(
            f,
            "lab '{}' is in use by {who}: it is left alone; wait until that process is done, or use another --name",
            self.name
        )
    }
}

impl std::error::Error for LabInUse {}

/// Holds a lab's lock until dropped.
#[derive(Debug)]
pub struct LabLock {
    file: File,
    path: PathBuf,
}

impl LabLock {
    /// Once the lab is torn down: removes the lock file, then lets the lock go.
    pub fn release_and_remove(self) {
        if same_file(&self.file, &self.path) {
            let _already_gone = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` is still the file `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Attempts at taking a lock file that a teardown keeps removing under us.
const ATTEMPTS: usize = 10;

pub fn lock_path(name: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(format!("{name}.lock"))
}

/// Takes lab `name`'s lock, or fails at once with [`LabInUse`] when another process holds it
/// (also another handle of this process: a lab has one user).
pub fn acquire(name: &str) -> anyhow::Result<LabLock> {
    std::fs::create_dir_all(RUN_ROOT).with_context(|| format!("creating {RUN_ROOT}"))?;
    let path = lock_path(name);
    for _ in 0..ATTEMPTS {
        if let Some(lock) = try_acquire(name, &path)? {
            return Ok(lock);
        }
    }
    anyhow::bail!("could not take the lock {}: it was removed {ATTEMPTS} times while taking it", path.display())
}

/// None when the file locked was removed (by a teardown) before it was locked: try again.
fn try_acquire(name: &str, path: &Path) -> anyhow::Result<Option<LabLock>> {
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LabInUse { name: name.to_owned(), holder: recorded_holder(&mut file) }.into());
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    if !same_file(&file, path) {
        return Ok(None);
    }
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{pid}"))
        .with_context(|| format!("writing the holder's pid into {}", path.display()))?;
    Ok(Some(LabLock { file, path: path.to_path_buf() }))
}

/// Who holds lab `name`'s lock, if anyone (for `status`): read from /proc/locks, so that
/// asking never takes the lock (which would make a concurrent `up` or `down` fail).
pub fn holder(name: &str) -> Option<LabInUse> {
    let path = lock_path(name);
    let metadata = std::fs::metadata(&path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let device = (libc::major(metadata.dev()), libc::minor(metadata.dev()));
    let pid = flock_holder(&locks, device, metadata.ino())?;
    let mut file = File::open(&path).ok()?;
    // The pid the holder wrote names the process; /proc/locks' pid is the one that took it.
    let holder = recorded_holder(&mut file).or_else(|| Some((pid, command_line(pid).unwrap_or_default())));
    Some(LabInUse { name: name.to_owned(), holder })
}

/// The pid holding an flock on the file (`device`, `inode`) in /proc/locks' text: lines such as
/// `3: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF` (device numbers in hex).
fn flock_holder(locks: &str, device: (u32, u32), inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `N: -> FLOCK ...` is a process waiting for the lock, not holding it.
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        let (pid, file) = (fields.get(at + 3)?, fields.get(at + 4)?);
        let mut parts = file.split(':');
        let major = u32::from_str_radix(parts.next()?, 16).ok()?;
        let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
        let ino: u64 = parts.next()?.parse().ok()?;
        ((major, minor) == device && ino == inode).then(|| pid.parse().ok())?
    })
}

/// The pid the holder wrote, and its command line, while it still runs.
fn recorded_holder(file: &mut File) -> Option<(u32, String)> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Some((pid, command_line(pid)?))
}

/// A running process's command line, its arguments joined by spaces.
fn command_line(pid: u32) -> Option<String> {
    let command = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = command
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    Some(args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_flock_holder_of_the_file_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:19:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4321 fd:01:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF\n\
                     4: OFDLCK ADVISORY  READ  -1 00:19:5678 0 EOF\n";
        assert_eq!(flock_holder(locks, (0, 0x19), 5678), Some(1234));
        assert_eq!(flock_holder(locks, (0xfd, 1), 5678), Some(4321));
        assert_eq!(flock_holder(locks, (0, 0x19), 5679), None);
        // A waiter's line ("->") is not the holder's.
        assert_eq!(flock_holder("5: -> FLOCK  ADVISORY  WRITE 99 00:19:1 0 EOF\n", (0, 0x19), 1), None);
    }
}
