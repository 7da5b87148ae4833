//! Helpers of the command-line tests (`tests/cli.rs`): the `ballast` binary and commands run
//! with a deadline, network namespaces that detach whatever ballast pinned in them and delete
//! themselves when dropped (also when a test panics), and readers of what the CLI and `ip`
//! print. Every ballast command of a test uses the test's own state directory
//! (`BALLAST_STATE_DIR`), removed with it: tests leave nothing in /var/lib/ballast.
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any one command may take (an attach of the example config takes well under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Where ballast pins, as documented in lb-userspace/src/pins.rs.
pub const PIN_ROOT: &str = "/sys/fs/bpf/ballast";
/// A gateway MAC for tests whose forwarded frames go nowhere.
pub const SOME_GATEWAY_MAC: &str = "02:00:00:00:00:03";

/// The `ballast` binary of this build: `target/debug/ballast`, two directories above this test
/// executable (`target/debug/deps/cli-*`).
pub fn ballast_binary() -> PathBuf {
    let binary = expected_ballast_binary();
    assert!(binary.is_file(), "{} is missing: build it first: cargo build -p lb-userspace", binary.display());
    binary
}

fn expected_ballast_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let target_dir = exe.parent().and_then(Path::parent);
    target_dir.map(|dir| dir.join("ballast")).unwrap_or_else(|| panic!("no target directory above {}", exe.display()))
}

/// What a finished command did.
pub struct CommandOutput {
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Exited on its own with a non-zero code (a crash by signal is not a refusal).
    pub fn refused(&self) -> bool {
        self.status.code().is_some_and(|code| code != 0)
    }

    /// Panics, showing everything, unless the command succeeded.
    pub fn expect_success(self) -> CommandOutput {
        assert!(self.success(), "expected success: {self}");
        self
    }
}

impl fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout\n{}--- stderr\n{}",
            self.command_line, self.status, self.stdout, self.stderr
        )
    }
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _partial_output_is_still_shown = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `program args` with `envs` added to the environment, killing it after [`COMMAND_TIMEOUT`].
pub fn try_run(program: impl AsRef<OsStr>, args: &[&str], envs: &[(&str, &Path)]) -> io::Result<CommandOutput> {
    let command_line = format!("{} {}", program.as_ref().to_string_lossy(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _already_gone = child.kill();
            let _reaped = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{command_line}` ran longer than {COMMAND_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let joined = |handle: JoinHandle<String>| handle.join().unwrap_or_default();
    Ok(CommandOutput { command_line, status, stdout: joined(stdout), stderr: joined(stderr) })
}

pub fn run(program: impl AsRef<OsStr>, args: &[&str], envs: &[(&str, &Path)]) -> CommandOutput {
    let name = program.as_ref().to_string_lossy().into_owned();
    try_run(program, args, envs).unwrap_or_else(|err| panic!("running {name} {}: {err}", args.join(" ")))
}

/// `ip args`, which must succeed; its stdout.
pub fn ip(args: &[&str]) -> String {
    run("ip", args, &[]).expect_success().stdout
}

/// Polls `done` every 20 ms until it holds or `limit` passed; whether it held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file in the temporary directory, removed when dropped.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("ballast-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempFile { path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _already_gone = std::fs::remove_file(&self.path);
    }
}

/// A ballast state directory (records, stored generations, audit log) of one test, removed
/// when the last namespace using it is gone.
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    fn new(tag: &str) -> StateDir {
        let path = std::env::temp_dir().join(format!("ballast-cli-{}-{tag}-state", std::process::id()));
        let _not_left_over = std::fs::remove_dir_all(&path);
        StateDir { path }
    }

    fn env(&self) -> [(&'static str, &Path); 1] {
        [("BALLAST_STATE_DIR", self.path.as_path())]
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _never_created = std::fs::remove_dir_all(&self.path);
    }
}

/// A network namespace of one test, named `bt-TAG<pid>`. Dropping it detaches every ballast
/// generation and decapsulator pinned for it (through the CLI), then deletes it.
pub struct Netns {
    pub name: String,
    inode: u64,
    /// SO_NETNS_COOKIE: what ballast names the namespace's pin directory by.
    cookie: u64,
    state: Arc<StateDir>,
    detach_on_drop: bool,
}

impl Netns {
    /// `tag` must be unique among the tests of this file (tests run in parallel threads).
    pub fn create(tag: &str) -> Netns {
        Netns::create_with_state(tag, Arc::new(StateDir::new(tag)))
    }

    /// A namespace whose ballast commands share `state` with other namespaces.
    pub fn create_with_state(tag: &str, state: Arc<StateDir>) -> Netns {
        ballast_binary(); // a missing binary fails the test before anything is created
        let name = format!("bt-{tag}{}", std::process::id());
        remove_namespace(&name, &state); // left by an earlier run that had this process id and was killed
        ip(&["netns", "add", &name]);
        let inode = namespace_inode(&name).unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        let cookie = namespace_cookie(&name).unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        let netns = Netns { name, inode, cookie, state, detach_on_drop: true };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn state(&self) -> Arc<StateDir> {
        Arc::clone(&self.state)
    }

    /// Deletes the namespace without detaching anything first (as an operator might);
    /// returns its inode (which the kernel may hand to the next namespace) and its pin root.
    pub fn delete_without_detaching(mut self) -> (u64, PathBuf) {
        self.detach_on_drop = false;
        (self.inode, self.pin_root())
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// `ip -n NAME args`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
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
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name]);
        for (netns, iface, cidr) in [(self, name, address), (peer, peer_name, peer_address)] {
            if let Some(cidr) = cidr {
                netns.ip(&["addr", "add", cidr, "dev", iface]);
            }
            netns.ip(&["link", "set", iface, "up"]);
        }
    }

    pub fn mac(&self, iface: &str) -> String {
        let link = self.ip(&["-o", "link", "show", iface]);
        let words: Vec<&str> = link.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "link/ether").unwrap_or_else(|| panic!("no MAC in {link}"));
        words[at + 1].to_owned()
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
        pin_root_of(self.cookie)
    }

    /// Runs `work` on a thread that has entered this namespace (sockets it opens stay in it).
    pub fn inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                enter_namespace(&self.name);
                work()
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `ballast args --netns NAME`; the caller judges the outcome.
    pub fn ballast(&self, args: &[&str]) -> CommandOutput {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--netns", &self.name]);
        run(ballast_binary(), &full, &self.state.env())
    }

    /// `ip netns exec NAME ballast args`: ballast in the private mount namespace that
    /// `ip netns exec` makes, where /sys has no bpffs.
    pub fn ballast_under_ip_netns_exec(&self, args: &[&str]) -> CommandOutput {
        let binary = ballast_binary();
        let mut full = vec!["netns", "exec", self.name.as_str(), binary.to_str().expect("UTF-8 path")];
        full.extend_from_slice(args);
        run("ip", &full, &self.state.env())
    }

    pub fn attach(&self, iface: &str, config: &TempFile, gateway_mac: &str) -> CommandOutput {
        self.ballast(&["attach", "--config", config.arg(), "--iface", iface, "--gateway-mac", gateway_mac])
    }

    /// `ballast status --json`, which must succeed, parsed.
    pub fn status(&self, iface: &str) -> RunningStatus {
        let output = self.ballast(&["status", "--iface", iface, "--json"]).expect_success();
        RunningStatus(serde_json::from_str(&output.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{output}")))
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

impl Drop for Netns {
    fn drop(&mut self) {
        if self.detach_on_drop {
            remove_namespace(&self.name, &self.state);
        } else if let Err(err) = try_run("ip", &["netns", "del", &self.name], &[]) {
            eprintln!("warning: deleting network namespace {}: {err}", self.name);
        }
    }
}

/// Removes a pin directory of a deleted namespace, if it is still there, when dropped.
pub struct StalePins(pub PathBuf);

impl Drop for StalePins {
    fn drop(&mut self) {
        let _already_gone = std::fs::remove_dir_all(&self.0);
    }
}

/// The pin directory ballast uses for the namespace with this cookie.
pub fn pin_root_of(cookie: u64) -> PathBuf {
    Path::new(PIN_ROOT).join(format!("netns-{cookie}"))
}

/// SO_NETNS_COOKIE of the named namespace (what ballast keys its pins by: never reused).
fn namespace_cookie(name: &str) -> io::Result<u64> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_namespace(name);
                ballast::netns::namespace_cookie().map_err(|e| io::Error::other(format!("{e:#}")))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace cookie thread panicked")))
    })
}

fn namespace_inode(name: &str) -> io::Result<u64> {
    Ok(std::fs::metadata(Path::new(NETNS_DIR).join(name))?.ino())
}

/// Detaches what ballast pinned for the namespace (a generation where a `link` pin is, a
/// decapsulator where a `decap-link` pin is), deletes it. Never panics (runs in Drop).
fn remove_namespace(name: &str, state: &StateDir) {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return;
    }
    let Ok(cookie) = namespace_cookie(name) else { return };
    let pin_root = pin_root_of(cookie);
    for iface in directory_names(&pin_root) {
        for (pin, detach) in [("link", &["detach"][..]), ("decap-link", &["decap", "detach"][..])] {
            if pin_root.join(&iface).join(pin).exists() {
                let mut args = detach.to_vec();
                args.extend_from_slice(&["--iface", &iface, "--netns", name]);
                // Not ballast_binary(): a panic here, while a failed test unwinds, would abort.
                let _reported_below = try_run(expected_ballast_binary(), &args, &state.env());
            }
        }
    }
    if pin_root.exists() {
        eprintln!("warning: ballast left {} behind after detaching; removing it", pin_root.display());
        let _best_effort = std::fs::remove_dir_all(&pin_root);
    }
    if let Err(err) = try_run("ip", &["netns", "del", name], &[]) {
        eprintln!("warning: deleting network namespace {name}: {err}");
    }
}

fn directory_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

fn enter_namespace(name: &str) {
    let path = Path::new(NETNS_DIR).join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: setns on a namespace fd held open; it moves only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("entering network namespace {name}: {}", io::Error::last_os_error());
    }
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
pub struct RunningStatus(pub serde_json::Value);

impl RunningStatus {
    pub fn program_id(&self) -> u32 {
        self.number(&self.0["program"]["id"]) as u32
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(self.0["pin_dir"].as_str().unwrap_or_else(|| panic!("no pin_dir in {}", self.0)))
    }

    pub fn vips(&self) -> &Vec<serde_json::Value> {
        self.0["vips"].as_array().unwrap_or_else(|| panic!("no vips in {}", self.0))
    }

    pub fn vip(&self, name: &str) -> &serde_json::Value {
        self.vips().iter().find(|v| v["vip"] == name).unwrap_or_else(|| panic!("no VIP {name} in {}", self.0))
    }

    /// The maps of the program whose role is `role` ("config", "constants", "state").
    pub fn maps_with_role(&self, role: &str) -> Vec<&serde_json::Value> {
        let maps = self.0["maps"].as_array().unwrap_or_else(|| panic!("no maps in {}", self.0));
        maps.iter().filter(|m| m["role"] == role).collect()
    }

    pub fn reason(&self, reason: &str) -> u64 {
        self.number(&self.0["reasons"][reason])
    }

    pub fn number(&self, value: &serde_json::Value) -> u64 {
        value.as_u64().unwrap_or_else(|| panic!("{value} is not a count in {}", self.0))
    }
}
