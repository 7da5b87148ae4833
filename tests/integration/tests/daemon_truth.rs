//! The daemon (`ballast run`) tells the truth about what runs, and its peers cannot hurt it
//! (issue T): it decides from the kernel, not from its cache (drift: a generation swapped in,
//! detached or cut off behind its back is undone, counted and audited; at exit it names what
//! really runs; a restart replaces a dead link), one daemon per interface, a restart keeps the
//! backends it had taken out, an unreadable config (FIFO, /dev/zero) cannot block SIGTERM, and
//! the metrics endpoint's clients can neither starve the health checks nor keep a scrape out.
//!
//! Each test builds its own lab (namespaces `bl-tPID-TEST-*`) and starts the daemon as its own
//! child, ended by its pid when the test ends (its log is printed when the test failed). Needs
//! root and the `ballast` and `ballast-lab` binaries (`cargo build -p lb-userspace -p ballast-lab`);
//! `BALLAST_BIN` runs them against another `ballast` (the previous release fails them).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ballast_lab as lab;
use ballast_test_support::wait_until;
use ballast_tests::daemon::{entries, ms, Fixture, Metrics, Setup, FALL, INTERVAL_MS, METRICS};
use serde_json::Value as Json;

/// SIGTERM to exit: "promptly".
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The labs `bl-tPID-TEST-*`; a scrape may lack the kernel's side for a few seconds.
const SETUP: Setup = Setup { prefix: "t", exit_limit: EXIT_TIMEOUT, scrape_limit: Duration::from_secs(5) };
/// The daemon compares what runs with what it wants once a second; a restore is a swap or an
/// attach with its pre-flight (debug build).
const RESTORE_LIMIT: Duration = Duration::from_secs(10);

/// Sets the soft RLIMIT_NOFILE of process `pid` (its hard limit stays: raising it again needs
/// CAP_SYS_RESOURCE, which a container's root may lack).
fn set_descriptor_limit(pid: u32, limit: u64) {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit on our own child with valid structs.
    let ret = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(ret, 0, "prlimit({pid}, RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    let new = libc::rlimit { rlim_cur: limit.min(old.rlim_max), rlim_max: old.rlim_max };
    // SAFETY: as above.
    let ret = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(ret, 0, "prlimit({pid}, RLIMIT_NOFILE, {limit}): {}", std::io::Error::last_os_error());
}

/// Sets RLIMIT_AS of process `pid`: a bound on what a runaway read can take from the host.
fn set_memory_limit(pid: u32, bytes: u64) {
    let new = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: as in set_descriptor_limit.
    let ret = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_AS, &new, std::ptr::null_mut()) };
    assert_eq!(ret, 0, "prlimit({pid}, RLIMIT_AS): {}", std::io::Error::last_os_error());
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_memory(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).with_context(|| format!("no VmHWM in {path}"))?;
    let kib = line.split_whitespace().nth(1).with_context(|| format!("{path}: no value in {line:?}"))?;
    let kib: u64 = kib.parse().with_context(|| format!("{path}: {line:?}"))?;
    Ok(kib << 10)
}

fn open_descriptors(pid: u32) -> anyhow::Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path).with_context(|| format!("listing {path}"))?.count())
}

/// CPU time (user + system) of process `pid`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let (_, after_name) = stat.rsplit_once(')').with_context(|| format!("{path}: no command name in {stat:?}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        let text = fields.get(i).with_context(|| format!("{path}: too few fields in {stat:?}"))?;
        text.parse().with_context(|| format!("{path}: field {} is {text:?}", i + 3))
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// The share of one core process `pid` used over `window`.
fn cpu_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let (before, start) = (cpu_time(pid)?, Instant::now());
    std::thread::sleep(window);
    Ok((cpu_time(pid)? - before).as_secs_f64() / start.elapsed().as_secs_f64())
}

/// A child process ended (SIGKILL) and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _gone_meanwhile = self.0.kill();
            let _reaped = self.0.wait();
        }
    }
}

/// Writes another config (for an out-of-band swap), its path.
fn other_config(f: &Fixture, backends: &[usize]) -> anyhow::Result<PathBuf> {
    let name = format!("other-{}.toml", backends.iter().map(ToString::to_string).collect::<Vec<_>>().join("-"));
    f.lab
        .write_file(&name, &lab::config(&backends.iter().map(|&i| (i, 1)).collect::<Vec<_>>()))
        .with_context(|| format!("writing {name}"))
}

/// Waits until `generation` runs on the load balancer again and the daemon says it has
/// nothing to undo; how long it took.
fn wait_for_restore(f: &Fixture, what: &str, generation: &str) -> Duration {
    let start = Instant::now();
    let restored = wait_until(RESTORE_LIMIT, || {
        f.generation().as_deref() == Some(generation)
            && f.try_metrics().is_ok_and(|m| m.value("ballast_generation_drifted", &[]) == Some(0.0))
    });
    assert!(restored, "{what}: the daemon did not restore {generation} within {RESTORE_LIMIT:?}");
    start.elapsed()
}

/// Requests from the client to the IPv4 TCP VIP: how many were answered.
fn answered(f: &Fixture, first_port: u16, count: u16) -> anyhow::Result<usize> {
    let (_, vip) = lab::vips()
        .into_iter()
        .find(|(p, v)| p.name() == "tcp" && v.is_ipv4())
        .context("the lab has no IPv4 TCP VIP")?;
    let flows = lab::flows(ballast::generation::config::Protocol::Tcp, vip, first_port..first_port + count);
    let replies = f.lab.send(&flows).with_context(|| format!("sending to {vip}"))?;
    Ok(replies.len() - lab::failures(&replies).len())
}

/// Opens `count` connections to the metrics endpoint that send nothing.
fn idle_connections(f: &Fixture, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    lab::in_netns(&f.lb_ns(), || {
        let address: SocketAddr = METRICS.parse()?;
        let mut held = Vec::new();
        for _ in 0..count {
            // A connection the daemon never accepts still completes (the kernel's backlog).
            if let Ok(stream) = TcpStream::connect_timeout(&address, ms(500)) {
                held.push(stream);
            }
        }
        Ok(held)
    })
    .with_context(|| format!("opening {count} idle connections to {METRICS}"))
}

/// The health of every backend `backends` of every VIP, as the metrics say.
fn all_healthy(metrics: &Metrics, backends: &[usize]) -> bool {
    lab::vips().iter().all(|(protocol, vip)| {
        let name = format!("{vip}/{}", protocol.name());
        backends.iter().all(|&i| {
            let address = if vip.is_ipv4() { lab::backend_v4(i).to_string() } else { lab::backend_v6(i).to_string() };
            metrics.value("ballast_backend_healthy", &[("vip", &name), ("backend", &address)]) == Some(1.0)
        })
    })
}

/// A second `ballast run` on the same interface and namespace fails at once, naming the
/// daemon that serves it; the first goes on, untouched.
#[test]
fn a_second_daemon_on_the_interface_is_refused() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "second", 2, &[1, 2])? else { return Ok(()) };
    let generation = f.generation().unwrap();
    let history = f.history()?.len();
    let mut second = f.spawn_daemon(&[])?;
    let status = second.exit_within(Duration::from_secs(10))?;
    let log = second.log();
    assert!(status.is_some(), "a second `ballast run` on the interface kept running:\n{log}");
    let status = status.unwrap();
    eprintln!("second: {status}: {}", log.trim());
    assert_eq!(status.code(), Some(7), "{log}");
    let pid = f.daemon()?.pid().to_string();
    assert!(
        log.contains("already serves") && log.contains(&pid),
        "the refusal should name the daemon (pid {pid}):\n{log}"
    );
    assert!(f.daemon()?.running()?, "the first daemon went");
    assert_eq!(f.generation().as_deref(), Some(generation.as_str()));
    assert_eq!(f.history()?.len(), history, "the refused daemon changed something");
    f.stop_daemon()?;
    Ok(())
}

/// A `--metrics` address already taken stops `ballast run` at start, non-zero, before it
/// attaches anything.
#[test]
fn a_taken_metrics_port_stops_the_daemon_at_start() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::new(&SETUP, "bind", 1, &[1])? else { return Ok(()) };
    let taken: TcpListener = lab::in_netns(&f.lb_ns(), || Ok(TcpListener::bind(METRICS)?)).unwrap();
    let mut daemon = f.spawn_daemon(&["--metrics", METRICS])?;
    let status = daemon.exit_within(Duration::from_secs(10))?;
    let log = daemon.log();
    assert!(status.is_some(), "ballast run kept running without its metrics endpoint:\n{log}");
    let status = status.unwrap();
    eprintln!("bind: {status}: {}", log.trim());
    assert!(!status.success(), "{log}");
    assert!(log.contains(METRICS), "the error should name the address:\n{log}");
    assert!(f.status().is_err(), "a daemon that could not start attached a generation");
    drop(taken);
    Ok(())
}

/// Out-of-band changes are drift: a `ballast swap`, a `ballast detach` and a link detached
/// under ballast (`bpftool link detach`) are each logged, counted by kind, audited and undone.
#[test]
fn drift_is_reported_and_undone() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "drift", 2, &[1, 2])? else { return Ok(()) };
    let ours = f.generation().unwrap();

    let other = other_config(&f, &[1])?;
    f.ballast_on_lb(&["swap", other.to_str().unwrap()])?;
    let took = wait_for_restore(&f, "after an out-of-band swap", &ours);
    eprintln!("drift: an out-of-band swap undone in {took:?}");
    let history = f.history()?;
    let drift = entries(&history, "drift");
    assert_eq!(drift.len(), 1, "{history:#?}");
    assert_eq!(drift[0]["from"], ours.as_str());
    assert!(drift[0]["to"].as_str().is_some_and(|d| d != ours), "{history:#?}");
    assert_eq!(entries(&history, "restore").last().unwrap()["to"], ours.as_str(), "{history:#?}");
    assert_eq!(f.metrics()?.count("ballast_drift_total", &[("kind", "swapped")]), 1);

    f.ballast_on_lb(&["detach"])?;
    let took = wait_for_restore(&f, "after an out-of-band detach", &ours);
    eprintln!("drift: an out-of-band detach undone in {took:?}");
    assert_eq!(f.metrics()?.count("ballast_drift_total", &[("kind", "detached")]), 1);

    let link = f.link_id()?.to_string();
    ballast_test_support::run(std::process::Command::new("bpftool").args(["link", "detach", "id", &link]))
        .unwrap()
        .expect_success();
    let restored = wait_until(RESTORE_LIMIT, || {
        f.try_metrics().is_ok_and(|m| {
            m.count("ballast_drift_total", &[("kind", "link_dead")]) == 1
                && m.value("ballast_generation_drifted", &[]) == Some(0.0)
        })
    });
    assert!(restored, "a link detached behind ballast's back was not replaced");
    assert_ne!(f.link_id()?.to_string(), link, "the dead link is still the one pinned");
    assert_eq!(answered(&f, 40_000, 20)?, 20, "the replaced link does not forward");
    let log = f.daemon()?.log();
    assert_eq!(log.matches("DRIFT").count(), 3, "{log}");
    assert_eq!(entries(&f.history()?, "drift").len(), 3);
    f.stop_daemon()?;
    Ok(())
}

/// The interface renamed under the daemon: the link still runs, but not on the daemon's
/// interface. That is drift the daemon cannot undo (there is no lb0 to attach to): it says so
/// (log, metrics, audit) and keeps trying; renamed back, the generation serves lb0 again and
/// the drift is over, without a change.
#[test]
fn a_renamed_interface_is_reported_until_it_is_back() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "rename", 1, &[1])? else { return Ok(()) };
    let (ours, link) = (f.generation().unwrap(), f.link_id()?);
    let ns = f.lb_ns();
    let rename = |from: &str, to: &str| {
        for args in
            [vec!["link", "set", from, "down"], vec!["link", "set", from, "name", to], vec!["link", "set", to, "up"]]
        {
            ballast_test_support::ip(&[&["-n", ns.as_str()], args.as_slice()].concat()).unwrap();
        }
    };
    rename(lab::LB_IFACE, "lbx");
    let reported = wait_until(RESTORE_LIMIT, || {
        f.try_metrics().is_ok_and(|m| {
            m.count("ballast_drift_total", &[("kind", "link_dead")]) == 1
                && m.value("ballast_generation_drifted", &[]) == Some(1.0)
        })
    });
    // The daemon reports the drift before its first attempt to undo it: wait for that attempt
    // to fail (there is no lb0) before lb0 comes back.
    let tried = wait_until(RESTORE_LIMIT, || {
        f.daemon().is_ok_and(|d| d.log().contains("restoring the daemon's generation failed"))
    });
    rename("lbx", lab::LB_IFACE);
    assert!(reported, "the rename was not reported as drift:\n{}", f.daemon()?.log());
    let log = f.daemon()?.log();
    assert!(log.contains("DRIFT") && log.contains("lbx"), "the drift should name where the link went:\n{log}");
    assert!(tried, "no failed attempt to restore while lb0 was gone:\n{log}");
    let history = f.history()?;
    assert_eq!(entries(&history, "drift").len(), 1, "{history:#?}");
    let over = wait_until(RESTORE_LIMIT, || {
        f.try_metrics().is_ok_and(|m| m.value("ballast_generation_drifted", &[]) == Some(0.0))
    });
    assert!(over, "the drift did not end once lb0 was back:\n{}", f.daemon()?.log());
    assert_eq!(f.generation().as_deref(), Some(ours.as_str()));
    assert_eq!(f.link_id()?, link, "the link was replaced although it served again");
    f.stop_daemon()?;
    Ok(())
}

/// At exit the daemon names the generation that really runs, here one swapped in behind its
/// back that it could not undo yet (the out-of-band swap still holds the interface's lock).
#[test]
fn exit_names_what_really_runs() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "exit", 2, &[1, 2])? else { return Ok(()) };
    let ours = f.generation().unwrap();
    let other = other_config(&f, &[2])?;
    let target = f.lab.lb_target(1);
    let target: Vec<&str> = target.iter().map(String::as_str).collect();
    let swap_log = f.lab.dir().join("swap.log");
    let mut swap = KillOnDrop(
        f.lab
            .ballast_command(&[&["swap", other.to_str().unwrap()], target.as_slice()].concat())
            .env("BALLAST_TEST_PAUSE_AT", "record-written")
            .stdout(Stdio::null())
            .stderr(File::create(&swap_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let paused = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&swap_log).unwrap_or_default().contains("paused at record-written")
    });
    assert!(paused, "the swap did not pause: {}", std::fs::read_to_string(&swap_log).unwrap_or_default());
    let foreign = f.generation().unwrap();
    assert_ne!(foreign, ours);
    let log = f.stop_daemon()?.log();
    let _ended = swap.0.kill();
    swap.0.wait().unwrap();
    let last = log.lines().rev().find(|l| l.contains("exiting")).unwrap_or_default().to_owned();
    eprintln!("exit: {last}");
    assert!(last.contains(&format!("exiting; {foreign} stays attached")), "the exit should name {foreign}:\n{log}");
    assert_eq!(f.generation().as_deref(), Some(foreign.as_str()));
    Ok(())
}

/// A restarted daemon does not swap back in a backend it had taken out: the generation it
/// finds is adopted as it is, the backend stays unhealthy until `rise` checks pass, then rejoins.
#[test]
fn a_restart_keeps_dead_backends_out() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "restart", 3, &[1, 2, 3])? else { return Ok(()) };
    f.lab.stop_server(2).unwrap();
    let b2 = lab::backend_v4(2).to_string();
    let served_by_b2 = |status: &Json| {
        status["vips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["backends"].as_array().unwrap().iter().any(|b| b["address"] == b2.as_str()))
    };
    let removed = wait_until(Duration::from_secs(10), || f.status().is_ok_and(|s| !served_by_b2(&s)));
    assert!(removed, "b2 was not taken out");
    let without_b2 = f.generation().unwrap();
    f.stop_daemon()?;
    let history = f.history()?.len();

    f.start_daemon(&[])?;
    let after = f.history()?;
    assert_eq!(after.len(), history, "the restarted daemon changed the generation at start: {:#?}", &after[history..]);
    assert_eq!(f.generation().as_deref(), Some(without_b2.as_str()), "the restart swapped b2 back in");
    let metrics = f.metrics()?;
    let name = format!("{}:80/tcp", lab::VIP_V4);
    assert_eq!(metrics.value("ballast_backend_healthy", &[("vip", &name), ("backend", &b2)]), Some(0.0));
    assert!(f.daemon()?.log().contains("unhealthy until its checks pass"), "{}", f.daemon()?.log());

    f.lab.start_server(2).unwrap();
    let back = wait_until(Duration::from_secs(10), || f.status().is_ok_and(|s| served_by_b2(&s)));
    assert!(back, "b2 did not rejoin after its checks passed");
    f.stop_daemon()?;
    Ok(())
}

/// A restarted daemon finds the link of its generation dead (detached behind ballast's back)
/// and attaches anew instead of adopting it: traffic flows again.
#[test]
fn a_restart_replaces_a_dead_link() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "deadlink", 2, &[1, 2])? else { return Ok(()) };
    let link = f.link_id()?.to_string();
    f.stop_daemon()?;
    ballast_test_support::run(std::process::Command::new("bpftool").args(["link", "detach", "id", &link]))
        .unwrap()
        .expect_success();
    assert_eq!(answered(&f, 41_000, 10)?, 0, "a detached link still forwards");
    f.start_daemon(&[])?;
    let log = f.daemon()?.log();
    assert!(!log.contains("adopted"), "the daemon adopted a dead link:\n{log}");
    assert_ne!(f.link_id()?.to_string(), link);
    assert_eq!(answered(&f, 41_100, 20)?, 20, "after the restart nothing forwards");
    f.stop_daemon()?;
    Ok(())
}

/// The config replaced by a FIFO (`which` = "fifo") or a symlink to /dev/zero ("zero") while
/// the daemon runs: the file watch and SIGHUP read it, the daemon does not grow, and SIGTERM
/// still ends it at once, leaving the generation.
fn unreadable_config(test: &str, which: &str) -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, test, 1, &[1])? else { return Ok(()) };
    let ours = f.generation().context("no generation runs")?;
    // A runaway read must not take the host's memory (the previous release read /dev/zero
    // until it had 5 GB): 2 GiB of address space, far above what the daemon maps.
    set_memory_limit(f.daemon()?.pid(), 2 << 30);
    let replacement = f.lab.dir().join("replacement");
    match which {
        "fifo" => {
            let path = std::ffi::CString::new(replacement.as_os_str().as_encoded_bytes())
                .with_context(|| format!("{} as a C string", replacement.display()))?;
            // SAFETY: mkfifo with a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        }
        _ => std::os::unix::fs::symlink("/dev/zero", &replacement)
            .with_context(|| format!("linking {} to /dev/zero", replacement.display()))?,
    }
    std::fs::rename(&replacement, &f.config)
        .with_context(|| format!("renaming {} to {}", replacement.display(), f.config.display()))?;
    // The file watch looks once a second; then a SIGHUP for good measure.
    std::thread::sleep(ms(1500));
    f.daemon()?.signal(libc::SIGHUP)?;
    std::thread::sleep(ms(300));
    // No read may grow the daemon without bound (its config reads are capped at 16 MiB).
    let peak = peak_memory(f.daemon()?.pid())?;
    eprintln!("{test}: the daemon's peak resident memory: {} MiB", peak >> 20);
    assert!(peak < 256 << 20, "reading the config grew the daemon to {} MiB", peak >> 20);
    let start = Instant::now();
    let log = f.stop_daemon()?.log();
    eprintln!("{test}: exited {:?} after SIGTERM", start.elapsed());
    assert!(log.contains("stays attached"), "{log}");
    assert_eq!(f.generation().as_deref(), Some(ours.as_str()), "the generation went with the daemon");
    Ok(())
}

#[test]
fn a_fifo_config_does_not_block_sigterm() -> anyhow::Result<()> {
    unreadable_config("fifo", "fifo")
}

#[test]
fn a_dev_zero_config_does_not_block_sigterm() -> anyhow::Result<()> {
    unreadable_config("zero", "zero")
}

/// 300 idle connections held open to /metrics (more than the daemon's descriptors, here
/// 256): a new client is still answered within its timeout, no healthy backend is taken out,
/// and the daemon does not spin.
#[test]
fn idle_metrics_connections_starve_nothing() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "idle", 2, &[1, 2])? else { return Ok(()) };
    let pid = f.daemon()?.pid();
    set_descriptor_limit(pid, 256);
    let held = idle_connections(&f, 300)?;
    eprintln!("idle: {} idle connections held; the daemon has {} descriptors open", held.len(), open_descriptors(pid)?);
    let start = Instant::now();
    let scrape = f.try_metrics();
    eprintln!("idle: a new client's scrape took {:?}", start.elapsed());
    let scrape = scrape.expect("a new client was not answered while idle connections are held");
    assert!(all_healthy(&scrape, &[1, 2]));
    // Several rounds of checks while the connections are held.
    let share = cpu_share(pid, ms((FALL + 2) * INTERVAL_MS * 2))?;
    eprintln!("idle: the daemon used {:.0}% of a core", share * 100.0);
    assert!(share < 0.5, "the daemon spins: {:.0}% of a core", share * 100.0);
    let metrics = f.try_metrics().expect("a scrape while idle connections are held");
    assert!(all_healthy(&metrics, &[1, 2]), "idle metrics connections made a healthy backend unhealthy");
    assert!(entries(&f.history()?, "health").is_empty(), "{:#?}", f.history()?);
    drop(held);
    assert!(f.try_metrics().is_ok());
    f.stop_daemon()?;
    Ok(())
}

/// With every descriptor used up (idle metrics connections under a low limit), health checks
/// that cannot get a socket count as "could not check", not as a failing backend, and the
/// accept loop pauses instead of spinning.
#[test]
fn health_checks_without_descriptors_are_unchecked_not_down() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "nofile", 2, &[1, 2])? else { return Ok(()) };
    let pid = f.daemon()?.pid();
    let open = open_descriptors(pid)? as u64;
    set_descriptor_limit(pid, open + 6);
    let held = idle_connections(&f, 40)?;
    let daemon = f.daemon()?;
    let noticed = wait_until(Duration::from_secs(5), || daemon.log().contains("could not check"));
    let share = cpu_share(pid, ms((FALL + 2) * INTERVAL_MS * 2))?;
    eprintln!(
        "nofile: {} connections held, {} descriptors open (limit {}), {:.0}% of a core",
        held.len(),
        open_descriptors(pid)?,
        open + 6,
        share * 100.0
    );
    let log = f.daemon()?.log();
    assert!(!log.contains("is now unhealthy"), "a check without a socket took a backend out:\n{log}");
    assert!(noticed, "no health check reported 'could not check':\n{log}");
    assert!(share < 0.5, "the daemon spins: {:.0}% of a core", share * 100.0);
    drop(held);
    set_descriptor_limit(pid, 4096);
    let mut metrics = None;
    let answered = wait_until(Duration::from_secs(5), || {
        metrics = f.try_metrics().ok();
        metrics.is_some()
    });
    assert!(answered, "no scrape once the descriptors were free");
    let metrics = metrics.unwrap();
    assert!(all_healthy(&metrics, &[1, 2]));
    assert!(metrics.count("ballast_health_unchecked_total", &[]) > 0);
    assert!(entries(&f.history()?, "health").is_empty(), "{:#?}", f.history()?);
    f.stop_daemon()?;
    Ok(())
}

/// The unit keeps the state directory root's own and gives the daemon descriptors to spare.
#[test]
fn the_unit_sets_state_directory_mode_and_descriptor_limit() {
    let unit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd/ballast@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let setting = |key: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix('=')).map(str::trim))
    };
    assert_eq!(setting("StateDirectoryMode"), Some("0700"), "{}", unit.display());
    let nofile: u64 = setting("LimitNOFILE").expect("no LimitNOFILE in the unit").parse().unwrap();
    assert!(nofile >= 4096, "LimitNOFILE={nofile}");
}
