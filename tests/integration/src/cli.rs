//! Helpers of the command-line tests (`tests/cli.rs`, `tests/generations.rs`,
//! `tests/hostile_input.rs`): the `ballast`
//! binary run as a real process in a test's own [`Workspace`] (configs, artifacts and the state
//! directory every command of the test uses: tests leave nothing in /var/lib/ballast), and
//! network namespaces ([`Netns`]) that detach whatever ballast pinned in them and delete
//! themselves when dropped, also when a test panics. Built on ballast-test-support.
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::Context as _;
use ballast_test_support::{ballast_binary, ip, run, NetNs, Output, TempDir};
use serde_json::Value;

/// A gateway MAC for tests whose forwarded frames go nowhere.
pub const SOME_GATEWAY_MAC: &str = "02:00:00:00:00:03";

/// The exit codes of `ballast` the tests check (README, "Exit codes"; `ballast::Error::exit_code`).
pub mod exit {
    pub const CONFIG: i32 = 3;
    pub const ARTIFACT: i32 = 4;
    pub const NOT_ATTACHED: i32 = 5;
    pub const ALREADY_ATTACHED: i32 = 6;
    pub const LOCK_HELD: i32 = 7;
}

/// A test's temporary directory `ballast-TAG-PID`: its files, and the state directory
/// `state/` (BALLAST_STATE_DIR) of every ballast command it runs. Removed when dropped.
pub struct Workspace {
    dir: TempDir,
    /// RLIMIT_AS of the commands it runs, if bounded ([`Workspace::with_address_space_limit`]).
    address_space: Option<u64>,
}

impl Workspace {
    /// `tag` must be unique among the tests of one test binary (they run in parallel threads).
    /// Fails the test at once, and clearly, when the `ballast` binary is not built.
    pub fn new(tag: &str) -> Workspace {
        ballast_binary().unwrap_or_else(|e| panic!("{e:#}"));
        Workspace { dir: TempDir::new(tag).unwrap_or_else(|e| panic!("{e:#}")), address_space: None }
    }

    /// Its ballast commands get at most `bytes` of address space (RLIMIT_AS): a binary that
    /// reads /dev/zero whole fails instead of taking the machine's memory.
    pub fn with_address_space_limit(mut self, bytes: u64) -> Workspace {
        self.address_space = Some(bytes);
        self
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The names of the entries of the directory (not `state/`), sorted.
    pub fn entries(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.dir();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = entry.with_context(|| format!("listing {}", dir.display()))?.file_name();
            names.push(name.to_string_lossy().into_owned());
        }
        names.retain(|n| n != "state");
        names.sort();
        Ok(names)
    }

    /// Writes the file `name`; its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        self.dir.write(name, contents).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `ballast args` with this workspace's state directory (and no test pause), not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let binary = ballast_binary().unwrap_or_else(|e| panic!("{e:#}"));
        let mut command = Command::new(binary);
        command.args(args).env("BALLAST_STATE_DIR", self.state_dir()).env_remove("BALLAST_TEST_PAUSE_AT");
        if let Some(bytes) = self.address_space {
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            // SAFETY: setrlimit only (async-signal-safe), between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        command
    }

    /// `ballast args`, run to its end; the caller judges the outcome. Panics only if it cannot
    /// be run or runs too long.
    pub fn ballast(&self, args: &[&str]) -> Output {
        run_to_end(&mut self.command(args))
    }

    /// `ballast build` of the config `toml` (written as `NAME.toml`) into `NAME.bal`, which must
    /// succeed and print the digest.
    pub fn build(&self, name: &str, toml: &str) -> Artifact {
        let config = self.write(&format!("{name}.toml"), toml);
        let path = self.path(&format!("{name}.bal"));
        let out = self.ballast(&["build", utf8(&config), "-o", utf8(&path)]).expect_success();
        let digest = out.stdout.trim().to_owned();
        assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64, "build printed no digest: {out}");
        Artifact { path, digest }
    }

    /// The artifacts kept in the state directory (file names).
    pub fn stored_generations(&self) -> BTreeSet<String> {
        let dir = self.state_dir().join("generations");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }
}

/// A built artifact: its file and the digest `ballast build` printed.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub path: PathBuf,
    pub digest: String,
}

impl Artifact {
    pub fn arg(&self) -> &str {
        utf8(&self.path)
    }
}

/// A path as a command argument (temporary paths are UTF-8).
pub fn utf8(path: &Path) -> &str {
    path.to_str().unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

fn run_to_end(command: &mut Command) -> Output {
    run(command).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A network namespace of one test, `bt-TAG<pid>`, with its loopback up. Dropping it detaches
/// every ballast generation and decapsulator pinned for it (through the CLI, with its
/// workspace's state directory), then deletes it.
pub struct Netns {
    /// Declared first: dropped (detached with the state directory) before the workspace goes.
    ns: NetNs,
    work: Arc<Workspace>,
    inode: u64,
    /// SO_NETNS_COOKIE: what ballast keys the namespace's pins and records by.
    cookie: u64,
}

impl Netns {
    /// A namespace with a workspace of its own. `tag` must be unique among the tests of the
    /// test binary (they run in parallel threads).
    pub fn create(tag: &str) -> Netns {
        Netns::create_in(tag, &Arc::new(Workspace::new(tag)))
    }

    /// A namespace whose ballast commands share `work` (its state directory) with others.
    pub fn create_in(tag: &str, work: &Arc<Workspace>) -> Netns {
        let name = format!("bt-{tag}{}", std::process::id());
        let ns = NetNs::create_for_ballast(name, &work.state_dir()).unwrap_or_else(|e| panic!("{e:#}"));
        let inode = std::fs::metadata(ns.path()).map(|m| m.ino()).unwrap_or_else(|e| panic!("{}: {e}", ns.name()));
        let cookie = ns.cookie().unwrap_or_else(|e| panic!("{e:#}"));
        Netns { ns, work: Arc::clone(work), inode, cookie }
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    pub fn work(&self) -> &Arc<Workspace> {
        &self.work
    }

    /// The namespace's inode, which the kernel may hand to the next namespace.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Deletes the namespace without detaching anything first (as an operator might);
    /// returns its inode and its pin root.
    pub fn delete_without_detaching(mut self) -> (u64, PathBuf) {
        self.ns.detach_ballast_on_drop(None);
        (self.inode, self.pin_root())
    }

    /// `ip -n NAME args`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        self.ns.ip(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A veth pair: `name` here, `peer_name` in `peer` (which may be this namespace), both up,
    /// each with its address (CIDR) when given.
    pub fn add_veth(
        &self,
        name: &str,
        address: Option<&str>,
        peer: &Netns,
        peer_name: &str,
        peer_address: Option<&str>,
    ) {
        self.ns.add_veth(name, &peer.ns, peer_name).unwrap_or_else(|e| panic!("{e:#}"));
        for (netns, iface, cidr) in [(self, name, address), (peer, peer_name, peer_address)] {
            if let Some(cidr) = cidr {
                netns.ip(&["addr", "add", cidr, "dev", iface]);
            }
        }
    }

    pub fn mac(&self, iface: &str) -> String {
        self.ns.mac(iface).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The id of the XDP program on `iface` as `ip link show` reports it.
    pub fn xdp_program_id(&self, iface: &str) -> Option<u32> {
        let link = self.ip(&["link", "show", iface]);
        let words: Vec<&str> = link.split_whitespace().collect();
        let at = words.windows(2).position(|w| w == ["prog/xdp", "id"])?;
        Some(words[at + 2].parse().unwrap_or_else(|_| panic!("bad program id in {link}")))
    }

    /// This namespace's pin directory: ballast pins IF's objects in `<this>/IF`.
    pub fn pin_root(&self) -> PathBuf {
        ballast_test_support::pin_root().join(format!("netns-{}", self.cookie))
    }

    /// The key of `iface` here (`netns-COOKIE/IF`, as ballast's pins.rs names it): its pin
    /// directory under the pin root, its record directory under the state directory's `ifaces/`.
    pub fn key(&self, iface: &str) -> String {
        format!("netns-{}/{iface}", self.cookie)
    }

    /// Runs `work` on a thread that has entered this namespace (sockets it opens stay in it).
    pub fn inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        self.ns.inside(work).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `ballast args --netns NAME` with the workspace's state directory, not yet run.
    pub fn ballast_command(&self, args: &[&str]) -> Command {
        let mut command = self.work.command(args);
        command.args(["--netns", self.name()]);
        command
    }

    /// `ballast args --netns NAME`; the caller judges the outcome.
    pub fn ballast(&self, args: &[&str]) -> Output {
        run_to_end(&mut self.ballast_command(args))
    }

    /// `ip netns exec NAME ballast args`: ballast in the private mount namespace that
    /// `ip netns exec` makes, where /sys has no bpffs.
    pub fn ballast_under_ip_netns_exec(&self, args: &[&str]) -> Output {
        let binary = ballast_binary().unwrap_or_else(|e| panic!("{e:#}"));
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name()]).arg(binary).args(args);
        run_to_end(command.env("BALLAST_STATE_DIR", self.work.state_dir()))
    }

    pub fn attach(&self, iface: &str, config: &Path, gateway_mac: &str) -> Output {
        self.ballast(&["attach", "--config", utf8(config), "--iface", iface, "--gateway-mac", gateway_mac])
    }

    /// `ballast status --json`, which must succeed, parsed.
    pub fn status(&self, iface: &str) -> RunningStatus {
        let output = self.ballast(&["status", "--iface", iface, "--json"]).expect_success();
        RunningStatus(output.json().unwrap_or_else(|e| panic!("status --json: {e:#}")))
    }

    /// `ballast decap status` as reason -> count.
    pub fn decap_counters(&self, iface: &str) -> BTreeMap<String, u64> {
        let output = self.ballast(&["decap", "status", "--iface", iface]).expect_success();
        output
            .stdout
            .lines()
            .map(|line| {
                let (reason, count) = line.split_once(char::is_whitespace).unwrap_or_else(|| panic!("{output}"));
                (reason.to_owned(), count.trim().parse().unwrap_or_else(|_| panic!("{output}")))
            })
            .collect()
    }
}

/// `ip args` in the host's namespace, which must succeed; its stdout.
pub fn host_ip(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every path under `dir`, relative to it, sorted: what `ls -R` shows.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            found.push(path.strip_prefix(dir).unwrap_or(&path).display().to_string());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `ballast status --json` of one interface.
pub struct RunningStatus(pub Value);

impl RunningStatus {
    pub fn program_id(&self) -> u32 {
        self.number(&self.0["program"]["id"]) as u32
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(self.0["pin_dir"].as_str().unwrap_or_else(|| panic!("no pin_dir in {}", self.0)))
    }

    pub fn vips(&self) -> &Vec<Value> {
        self.0["vips"].as_array().unwrap_or_else(|| panic!("no vips in {}", self.0))
    }

    pub fn vip(&self, name: &str) -> &Value {
        self.vips().iter().find(|v| v["vip"] == name).unwrap_or_else(|| panic!("no VIP {name} in {}", self.0))
    }

    /// The maps of the program whose role is `role` ("config", "constants", "state").
    pub fn maps_with_role(&self, role: &str) -> Vec<&Value> {
        let maps = self.0["maps"].as_array().unwrap_or_else(|| panic!("no maps in {}", self.0));
        maps.iter().filter(|m| m["role"] == role).collect()
    }

    pub fn reason(&self, reason: &str) -> u64 {
        self.number(&self.0["reasons"][reason])
    }

    pub fn number(&self, value: &Value) -> u64 {
        value.as_u64().unwrap_or_else(|| panic!("{value} is not a count in {}", self.0))
    }
}
