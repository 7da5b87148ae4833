//! One process at a time uses a lab: while one holds it (a test's `Lab`, `ballast demo`), a
//! second `ballast lab down`, `ballast lab up` or `ballast demo` of the same name is refused,
//! saying who uses it, and the lab it would have torn down keeps working.
//!
//! The commands run through `ballast lab ...` / `ballast demo` (the `ballast` of
//! `ballast_test_support::ballast_binary`, `$BALLAST_BIN` overrides), so that the same test
//! runs against an older release, whose `ballast` carried the lab itself. Needs root and the
//! `ballast` binary (`cargo build -p lb-userspace -p ballast-lab`).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use ballast::generation::config::Protocol;
use ballast_lab::{self as lab, Lab, LabSpec, Role};
use ballast_test_support::{ballast_binary, require_root, run_with_timeout, Output};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The demo's lab is always named `demo`: its tests take turns.
static DEMO: Mutex<()> = Mutex::new(());

fn ballast(args: &[&str]) -> anyhow::Result<Output> {
    let binary = ballast_binary()?;
    run_with_timeout(Command::new(&binary).args(args), TIMEOUT)
        .with_context(|| format!("running {} {}", binary.display(), args.join(" ")))
}

fn namespaces_of(lab: &Lab) -> Vec<String> {
    let spec = lab.spec();
    [Role::Client, Role::Router]
        .into_iter()
        .chain((1..=spec.lbs).map(Role::Lb))
        .chain((1..=spec.backends).map(Role::Backend))
        .map(|role| lab.namespace(role))
        .collect()
}

/// Every namespace is there, the record too, and traffic flows through a generation attached
/// now: the lab was not torn down underneath its user.
fn assert_unharmed(lab: &Lab) -> anyhow::Result<()> {
    for ns in namespaces_of(lab) {
        assert!(Path::new("/run/netns").join(&ns).exists(), "namespace {ns} of the lab in use is gone");
    }
    assert!(lab.dir().join("lab.json").is_file(), "the record of the lab in use is gone");
    let backends: Vec<(usize, u32)> = (1..=lab.spec().backends).map(|i| (i, 1)).collect();
    let config = lab.write_file("lb.toml", &lab::config(&backends)).context("writing the lab's config")?;
    lab.attach(&config).with_context(|| format!("attaching {} to the lab in use", config.display()))?;
    let (protocol, vip) = lab::vips()[0];
    assert_eq!(protocol, Protocol::Tcp);
    let replies = lab
        .send(&lab::flows(protocol, vip, 40_000..40_020))
        .with_context(|| format!("sending to {vip} through the lab"))?;
    let failed = lab::failures(&replies);
    assert!(failed.is_empty(), "{} of {} requests failed, e.g. {:?}", failed.len(), replies.len(), failed.first());
    Ok(())
}

fn assert_refused_as_in_use(output: &Output, what: &str) {
    assert!(output.refused(), "{what} was not refused while another process uses the lab: {output}");
    let pid = std::process::id().to_string();
    assert!(
        output.stderr.contains("is in use by process") && output.stderr.contains(&pid),
        "{what} did not say the lab is in use by this test (pid {pid}): {output}"
    );
}

/// The demo's turn (None when the test must skip: not root), with nothing left of a killed
/// run's demo lab.
fn demo_turn(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !require_root(test) {
        return None;
    }
    let turn = DEMO.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _nothing_left = lab::down("demo");
    Some(turn)
}

/// [`demo_turn`], then `ballast demo` started in the background, its stdout piped and its
/// stderr `stderr`.
fn start_demo(test: &str, stderr: Stdio) -> anyhow::Result<Option<(MutexGuard<'static, ()>, Child)>> {
    let Some(turn) = demo_turn(test) else { return Ok(None) };
    let demo = Command::new(ballast_binary()?)
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting ballast demo")?;
    Ok(Some((turn, demo)))
}

#[test]
fn a_lab_in_use_is_neither_torn_down_nor_built_again() -> anyhow::Result<()> {
    if !require_root("a_lab_in_use_is_neither_torn_down_nor_built_again") {
        return Ok(());
    }
    let name = "tl-busy";
    // What a killed run of this test left behind.
    let _nothing_left = lab::down(name);
    let lab = Lab::up(&LabSpec::new(name, 2, 1), &ballast_binary()?).context("building the lab")?;

    let down = ballast(&["lab", "down", "--name", name])?;
    assert_refused_as_in_use(&down, "`ballast lab down` of a lab in use");
    let up = ballast(&["lab", "up", "--name", name, "--backends", "2"])?;
    assert_refused_as_in_use(&up, "`ballast lab up` of a lab in use");
    assert_unharmed(&lab)?;

    // `lab status` says who uses it, without taking the lock (the lab stays this test's).
    let status = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(status["state"], "up", "{status}");
    assert_eq!(status["in_use_by"]["pid"].as_u64(), Some(u64::from(std::process::id())), "{status}");

    // Another handle in this very process is refused too: a lab has one user.
    let again = Lab::up(&LabSpec::new(name, 2, 1), &ballast_binary()?);
    let err = again.err().expect("a second Lab::up of a lab in use succeeded");
    assert!(err.downcast_ref::<lab::LabInUse>().is_some(), "{err:#}");
    assert!(lab::down(name).is_err(), "lab::down of a lab in use succeeded");

    lab.down().context("tearing the lab down")?;
    // Once its user is done, the lab is free: `down` of nothing and a new `up` work.
    let status = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(status["in_use_by"], serde_json::Value::Null, "{status}");
    ballast(&["lab", "up", "--name", name, "--backends", "1"])?.expect_success();
    ballast(&["lab", "down", "--name", name])?.expect_success();
    Ok(())
}

#[test]
fn a_demo_leaves_a_lab_in_use_of_its_name_alone() -> anyhow::Result<()> {
    let Some(_turn) = demo_turn("a_demo_leaves_a_lab_in_use_of_its_name_alone") else { return Ok(()) };
    // A demo-like user of the lab `demo`: this test.
    let lab = Lab::up(&LabSpec::new("demo", 4, 1), &ballast_binary()?).context("building the lab")?;
    let demo = ballast(&["demo"])?;
    assert_refused_as_in_use(&demo, "`ballast demo` while the lab `demo` is in use");
    assert_unharmed(&lab)?;
    lab.down().context("tearing the lab down")?;
    Ok(())
}

#[test]
fn two_demos_at_once_the_second_is_refused_and_the_first_finishes() -> anyhow::Result<()> {
    let Some((_turn, mut first)) =
        start_demo("two_demos_at_once_the_second_is_refused_and_the_first_finishes", Stdio::piped())?
    else {
        return Ok(());
    };
    let first_pid = first.id();
    // Read the first demo's output until its lab is up ("[2/7]": built, attaching next), then
    // keep reading in the background so that it never blocks on a full pipe.
    let mut lines = BufReader::new(first.stdout.take().context("the first demo's stdout")?).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.context("reading the first demo's output")?;
        let lab_up = line.starts_with("[2/7]");
        seen.push(line);
        if lab_up {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.starts_with("[2/7]")), "the first demo ended early:\n{}", seen.join("\n"));
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let stderr = first.stderr.take().context("the first demo's stderr")?;
    let first_stderr =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());

    let second = ballast(&["demo"])?;
    let first_done = ballast_test_support::wait_until(TIMEOUT, || matches!(first.try_wait(), Ok(Some(_))));
    if !first_done {
        let _ = first.kill();
    }
    let status = first.wait().context("waiting for the first demo")?;
    let (rest, first_stderr) = (
        rest.join().expect("reading the first demo's stdout"),
        first_stderr.join().expect("reading the first demo's stderr"),
    );
    let first_output = format!("{}\n{}\n--- stderr\n{}", seen.join("\n"), rest.join("\n"), first_stderr.join("\n"));

    assert!(second.refused(), "a second demo ran while the first was running: {second}");
    assert!(
        second.stderr.contains("is in use by process") && second.stderr.contains(&first_pid.to_string()),
        "the second demo did not say the first (pid {first_pid}) uses the lab: {second}"
    );
    assert!(status.success(), "the first demo failed ({status}) while a second one started:\n{first_output}");
    assert!(rest.iter().any(|l| l.starts_with("done in")), "the first demo did not finish:\n{first_output}");
    Ok(())
}

#[test]
fn a_demo_killed_half_way_leaves_no_lock_behind() -> anyhow::Result<()> {
    let Some((_turn, mut first)) = start_demo("a_demo_killed_half_way_leaves_no_lock_behind", Stdio::null())? else {
        return Ok(());
    };
    let mut lines = BufReader::new(first.stdout.take().context("the demo's stdout")?).lines();
    assert!(lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("[2/7]")), "the demo ended early");
    // SIGKILL: no teardown, its lab and servers stay, and the lock goes with the process.
    first.kill().context("killing the demo")?;
    first.wait().context("waiting for the killed demo")?;
    assert!(Path::new("/run/netns/bl-demo-rt").exists(), "the killed demo's lab is not there to clean up");
    let next = ballast(&["demo"])?;
    assert!(next.success(), "a demo after one killed half-way failed: {next}");
    assert!(next.stdout.contains("done in"), "{next}");
    assert!(!Path::new("/run/netns/bl-demo-rt").exists(), "the demo left its lab");
    Ok(())
}
