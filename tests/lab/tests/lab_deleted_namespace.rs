//! `ballast lab down` after one of the lab's namespaces was deleted by hand (`ip netns del`):
//! the pins ballast made in it (`/sys/fs/bpf/ballast/netns-COOKIE/...`, the load balancer's
//! generation, a backend's decapsulator) are removed all the same, and `ballast lab status
//! [--json]` says the namespace is gone and its pins are left.
//!
//! The commands run through `ballast lab ...` (`$BALLAST_BIN` overrides the binary), so that the
//! same test runs against an older release. Needs root and the `ballast` binary
//! (`cargo build -p lb-userspace -p ballast-lab`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use ballast_lab as lab;
use ballast_test_support::{ballast_binary, require_root, run_with_timeout, Output};

const TIMEOUT: Duration = Duration::from_secs(120);

fn ballast(args: &[&str]) -> anyhow::Result<Output> {
    let binary = ballast_binary()?;
    run_with_timeout(Command::new(&binary).args(args), TIMEOUT)
        .with_context(|| format!("running {} {}", binary.display(), args.join(" ")))
}

/// The pin directory ballast itself names for the namespace (kernel/pins.rs), read inside it.
fn pin_dir_of(ns: &str) -> anyhow::Result<PathBuf> {
    let iface_dir = lab::in_netns(ns, || Ok(ballast::kernel::pins::pin_dir(lab::LB_IFACE)?))
        .with_context(|| format!("naming the pin directory of {} in {ns}", lab::LB_IFACE))?;
    let dir = iface_dir.parent().with_context(|| format!("{} has no parent directory", iface_dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Removes what a failed run left: the pin directories (by path) and the lab.
struct Cleanup {
    name: &'static str,
    pin_dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lab::down(self.name);
        for dir in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn namespace<'a>(status: &'a serde_json::Value, ns: &str) -> &'a serde_json::Value {
    let all = status["namespaces"].as_array().unwrap_or_else(|| panic!("no namespaces in {status}"));
    all.iter().find(|n| n["name"] == ns).unwrap_or_else(|| panic!("{ns} not in {status}"))
}

/// `ballast lab up --name NAME --backends 2`, then `ip netns del` of its load balancer's and
/// first backend's namespaces; those two namespaces, the one kept, and the pin directory of
/// each (checked to hold the generation and the decapsulator).
fn up_then_delete_two_namespaces(name: &'static str) -> anyhow::Result<(Cleanup, [(String, PathBuf); 3])> {
    let _nothing_left = lab::down(name);
    ballast(&["lab", "up", "--name", name, "--backends", "2"])?.expect_success();
    let (lb, backend, kept) = (format!("bl-{name}-lb1"), format!("bl-{name}-b1"), format!("bl-{name}-b2"));
    let [lb, backend, kept] = [(pin_dir_of(&lb)?, lb), (pin_dir_of(&backend)?, backend), (pin_dir_of(&kept)?, kept)]
        .map(|(pins, ns)| (ns, pins));
    let cleanup = Cleanup { name, pin_dirs: vec![lb.1.clone(), backend.1.clone(), kept.1.clone()] };
    let (generation, decap) =
        (lb.1.join(lab::LB_IFACE).join("link"), backend.1.join(lab::BACKEND_IFACE).join("decap-link"));
    assert!(generation.exists(), "no generation pinned at {}", generation.display());
    assert!(decap.exists(), "no decapsulator pinned at {}", decap.display());
    for (ns, _) in [&lb, &backend] {
        ballast_test_support::ip(&["netns", "del", ns]).with_context(|| format!("deleting {ns} by hand"))?;
    }
    Ok((cleanup, [lb, backend, kept]))
}

#[test]
fn lab_down_removes_the_pins_of_namespaces_deleted_by_hand() -> anyhow::Result<()> {
    if !require_root("lab_down_removes_the_pins_of_namespaces_deleted_by_hand") {
        return Ok(());
    }
    let (_cleanup, namespaces) = up_then_delete_two_namespaces("tl-gone")?;
    let down = ballast(&["lab", "down", "--name", "tl-gone"])?.expect_success();
    for (ns, pins) in &namespaces {
        assert!(!pins.exists(), "`ballast lab down` left the pins of {ns} in {}: {down}", pins.display());
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} is still there: {down}");
    }
    Ok(())
}

#[test]
fn lab_status_says_a_deleted_namespace_left_pins() -> anyhow::Result<()> {
    if !require_root("lab_status_says_a_deleted_namespace_left_pins") {
        return Ok(());
    }
    let name = "tl-left";
    let (_cleanup, [(lb, lb_pins), (backend, backend_pins), (kept, _)]) = up_then_delete_two_namespaces(name)?;
    let status = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(status["state"], "up", "{status}");
    assert_eq!(namespace(&status, &kept)["exists"], true, "{status}");
    for (ns, pins) in [(&lb, &lb_pins), (&backend, &backend_pins)] {
        assert_eq!(namespace(&status, ns)["exists"], false, "{status}");
        assert_eq!(namespace(&status, ns)["pins"], true, "{status}");
        assert_eq!(
            namespace(&status, ns)["pin_dir"].as_str(),
            Some(pins.to_str().context("a pin directory that is not UTF-8")?),
            "{status}"
        );
    }
    let text = ballast(&["lab", "status", "--name", name])?.expect_success();
    assert!(text.stdout.contains(&format!("{lb} was deleted but left pins in {}", lb_pins.display())), "{text}");
    let down = ballast(&["lab", "down", "--name", name])?.expect_success();
    assert!(
        down.stdout.contains(&format!("already deleted (their pins removed all the same): {backend} {lb}")),
        "{down}"
    );
    let status = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(status["state"], "not up", "{status}");
    Ok(())
}

#[test]
fn lab_status_json_says_what_is_up() -> anyhow::Result<()> {
    if !require_root("lab_status_json_says_what_is_up") {
        return Ok(());
    }
    let name = "tl-json";
    let _nothing_left = lab::down(name);
    let absent = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(absent["state"], "not up", "{absent}");
    ballast(&["lab", "up", "--name", name, "--backends", "2"])?.expect_success();
    let _cleanup = Cleanup { name, pin_dirs: Vec::new() };
    let status = ballast(&["lab", "status", "--name", name, "--json"])?.expect_success().json()?;
    assert_eq!(status["name"], name);
    assert_eq!((status["load_balancers"].as_u64(), status["backends"].as_u64()), (Some(1), Some(2)), "{status}");
    assert_eq!(status["in_use_by"], serde_json::Value::Null, "a kept lab is in nobody's use: {status}");
    assert_eq!(status["namespaces"].as_array().map(Vec::len), Some(5), "{status}");
    let servers = status["servers"].as_array().with_context(|| format!("no server list in {status}"))?;
    assert_eq!(servers.len(), 2, "{status}");
    for server in servers {
        assert_eq!(server["server_running"], true, "{status}");
        assert_eq!(server["decapsulated"].as_u64(), Some(0), "{status}");
    }
    ballast(&["lab", "down", "--name", name])?.expect_success();
    Ok(())
}
