//! Hostile input must not hurt the host, and messages an operator can act on (issue T): the
//! `ballast` binary run as a real process on files, devices, FIFOs, closed pipes and configs
//! built to hurt it. Each test names what it guards against; every one of them failed on the
//! release before these fixes (checked with `BALLAST_BIN=<old ballast>`). The kernel tests
//! (`require_root`) work in network namespaces of their own.

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ballast_test_support::{require_root, NetNs, Output, DEFAULT_TIMEOUT};
use ballast_tests::cli::{utf8, Workspace};

/// A valid one-VIP config.
const GOOD: &str = "hash_seed = 1\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\
                    backends = [{ address = \"10.1.0.1\" }, { address = \"10.1.0.2\" }]\n";
/// The same VIP with a third backend.
const GOOD_B: &str = "hash_seed = 1\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\
                      backends = [{ address = \"10.1.0.1\" }, { address = \"10.1.0.2\" }, { address = \"10.1.0.3\" }]\n";
const GATEWAY_MAC: &str = "02:00:00:00:00:03";
/// What a command that must not hang is given (as every `Workspace::ballast`).
const LIMIT: Duration = DEFAULT_TIMEOUT;
/// The address space the commands get: a binary that reads /dev/zero whole fails here instead
/// of taking the machine's memory.
const ADDRESS_SPACE: u64 = 1 << 30;

/// A test's workspace `ballast-hostile-TAG-PID`, its commands bounded.
fn workspace(tag: &str) -> Workspace {
    Workspace::new(&format!("hostile-{tag}")).with_address_space_limit(ADDRESS_SPACE)
}

fn mkfifo(path: &Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(utf8(path)).with_context(|| format!("{} as a C string", path.display()))?;
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    Ok(())
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| format!("reading the metadata of {}", path.display()))?.mode() & 0o7777)
}

fn assert_refused(out: &Output, mentions: &[&str]) {
    assert!(out.refused(), "expected a refusal: {out}");
    assert!(!out.stderr.contains("panicked"), "a panic: {out}");
    for m in mentions {
        assert!(out.stderr.contains(m), "the message lacks {m:?}: {out}");
    }
}

/// `command` with its stdout a pipe whose reader has already gone: its exit status and stderr.
fn with_closed_stdout(mut command: Command) -> anyhow::Result<(ExitStatus, String)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are ours, once each.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let stderr_file = tempfile_path("stderr");
    let stderr = std::fs::File::create(&stderr_file).with_context(|| format!("creating {}", stderr_file.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(stderr))
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {command:?}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} ran longer than {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_file);
    Ok((status, text))
}

fn tempfile_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("ballast-hostile-{tag}-{}-{n}", std::process::id()))
}

// ---- ballast build -o: only regular files, never the input ----------------------------

#[test]
fn build_never_writes_over_its_own_config() -> anyhow::Result<()> {
    let work = workspace("build-input");
    let config = work.write("lb.toml", GOOD);
    std::os::unix::fs::symlink(&config, work.path("link.toml")).unwrap();
    std::fs::hard_link(&config, work.path("hard.toml")).unwrap();
    let dotted = work.dir().join(".").join("lb.toml");
    for output in [config.clone(), dotted, work.path("link.toml"), work.path("hard.toml")] {
        let out = work.ballast(&["build", utf8(&config), "-o", utf8(&output)]);
        assert_refused(&out, &["config itself"]);
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            GOOD,
            "-o {}: the config was destroyed",
            output.display()
        );
    }
    assert!(std::fs::symlink_metadata(work.path("link.toml")).unwrap().file_type().is_symlink());
    assert_eq!(work.entries()?, ["hard.toml", "lb.toml", "link.toml"], "nothing else was written");
    Ok(())
}

#[test]
fn build_never_replaces_what_is_not_a_regular_file() -> anyhow::Result<()> {
    let work = workspace("build-special");
    let config = work.write("lb.toml", GOOD);
    let fifo = work.path("fifo");
    mkfifo(&fifo)?;
    let dir = work.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    // A symlink to /dev/null: the old binary replaced the link (not /dev/null) with a file.
    let to_null = work.path("to-null");
    std::os::unix::fs::symlink("/dev/null", &to_null).unwrap();
    let mut cases = vec![(fifo.clone(), "FIFO"), (dir.clone(), "directory"), (to_null.clone(), "character device")];
    // A character device of the test's own (what /dev/null is), where root may make one.
    let device = work.path("null-device");
    let c = std::ffi::CString::new(utf8(&device)).unwrap();
    // SAFETY: a NUL-terminated path; makedev(1, 3) is /dev/null's.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0 {
        cases.push((device.clone(), "character device"));
    }
    let before = work.entries()?;
    for (output, kind) in &cases {
        let out = work.ballast(&["build", utf8(&config), "-o", utf8(output)]);
        assert_refused(&out, &[kind, "nothing was written"]);
    }
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(&dir).unwrap().is_dir());
    assert!(std::fs::symlink_metadata(&to_null).unwrap().file_type().is_symlink());
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    assert_eq!(work.entries()?, before, "no file (temporary or not) was left");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // Through a symlink to a regular file: the file it names is written.
    let real = work.write("real.bal", "old");
    std::os::unix::fs::symlink(&real, work.path("out-link.bal")).unwrap();
    work.ballast(&["build", utf8(&config), "-o", utf8(&work.path("out-link.bal"))]).expect_success();
    assert!(std::fs::read(&real).unwrap().starts_with(b"BALLAST\0"));
    assert!(std::fs::symlink_metadata(work.path("out-link.bal")).unwrap().file_type().is_symlink());
    Ok(())
}

#[test]
fn artifacts_are_written_0600() -> anyhow::Result<()> {
    let work = workspace("build-mode");
    let config = work.write("lb.toml", GOOD);
    let output = work.path("gen.bal");
    work.ballast(&["build", utf8(&config), "-o", utf8(&output)]).expect_success();
    assert_eq!(mode(&output)?, 0o600, "the artifact carries hash_seed");
    // An existing world-readable one is tightened when rewritten.
    std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o644)).unwrap();
    work.ballast(&["build", utf8(&config), "-o", utf8(&output)]).expect_success();
    assert_eq!(mode(&output)?, 0o600);
    assert_eq!(work.entries()?, ["gen.bal", "lb.toml"]);
    Ok(())
}

/// A tmpfs mount of a few KiB, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf) -> anyhow::Result<Option<SmallDisk>> {
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0755", "ballast-test", utf8(&path)])
            .status()
            .is_ok_and(|s| s.success());
        Ok(ok.then_some(SmallDisk { path }))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn a_write_that_fails_midway_leaves_no_temporary_file() -> anyhow::Result<()> {
    if !require_root("a_write_that_fails_midway_leaves_no_temporary_file") {
        return Ok(());
    }
    let work = workspace("full-disk");
    let config = work.write("lb.toml", GOOD);
    let disk = SmallDisk::mount(work.path("disk"))?.expect("mounting a tmpfs");
    let out = work.ballast(&["build", utf8(&config), "-o", utf8(&disk.path.join("gen.bal"))]);
    let left: Vec<_> = std::fs::read_dir(&disk.path).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the failed write left {left:?}: {out}");
    assert_refused(&out, &["gen.bal"]);
    Ok(())
}

// ---- Builders bounded; reads of regular files only -------------------------------------

/// `hash_seed = 1` and five IPv6 VIPs `2001:db8::k:0:k` on one port: their address words XOR
/// to the same value, and the old VIP index, which folded the address before the seed, put
/// them on one home slot under every seed and doubled its table forever.
fn colliding_vips() -> String {
    let mut text = String::from("hash_seed = 1\n");
    for k in 1..=5 {
        text.push_str(&format!(
            "[[vip]]\naddress = \"2001:db8::{k}:0:{k}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{{ address = \"2001:db8:1::1\" }}]\n"
        ));
    }
    text
}

#[test]
fn vips_whose_addresses_fold_alike_build_at_once() -> anyhow::Result<()> {
    let work = workspace("fold");
    let config = work.write("lb.toml", colliding_vips());
    let started = Instant::now();
    let out = work.ballast(&["check", "--config", utf8(&config)]).expect_success();
    assert!(out.stdout.contains("5 VIPs"), "{out}");
    work.ballast(&["build", utf8(&config), "-o", utf8(&work.path("gen.bal"))]).expect_success();
    work.ballast(&["inspect", utf8(&work.path("gen.bal"))]).expect_success();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn config_reads_take_regular_files_only_and_never_block() -> anyhow::Result<()> {
    let work = workspace("reads");
    let fifo = work.path("lb.fifo");
    mkfifo(&fifo)?;
    let large = work.path("large.toml");
    std::fs::File::create(&large).unwrap().set_len((16 << 20) + 1).unwrap();
    let dir = work.path("conf.d");
    std::fs::create_dir(&dir).unwrap();
    let out_path = work.path("out.bal");
    for (input, kind) in [
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/zero"), "character device"),
        (dir.as_path(), "directory"),
        (large.as_path(), "larger than"),
    ] {
        let started = Instant::now();
        for args in [
            vec!["check", "--config", utf8(input)],
            vec!["build", utf8(input), "-o", utf8(&out_path)],
            vec!["inspect", utf8(input)],
        ] {
            let out = work.ballast(&args);
            assert_refused(&out, &[kind, utf8(input)]);
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{}: took {:?}", input.display(), started.elapsed());
    }
    assert!(!out_path.exists());
    Ok(())
}

// ---- A closed stdout is not a failure ----------------------------------------------------

#[test]
fn a_closed_stdout_does_not_fail_a_command_that_succeeded() -> anyhow::Result<()> {
    let work = workspace("epipe");
    let config = work.write("lb.toml", GOOD);
    // Entries of interface eth9 as an earlier ballast wrote them.
    std::fs::create_dir_all(work.state_dir()).unwrap();
    let entry = |action: &str| {
        format!(
            "{{\"time\":1700000000.5,\"action\":\"{action}\",\"iface\":\"eth9\",\"from\":null,\"to\":\"sha256:{}\",\"host\":null,\"result\":\"ok\"}}\n",
            "a".repeat(64)
        )
    };
    std::fs::write(work.state_dir().join("audit.jsonl"), (0..200).map(|_| entry("swap")).collect::<String>()).unwrap();
    for args in [
        vec!["check", "--config", utf8(&config)],
        vec!["inspect", utf8(&config)],
        vec!["inspect", "--json", utf8(&config)],
        vec!["history", "--iface", "eth9"],
        vec!["history", "--iface", "eth9", "--json"],
        vec!["build", utf8(&config), "-o", utf8(&work.path("gen.bal"))],
    ] {
        let (status, stderr) = with_closed_stdout(work.command(&args))?;
        assert_eq!(status.code(), Some(0), "`ballast {}` on a closed stdout: {status}\n{stderr}", args.join(" "));
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The build's work stands.
    assert!(std::fs::read(work.path("gen.bal")).unwrap().starts_with(b"BALLAST\0"));
    // A failure stays a failure.
    let (status, _) = with_closed_stdout(work.command(&["check", "--config", utf8(&work.path("missing.toml"))]))?;
    assert_eq!(status.code(), Some(1));
    Ok(())
}

// ---- history: torn lines, RFC 3339 ------------------------------------------------------

fn audit_line(time: f64, action: &str) -> String {
    format!(
        "{{\"time\":{time},\"action\":\"{action}\",\"iface\":\"eth9\",\"from\":null,\"to\":\"sha256:{}\",\"host\":null,\"result\":\"ok\"}}\n",
        "b".repeat(64)
    )
}

#[test]
fn history_survives_a_torn_last_line() -> anyhow::Result<()> {
    let work = workspace("torn");
    std::fs::create_dir_all(work.state_dir()).unwrap();
    let whole = audit_line(1_700_000_000.0, "attach") + &audit_line(1_700_000_100.0, "swap");
    let torn = &audit_line(1_700_000_200.0, "swap")[..40];
    std::fs::write(work.state_dir().join("audit.jsonl"), format!("{whole}{torn}")).unwrap();
    let out = work.ballast(&["history", "--iface", "eth9"]).expect_success();
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    assert!(out.stderr.contains("last line (3) is torn"), "{out}");
    let json = work.ballast(&["history", "--iface", "eth9", "--json"]).expect_success().json().unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    // A torn line in the middle is named by its number; the entries around it are shown.
    std::fs::write(work.state_dir().join("audit.jsonl"), format!("{torn}\n{whole}")).unwrap();
    let out = work.ballast(&["history", "--iface", "eth9"]).expect_success();
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    assert!(out.stderr.contains("line 1 is not a whole entry"), "{out}");
    Ok(())
}

#[test]
fn history_prints_rfc3339_utc_times() -> anyhow::Result<()> {
    let work = workspace("rfc3339");
    std::fs::create_dir_all(work.state_dir()).unwrap();
    std::fs::write(work.state_dir().join("audit.jsonl"), audit_line(1_700_000_000.25, "attach")).unwrap();
    let out = work.ballast(&["history", "--iface", "eth9"]).expect_success();
    assert!(out.stdout.starts_with("2023-11-14T22:13:20.250Z  attach"), "{out}");
    assert!(!out.stdout.contains("1700000000"), "{out}");
    let json = work.ballast(&["history", "--iface", "eth9", "--json"]).expect_success().json().unwrap();
    assert_eq!(json[0]["time"], 1_700_000_000.25, "the JSON keeps `time`");
    assert_eq!(json[0]["time_rfc3339"], "2023-11-14T22:13:20.250Z");
    Ok(())
}

// ---- Foot-guns in the config, messages ---------------------------------------------------

#[test]
fn configs_that_would_forward_nowhere_are_refused_naming_field_and_value() -> anyhow::Result<()> {
    let work = workspace("footguns");
    let with_backend = |backend: &str| GOOD.replace("10.1.0.2", backend);
    for (text, path, value) in [
        (with_backend("192.0.2.10"), "vip[0].backends[1].address", "'192.0.2.10' is the address of vip[0]"),
        (with_backend("169.254.10.1"), "vip[0].backends[1].address", "link-local"),
        (with_backend("0.0.0.7"), "vip[0].backends[1].address", "0.0.0.0/8"),
        (with_backend("240.1.2.3"), "vip[0].backends[1].address", "240.0.0.0/4"),
        (
            GOOD.replace("192.0.2.10", "2001:db8::10")
                .replace("10.1.0.1", "2001:db8:1::1")
                .replace("10.1.0.2", "fe80::2"),
            "vip[0].backends[1].address",
            "link-local",
        ),
    ] {
        let config = work.write("lb.toml", &text);
        let out = work.ballast(&["check", "--config", utf8(&config)]);
        assert_eq!(out.code(), Some(3), "{out}");
        assert_refused(&out, &[path, value]);
    }
    // 198.18.0.0/15 (benchmarking) stays usable: the lab and tests use it.
    let config = work.write("lb.toml", with_backend("198.18.0.9"));
    work.ballast(&["check", "--config", utf8(&config)]).expect_success();
    Ok(())
}

#[test]
fn config_errors_speak_the_configs_words() -> anyhow::Result<()> {
    let work = workspace("words");
    for (text, path) in [
        (GOOD.replace("port = 80", "port = \"80\""), "vip[0].port"),
        (GOOD.replace("[{ address = \"10.1.0.1\" }, { address = \"10.1.0.2\" }]", "[5]"), "vip[0].backends[0]"),
        (
            GOOD.replace("{ address = \"10.1.0.2\" }", "{ address = \"10.1.0.2\", weight = 1.5 }"),
            "vip[0].backends[1].weight",
        ),
        (GOOD.replace("hash_seed = 1", "hash_seed = \"1\""), "hash_seed"),
        (GOOD.to_owned() + "[daemon]\nmin_healthy = \"half\"\n", "daemon.min_healthy"),
    ] {
        let config = work.write("lb.toml", &text);
        let out = work.ballast(&["check", "--config", utf8(&config)]);
        assert_eq!(out.code(), Some(3), "{out}");
        assert_refused(&out, &[path]);
        for internal in ["i64", "f64", "RawBackend", "RawVip", "RawConfig", "struct", "a sequence"] {
            assert!(!out.stderr.contains(internal), "'{internal}' leaks: {out}");
        }
    }
    Ok(())
}

#[test]
fn version_help_and_completions() -> anyhow::Result<()> {
    let work = workspace("version");
    let out = work.ballast(&["--version"]).expect_success();
    assert_eq!(out.stdout.trim(), format!("ballast {}", env!("CARGO_PKG_VERSION")));
    let help = work.ballast(&["run", "--help"]).expect_success();
    let config_help: Vec<&str> =
        help.stdout.lines().skip_while(|l| !l.trim_start().starts_with("--config")).take(3).collect();
    assert!(!config_help.join(" ").contains("or a generation artifact"), "{help}");
    assert!(config_help.join(" ").contains("not an artifact"), "{help}");
    for shell in ["bash", "zsh", "fish"] {
        let out = work.ballast(&["completions", shell]).expect_success();
        for word in ["ballast", "attach", "swap", "verify", "iface"] {
            assert!(out.stdout.contains(word), "{shell} completions lack {word}");
        }
    }
    assert!(work.ballast(&["completions", "tcsh"]).refused());
    Ok(())
}

#[test]
fn run_says_it_takes_a_config_not_an_artifact() -> anyhow::Result<()> {
    let work = workspace("run-artifact");
    let config = work.write("lb.toml", GOOD);
    let artifact = work.path("gen.bal");
    work.ballast(&["build", utf8(&config), "-o", utf8(&artifact)]).expect_success();
    for args in [
        vec!["run", "--config", utf8(&artifact), "--iface", "bt-nonexistent0", "--gateway-mac", GATEWAY_MAC],
        vec!["check", "--config", utf8(&artifact)],
    ] {
        let out = work.ballast(&args);
        assert_eq!(out.code(), Some(3), "{out}");
        assert_refused(&out, &["generation artifact", "not a TOML config"]);
    }
    Ok(())
}

#[test]
fn check_and_build_speak_json() -> anyhow::Result<()> {
    let work = workspace("json");
    let config = work.write("lb.toml", GOOD);
    let check = work.ballast(&["check", "--config", utf8(&config), "--json"]).expect_success().json().unwrap();
    assert_eq!(check["valid"], true);
    assert_eq!(check["vips"][0]["vip"], "192.0.2.10:80/tcp");
    assert_eq!(check["backends"], 2);
    let output = work.path("gen.bal");
    let built = work.ballast(&["build", utf8(&config), "-o", utf8(&output), "--json"]).expect_success().json().unwrap();
    let plain = work.ballast(&["build", utf8(&config), "-o", utf8(&output)]).expect_success();
    assert_eq!(built["digest"].as_str().unwrap(), plain.stdout.trim());
    assert_eq!(built["output"].as_str().unwrap(), utf8(&output));
    Ok(())
}

#[test]
fn prune_speaks_json() -> anyhow::Result<()> {
    if !require_root("prune_speaks_json") {
        return Ok(());
    }
    let work = workspace("prune-json");
    let out = work.ballast(&["prune", "--dry-run", "--json"]).expect_success();
    let json = out.json().unwrap();
    assert!(json.is_array(), "{out}");
    for entry in json.as_array().unwrap() {
        assert_eq!(entry["removed"], false, "--dry-run removes nothing: {out}");
    }
    Ok(())
}

// ---- Kernel: a closed stdout after a swap, private state, native XDP refused -------------

/// A network namespace with a veth pair `hi0` / `hi1`, detached of ballast's pins when dropped.
fn lab(work: &Workspace, tag: &str) -> anyhow::Result<NetNs> {
    let name = format!("bt-hi{tag}{}", std::process::id());
    let ns = NetNs::create_for_ballast(&name, &work.state_dir())
        .with_context(|| format!("creating the namespace {name}"))?;
    ns.add_veth("hi0", &ns, "hi1").with_context(|| format!("adding the veth pair hi0/hi1 in {name}"))?;
    Ok(ns)
}

#[test]
fn a_swap_that_succeeded_succeeds_on_a_closed_stdout_and_the_state_is_private() -> anyhow::Result<()> {
    if !require_root("a_swap_that_succeeded_succeeds_on_a_closed_stdout_and_the_state_is_private") {
        return Ok(());
    }
    let work = workspace("swap-epipe");
    let ns = lab(&work, "s")?;
    let a = work.write("a.toml", GOOD);
    let b = work.write("b.toml", GOOD_B);
    let target = ["--netns", ns.name(), "--iface", "hi0"];
    let attach =
        [&["attach", "--config", utf8(&a), "--gateway-mac", GATEWAY_MAC, "--mode", "generic"][..], &target].concat();
    let (status, stderr) = with_closed_stdout(work.command(&attach))?;
    assert_eq!(status.code(), Some(0), "attach: {stderr}");
    let (status, stderr) = with_closed_stdout(work.command(&[&["swap", utf8(&b)][..], &target].concat()))?;
    assert_eq!(status.code(), Some(0), "swap on a closed stdout: {stderr}");
    for command in ["status", "verify", "history"] {
        let (status, stderr) = with_closed_stdout(work.command(&[&[command][..], &target].concat()))?;
        assert_eq!(status.code(), Some(0), "{command} on a closed stdout: {stderr}");
    }
    // The swap happened: b runs, built after a (its settled form is b's own build).
    let digest_b = work.ballast(&["build", utf8(&b), "-o", utf8(&work.path("b.bal"))]).expect_success().stdout;
    work.ballast(&[&["verify"][..], &target].concat()).expect_success();
    let status = work.ballast(&[&["status", "--json"][..], &target].concat()).expect_success().json()?;
    let running = [&status["generation"], &status["lineage"]["settled"]];
    assert!(running.iter().any(|d| d.as_str() == Some(digest_b.trim())), "{status:#}");

    // Everything the state directory holds is private: hash_seed is the fleet's secret.
    let state = work.state_dir();
    let mut files = vec![state.join("audit.jsonl")];
    let mut dirs = vec![state.join("generations"), state.join("ifaces")];
    let mut stack = vec![state.join("generations"), state.join("ifaces")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.clone());
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "bal")), "{files:?}");
    assert!(files.iter().any(|f| f.ends_with("record.json")), "{files:?}");
    for file in &files {
        let mode = mode(file)?;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", file.display());
    }
    for dir in &dirs {
        let mode = mode(dir)?;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", dir.display());
    }
    let leftovers: Vec<_> =
        files.iter().filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().contains("tmp"))).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    Ok(())
}

#[test]
fn native_xdp_unsupported_says_use_generic_mode() -> anyhow::Result<()> {
    if !require_root("native_xdp_unsupported_says_use_generic_mode") {
        return Ok(());
    }
    let work = workspace("native");
    let ns = lab(&work, "n")?;
    // A bridge has no native XDP.
    ns.ip(&["link", "add", "hibr", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "hibr", "up"]).unwrap();
    let config = work.write("lb.toml", GOOD);
    let out = work.ballast(&[
        "attach",
        "--config",
        utf8(&config),
        "--netns",
        ns.name(),
        "--iface",
        "hibr",
        "--gateway-mac",
        GATEWAY_MAC,
    ]);
    assert_refused(&out, &["use --mode generic"]);
    let out = work.ballast(&["decap", "attach", "--netns", ns.name(), "--iface", "hibr", "--address", "10.1.0.1"]);
    assert_refused(&out, &["use --mode generic"]);
    Ok(())
}

#[test]
fn decap_status_speaks_json() -> anyhow::Result<()> {
    if !require_root("decap_status_speaks_json") {
        return Ok(());
    }
    let work = workspace("decap-json");
    let ns = lab(&work, "d")?;
    let target = ["--netns", ns.name(), "--iface", "hi1"];
    work.ballast(&[&["decap", "attach", "--address", "10.1.0.1"][..], &target].concat()).expect_success();
    let json = work.ballast(&[&["decap", "status", "--json"][..], &target].concat()).expect_success().json().unwrap();
    assert_eq!(json["iface"], "hi1");
    assert!(json["counters"].as_object().is_some_and(|c| !c.is_empty()), "{json}");
    work.ballast(&[&["decap", "detach"][..], &target].concat()).expect_success();
    Ok(())
}
