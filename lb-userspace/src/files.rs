//! Files ballast reads and writes on the user's behalf, defensively.
//!
//! Writes are whole or not at all ([`write_atomically`]): a temporary file with a unique name
//! in the target's own directory, created 0600 (artifacts and records carry the fleet's
//! `hash_seed`), written, fsynced, renamed over the target, the directory fsynced. Only
//! regular files are ever replaced: a target that is a device (`/dev/null`), a FIFO, a socket
//! or a directory is refused before anything is touched, and a symlink is followed to the
//! file it names (so `-o /dev/stdout` is refused too). A failed write removes its temporary
//! file.
//!
//! Reads ([`read_regular`]) take regular files only (symlinks to them are fine), of at most a
//! stated size: the file is opened with `O_NONBLOCK` (a FIFO cannot block the open) and judged
//! with `fstat` on the open descriptor (no race with a rename) before a byte is read, and
//! never more than the cap plus one byte is read (`/dev/zero` or a growing file cannot
//! exhaust memory).
use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read as _, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Context as _;
use crate::{Error, Result};

/// Mode of every file ballast creates in its state directory and of the artifacts it writes.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of the state directory's directories.
pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;

/// What kind of file `meta` describes, in words, when it is not a regular file.
fn not_regular(meta: &std::fs::Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Where a write to `path` lands: `path` itself, or the file a symlink at `path` names
/// (resolved, so that the temporary file is made beside the real target). Err if the target
/// exists and is not a regular file.
pub(crate) fn write_target(path: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => Err(e).with_context(|| format!("examining {}", path.display())),
        Ok(meta) if meta.file_type().is_symlink() => match std::fs::metadata(path) {
            Ok(target) => match not_regular(&target) {
                Some(kind) => Err(refused_target(path, kind)),
                None => {
                    std::fs::canonicalize(path).with_context(|| format!("resolving the symlink {}", path.display()))
                }
            },
            // A dangling symlink: refuse rather than create a file wherever it points.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(refused_target(path, "a dangling symlink")),
            Err(e) => Err(e).with_context(|| format!("examining {}", path.display())),
        },
        Ok(meta) => match not_regular(&meta) {
            Some(kind) => Err(refused_target(path, kind)),
            None => Ok(path.to_path_buf()),
        },
    }
}

fn refused_target(path: &Path, kind: &str) -> Error {
    Error::Other(format!(
        "{} is {kind}; ballast writes only regular files and would replace it: nothing was written",
        path.display()
    ))
}

/// A temporary name in `target`'s directory no other writer uses: `.NAME.PID.N.tmp`.
fn temporary_name(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut name = OsString::from(".");
    name.push(target.file_name().unwrap_or_else(|| std::ffi::OsStr::new("ballast")));
    name.push(format!(".{}.{n}.{nanos:08x}.tmp", std::process::id()));
    target.with_file_name(name)
}

/// Writes `bytes` to `path` whole or not at all, as a 0600 regular file (module docs).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let target = write_target(path)?;
    if target.file_name().is_none() {
        return Err(Error::Other(format!("{} names no file", path.display())));
    }
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tmp, mut file) = create_temporary(&target)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
        });
    if let Err(error) = written {
        let _already_gone = std::fs::remove_file(&tmp);
        return Err(error);
    }
    // The rename is durable once the directory is: best effort (some filesystems refuse).
    if let Ok(dir) = File::open(&dir) {
        let _best_effort = dir.sync_all();
    }
    Ok(())
}

/// Creates the temporary file (O_EXCL, 0600), retrying a few names on a clash.
fn create_temporary(target: &Path) -> Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let tmp = temporary_name(target);
        match OpenOptions::new().write(true).create_new(true).mode(PRIVATE_FILE_MODE).open(&tmp) {
            Ok(file) => {
                // The umask cannot widen 0600, but may narrow it; say it exactly.
                let _ = file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE));
                return Ok((tmp, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("creating a temporary file beside {} ({})", target.display(), tmp.display())
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
        .with_context(|| format!("creating a temporary file beside {}", target.display()))
}

/// Reads the regular file at `path` (a symlink to one is fine), of at most `cap` bytes;
/// `what` names it in errors ("config", "artifact", ...). A FIFO, a device, a directory or a
/// file over the cap is refused without blocking and without reading it.
pub(crate) fn read_regular(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let (file, meta) = open_regular(path, what)?;
    if meta.len() > cap {
        return Err(too_large(path, what, meta.len(), cap));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes).with_context(|| format!("reading {what} {}", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(too_large(path, what, bytes.len() as u64, cap));
    }
    Ok(bytes)
}

/// Opens the regular file at `path` for reading, without blocking on a FIFO or a device:
/// anything but a regular file (or a symlink to one) is refused before a byte is read.
pub(crate) fn open_regular(path: &Path, what: &str) -> Result<(File, std::fs::Metadata)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("examining {what} {}", path.display()))?;
    if let Some(kind) = not_regular(&meta) {
        return Err(Error::Other(format!("{what} {} is {kind}, not a regular file; nothing was read", path.display())));
    }
    Ok((file, meta))
}

/// [`read_regular`], with None for a file that does not exist.
pub(crate) fn read_regular_if_exists(path: &Path, cap: u64, what: &str) -> Result<Option<Vec<u8>>> {
    match read_regular(path, cap, what) {
        Err(e) if is_not_found(&e) => Ok(None),
        other => other.map(Some),
    }
}

/// Whether `error` is, under its context, "no such file or directory".
pub(crate) fn is_not_found(error: &Error) -> bool {
    matches!(error.root(), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

fn too_large(path: &Path, what: &str, len: u64, cap: u64) -> Error {
    Error::Other(format!(
        "{what} {} is larger than {} ({len} bytes or more); refused without reading it",
        path.display(),
        human_size(cap)
    ))
}

/// `16 MiB`, `512 KiB`, `100 bytes`.
pub(crate) fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Creates `dir` (and its parents) if needed, and makes it 0700 (tightening an existing one):
/// the directories of the state directory, which hold the fleet's `hash_seed`.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    tighten(dir, PRIVATE_DIR_MODE)
}

/// Removes group and other permissions from `path` beyond `mode` (leaves a stricter mode be).
pub(crate) fn tighten(path: &Path, mode: u32) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("examining {}", path.display()))?;
    let current = meta.permissions().mode() & 0o7777;
    if current & !mode & 0o077 != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(current & mode))
            .with_context(|| format!("restricting {} to mode {mode:o}", path.display()))?;
    }
    Ok(())
}

/// `a` and `b` name the same file: the same path once symlinks are resolved, or the same
/// inode (hard links). False when either does not exist.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x.as_os_str().as_bytes() == y.as_os_str().as_bytes(),
            _ => false,
        },
    }
}

/// A scratch directory for unit tests: made empty, removed when dropped.
#[cfg(test)]
pub(crate) struct Scratch(pub(crate) PathBuf);

#[cfg(test)]
impl Scratch {
    pub(crate) fn new(tag: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("ballast-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Scratch(path)
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("ballast-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::set_permissions(&self.0, Permissions::from_mode(0o755));
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_a_private_regular_file_and_leaves_nothing_else() {
        let dir = Dir::new("write");
        let target = dir.0.join("out.bal");
        write_atomically(&target, b"one").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"one");
        assert_eq!(mode(&target), 0o600);
        // Replacing an existing, world-readable file tightens it.
        std::fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        write_atomically(&target, b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert_eq!(mode(&target), 0o600);
        assert_eq!(dir.entries(), ["out.bal"]);
    }

    #[test]
    fn refuses_non_regular_targets_and_touches_nothing() {
        let dir = Dir::new("special");
        let sub = dir.0.join("a-directory");
        std::fs::create_dir(&sub).unwrap();
        let fifo = dir.0.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let to_null = dir.0.join("to-null");
        std::os::unix::fs::symlink("/dev/null", &to_null).unwrap();
        let dangling = dir.0.join("dangling");
        std::os::unix::fs::symlink(dir.0.join("nowhere"), &dangling).unwrap();
        let before = dir.entries();
        for (path, kind) in [
            (Path::new("/dev/null"), "character device"),
            (sub.as_path(), "directory"),
            (fifo.as_path(), "FIFO"),
            (to_null.as_path(), "character device"),
            (dangling.as_path(), "dangling symlink"),
        ] {
            let err = write_atomically(path, b"x").expect_err("refused").to_string();
            assert!(err.contains(kind) && err.contains(&path.display().to_string()), "{err}");
        }
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        assert!(std::fs::symlink_metadata(&to_null).unwrap().file_type().is_symlink());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(dir.entries(), before, "nothing created or removed");
    }

    #[test]
    fn a_symlink_to_a_regular_file_writes_the_file() {
        let dir = Dir::new("symlink");
        let real = dir.0.join("real.bal");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.0.join("link.bal");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        assert_eq!(dir.entries(), ["link.bal", "real.bal"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        if unsafe { libc::geteuid() } == 0 {
            // Root ignores directory permissions; the read-only case is covered by the
            // target-is-a-directory-being-renamed-over case below.
        } else {
            let dir = Dir::new("readonly");
            std::fs::set_permissions(&dir.0, Permissions::from_mode(0o500)).unwrap();
            assert!(write_atomically(&dir.0.join("out"), b"x").is_err());
            std::fs::set_permissions(&dir.0, Permissions::from_mode(0o700)).unwrap();
            assert!(dir.entries().is_empty());
        }
        // The target's directory does not exist: nothing is created anywhere.
        let dir = Dir::new("missing-parent");
        let err = write_atomically(&dir.0.join("no/such/dir/out"), b"x").unwrap_err().to_string();
        assert!(err.contains("no/such/dir"), "{err}");
        assert!(dir.entries().is_empty());
    }

    #[test]
    fn temporary_names_are_unique_and_beside_the_target() {
        let target = Path::new("/some/dir/out.bal");
        let a = temporary_name(target);
        let b = temporary_name(target);
        assert_ne!(a, b);
        assert_eq!(a.parent(), target.parent());
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".out.bal."));
    }

    #[test]
    fn reads_regular_files_only_within_the_cap() {
        let dir = Dir::new("read");
        let file = dir.0.join("lb.toml");
        std::fs::write(&file, b"hash_seed = 1\n").unwrap();
        assert_eq!(read_regular(&file, 100, "config").unwrap(), b"hash_seed = 1\n");
        let link = dir.0.join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_regular(&link, 100, "config").unwrap(), b"hash_seed = 1\n");
        let err = read_regular(&file, 4, "config").unwrap_err().to_string();
        assert!(err.contains("larger than 4 bytes") && err.contains("lb.toml"), "{err}");

        let fifo = dir.0.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        for (path, kind) in
            [(fifo.as_path(), "FIFO"), (Path::new("/dev/zero"), "character device"), (dir.0.as_path(), "directory")]
        {
            let err = read_regular(path, 1 << 20, "config").unwrap_err().to_string();
            assert!(err.contains(kind) && err.contains(&path.display().to_string()), "{err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "a FIFO blocked the read");
        assert!(is_not_found(&read_regular(&dir.0.join("missing"), 1, "config").unwrap_err()));
        assert_eq!(read_regular_if_exists(&dir.0.join("missing"), 1, "config").unwrap(), None);
    }

    #[test]
    fn private_dirs_are_0700_and_existing_ones_tightened() {
        let dir = Dir::new("private");
        let sub = dir.0.join("a/b");
        private_dir(&sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
        std::fs::set_permissions(&sub, Permissions::from_mode(0o755)).unwrap();
        private_dir(&sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
    }

    #[test]
    fn same_file_sees_through_symlinks_and_hard_links() {
        let dir = Dir::new("same");
        let a = dir.0.join("a.toml");
        std::fs::write(&a, b"x").unwrap();
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let hard = dir.0.join("hard");
        std::fs::hard_link(&a, &hard).unwrap();
        let dotted = dir.0.join(".").join("a.toml");
        for other in [&a, &link, &hard, &dotted] {
            assert!(same_file(&a, other), "{}", other.display());
        }
        assert!(!same_file(&a, &dir.0.join("missing")));
        std::fs::write(dir.0.join("b"), b"x").unwrap();
        assert!(!same_file(&a, &dir.0.join("b")));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(512 << 10), "512 KiB");
        assert_eq!(human_size(100), "100 bytes");
    }
}
