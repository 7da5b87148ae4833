//! The one network namespace guard of tests, lab and bench.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Context as _};

use crate::command::{ip, run};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (`ip netns add NAME`, loopback up), deleted when dropped, also
/// while a failed test unwinds. Traffic of tests goes only to namespaces made this way.
///
/// By default dropping it only deletes it. [`NetNs::detach_ballast_on_drop`] makes it first
/// detach, through the `ballast` CLI, every generation and decapsulator ballast pinned for it,
/// and remove what ballast left in its pin directory; [`NetNs::keep`] leaves it in place.
pub struct NetNs {
    name: String,
    /// Detach ballast's pins first, running it with this BALLAST_STATE_DIR.
    ballast_state: Option<PathBuf>,
}

impl NetNs {
    /// Creates namespace `name` (deleting one of that name first: left by a killed run) with
    /// its loopback up. Names must be unique among concurrent tests and runs: put the process
    /// id in them.
    pub fn create(name: impl Into<String>) -> anyhow::Result<NetNs> {
        NetNs::create_with(name.into(), None)
    }

    /// [`NetNs::create`] followed by [`NetNs::detach_ballast_on_drop`]; a namespace of that
    /// name left by a killed run is detached the same way before it is deleted.
    pub fn create_for_ballast(name: impl Into<String>, state_dir: &Path) -> anyhow::Result<NetNs> {
        NetNs::create_with(name.into(), Some(state_dir.to_owned()))
    }

    fn create_with(name: String, ballast_state: Option<PathBuf>) -> anyhow::Result<NetNs> {
        if namespace_path(&name).exists() {
            remove_namespace(&name, ballast_state.as_deref())?;
        }
        ip(&["netns", "add", &name])?;
        // From here on, dropping the guard deletes the namespace.
        let netns = NetNs { name, ballast_state };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        namespace_path(&self.name)
    }

    /// Before deleting the namespace, the guard runs `ballast detach` / `ballast decap detach
    /// --iface IF --netns NAME` (with `BALLAST_STATE_DIR=state_dir`) for every interface with a
    /// pinned link, then removes ballast's pin directory of the namespace if anything is left.
    /// `None`: delete only (pins stay behind, as when an operator deletes it).
    pub fn detach_ballast_on_drop(&mut self, state_dir: Option<&Path>) {
        self.ballast_state = state_dir.map(Path::to_owned);
    }

    /// Leaves the namespace in place when the guard goes (it outlives the process); its name.
    pub fn keep(self) -> String {
        let name = self.name.clone();
        std::mem::forget(self);
        name
    }

    /// `ip -n NAME args`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        ip(&[&["-n", self.name.as_str()], args].concat())
    }

    /// A veth pair, `name` here and `peer_name` in `peer` (which may be this namespace), both up.
    pub fn add_veth(&self, name: &str, peer: &NetNs, peer_name: &str) -> anyhow::Result<()> {
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name])?;
        self.ip(&["link", "set", name, "up"])?;
        peer.ip(&["link", "set", peer_name, "up"])?;
        Ok(())
    }

    /// The MAC address of `iface` here, as `ip` prints it (`02:00:00:00:00:01`).
    pub fn mac(&self, iface: &str) -> anyhow::Result<String> {
        let link = self.ip(&["-o", "link", "show", iface])?;
        let mut words = link.split_whitespace().skip_while(|w| *w != "link/ether").skip(1);
        words.next().map(str::to_owned).ok_or_else(|| anyhow!("no MAC address in `{}`", link.trim()))
    }

    /// Moves the calling thread into this namespace (its new sockets stay in it).
    pub fn enter(&self) -> anyhow::Result<()> {
        Ok(ballast::kernel::netns::enter(&self.name)?)
    }

    /// Runs `work` on a thread that has entered this namespace; its result. Err only when the
    /// thread cannot enter; a panic in `work` goes on in the caller.
    pub fn inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        inside(&self.name, work)
    }

    /// SO_NETNS_COOKIE of the namespace: what ballast keys its pins and records by (never
    /// reused, unlike the inode).
    pub fn cookie(&self) -> anyhow::Result<u64> {
        cookie(&self.name)
    }

    /// Ballast's pin directory for this namespace: `PIN_ROOT/netns-COOKIE` (interface IF's
    /// pins are in `IF/` below it).
    pub fn pin_root(&self) -> anyhow::Result<PathBuf> {
        Ok(pin_root_of(self.cookie()?))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = remove_namespace(&self.name, self.ballast_state.as_deref()) {
            eprintln!("warning: removing network namespace {}: {err:#}", self.name);
        }
    }
}

/// Deletes namespace `name` if it exists. With `ballast_state`, first detaches what ballast
/// pinned for it and removes its leftover pins ([`NetNs::detach_ballast_on_drop`]). Never
/// panics (it runs while failed tests unwind); failures to detach are printed, not returned.
pub fn remove_namespace(name: &str, ballast_state: Option<&Path>) -> anyhow::Result<()> {
    if !namespace_path(name).exists() {
        return Ok(());
    }
    if let Some(state_dir) = ballast_state {
        detach_ballast(name, state_dir);
    }
    ip(&["netns", "del", name]).map(drop)
}

/// Deletes the namespaces `PREFIX<PID>` whose process is gone: what a killed run left.
pub fn remove_stale_namespaces(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            if let Err(err) = remove_namespace(&name, None) {
                eprintln!("warning: removing stale network namespace {name}: {err:#}");
            }
        }
    }
}

fn namespace_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn pin_root_of(cookie: u64) -> PathBuf {
    crate::pin_root().join(format!("netns-{cookie}"))
}

fn inside<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| -> anyhow::Result<T> {
            ballast::kernel::netns::enter(name)?;
            Ok(work())
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn cookie(name: &str) -> anyhow::Result<u64> {
    inside(name, ballast::kernel::netns::namespace_cookie)?
        .with_context(|| format!("the cookie of network namespace {name}"))
}

/// Detaches every generation (`link` pin) and decapsulator (`decap-link` pin) ballast pinned
/// in namespace `name`, then removes what is left of its pin directory. Prints, never fails.
fn detach_ballast(name: &str, state_dir: &Path) {
    let pin_root = match cookie(name) {
        Ok(cookie) => pin_root_of(cookie),
        Err(err) => return eprintln!("warning: not detaching ballast in {name}: {err:#}"),
    };
    let ifaces: Vec<String> = std::fs::read_dir(&pin_root)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let binary = crate::ballast_binary();
    for iface in &ifaces {
        for (pin, detach) in [("link", &["detach"][..]), ("decap-link", &["decap", "detach"][..])] {
            if !pin_root.join(iface).join(pin).exists() {
                continue;
            }
            let Ok(binary) = &binary else { continue };
            let mut command = Command::new(binary);
            command.args(detach).args(["--iface", iface, "--netns", name]).env("BALLAST_STATE_DIR", state_dir);
            match run(command.env_remove("BALLAST_TEST_PAUSE_AT")) {
                Ok(output) if output.success() => {}
                Ok(output) => eprintln!("warning: {output}"),
                Err(err) => eprintln!("warning: {err:#}"),
            }
        }
    }
    if pin_root.exists() {
        eprintln!("warning: ballast left {} behind after detaching; removing it", pin_root.display());
        let _best_effort = std::fs::remove_dir_all(&pin_root);
    }
}
