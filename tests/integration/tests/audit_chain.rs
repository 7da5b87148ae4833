//! The audit log's hash chain (README, "History and the audit log"), as the `ballast` command
//! line writes and checks it: real `attach`, `swap`, `rollback` and `detach` in a network
//! namespace write a log that `history --verify` passes; then each way of tampering with it
//! (an edited byte, a deleted, swapped or inserted entry, a truncated last line) is refused,
//! naming the entry where the chain breaks. Entries written before chaining began stay
//! unchained. The daemon's entries chain with the commands' (one append function). The kernel
//! tests need root; without it, it skips, unless CI is set. Needs
//! `target/debug/ballast` (`cargo build -p lb-userspace`).


use ballast::state::chain::link;
use ballast_test_support::{fixture, require_root};
use ballast_tests::cli::{Netns, Workspace};
use ballast_tests::daemon::{daemon_config, entries, wait_for, Fixture, Setup};
use serde_json::Value;

/// The load balancer's interface and its veth peer, both in the test's namespace.
const LB_IF: &str = "lb0";
const PEER_IF: &str = "cl0";

/// The daemon's labs `bl-acPID-TEST-*`: what a daemon may take to exit, and how long a scrape
/// may lack the kernel's side (as tests/daemon.rs allows).
const SETUP: Setup = Setup {
    prefix: "ac",
    exit_limit: std::time::Duration::from_secs(10),
    scrape_limit: std::time::Duration::from_secs(6),
};

/// `ballast history --verify --json` of `work`'s state directory: its exit code and report.
fn verify(work: &Workspace) -> (Option<i32>, Value) {
    let out = work.ballast(&["history", "--verify", "--json"]);
    let report = out.json().unwrap_or_else(|e| panic!("{e:#}"));
    (out.code(), report)
}

/// `history --verify`, which must find the chain intact; its report.
fn expect_intact(work: &Workspace) -> Value {
    let (code, report) = verify(work);
    assert_eq!(code, Some(0), "{report:#}");
    assert!(report["broken"].is_null(), "{report:#}");
    report
}

/// `history --verify` of a log whose lines are `lines`, which must find the chain broken at
/// line `line` as `kind`; the break as reported, after checking the text form says so too.
fn expect_broken(work: &Workspace, lines: &[String], kind: &str, line: u64) -> Value {
    let path = work.state_dir().join("audit.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let (code, report) = verify(work);
    assert_eq!(code, Some(1), "{report:#}");
    let broken = report["broken"].clone();
    assert_eq!((broken["kind"].as_str(), broken["line"].as_u64()), (Some(kind), Some(line)), "{report:#}");
    let text = work.ballast(&["history", "--verify"]);
    assert_eq!(text.code(), Some(1), "{text}");
    assert!(text.stdout.contains(&format!("FAIL {}", work.state_dir().join("audit.jsonl").display())), "{text}");
    assert!(text.stderr.contains(&format!("hash chain is broken at line {line} ")), "{text}");
    broken
}

/// The hash `sha256sum` (an independent implementation) gives the line `line`.
fn sha256sum(line: &str) -> String {
    ballast_test_support::sha256sum(line.as_bytes()).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn a_real_log_verifies_and_every_tampering_is_named() {
    if !require_root("a_real_log_verifies_and_every_tampering_is_named") {
        return;
    }
    let ns = Netns::create("achain");
    let work = ns.work().clone();
    ns.add_veth(LB_IF, None, &ns, PEER_IF, None);
    let gateway_mac = ns.mac(PEER_IF);
    let config = fixture("ipv4-one-vip").unwrap();
    let a = work.build("a", &config);
    let b = work.build("b", &config.replace("hash_seed = 1", "hash_seed = 2"));
    assert_ne!(a.digest, b.digest);

    // A log begun by a ballast without chaining: two entries without `prev`.
    let legacy = [
        r#"{"time":1700000000.0,"action":"attach","iface":"eth9","from":null,"to":null,"host":null,"result":"ok"}"#,
        r#"{"time":1700000001.0,"action":"detach","iface":"eth9","from":null,"to":null,"host":null,"result":"ok"}"#,
    ];
    std::fs::create_dir_all(work.state_dir()).unwrap();
    std::fs::write(work.state_dir().join("audit.jsonl"), format!("{}\n{}\n", legacy[0], legacy[1])).unwrap();
    let report = expect_intact(&work);
    assert_eq!((report["entries"].as_u64(), report["unchained"].as_u64()), (Some(2), Some(2)), "{report:#}");

    let on_lb = |args: &[&str]| ns.ballast(&[args, &["--iface", LB_IF]].concat());
    ns.attach(LB_IF, &a.path, &gateway_mac).expect_success();
    on_lb(&["swap", b.arg(), "--lineage-depth", "0"]).expect_success();
    on_lb(&["rollback", "--lineage-depth", "0"]).expect_success();
    on_lb(&["swap", b.arg(), "--lineage-depth", "0"]).expect_success();
    on_lb(&["detach"]).expect_success();

    let text = std::fs::read_to_string(work.state_dir().join("audit.jsonl")).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let actions: Vec<Value> =
        lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].clone()).collect();
    assert_eq!(actions[2..], ["attach", "swap", "rollback", "swap", "detach"], "{text}");
    // The first chained entry links to the last unchained one; each to the line before.
    for i in 2..lines.len() {
        let prev = serde_json::from_str::<Value>(&lines[i]).unwrap()["prev"].clone();
        assert_eq!(prev.as_str(), Some(sha256sum(&lines[i - 1]).as_str()), "line {}: {text}", i + 1);
    }
    let report = expect_intact(&work);
    let n = lines.len() as u64;
    assert_eq!(
        (report["entries"].as_u64(), report["unchained"].as_u64(), report["chain_begins_line"].as_u64()),
        (Some(n), Some(2), Some(3)),
        "{report:#}"
    );
    assert_eq!(report["head"].as_str(), Some(sha256sum(lines.last().unwrap()).as_str()), "{report:#}");
    let ok = work.ballast(&["history", "--verify"]).expect_success();
    assert!(ok.stdout.contains(&format!("{} chained entries intact", n - 2)), "{ok}");
    assert!(ok.stdout.contains("2 entries are unchained"), "{ok}");
    // The per-interface history is unchanged.
    let history = on_lb(&["history", "--json"]).expect_success().json().unwrap();
    assert_eq!(history.as_array().map(Vec::len), Some(lines.len() - 2), "{history:#}");

    // One byte of the swap's entry (line 4): its digest's first hex digit.
    let mut edited = lines.clone();
    let at = edited[3].find("\"to\":\"sha256:").unwrap() + "\"to\":\"sha256:".len();
    let digit = if edited[3].as_bytes()[at] == b'0' { "1" } else { "0" };
    edited[3].replace_range(at..at + 1, digit);
    let broken = expect_broken(&work, &edited, "changed_or_deleted", 5);
    assert_eq!(broken["index"].as_u64(), Some(4), "{broken:#}");
    assert_eq!(broken["action"].as_str(), Some("rollback"), "{broken:#}");
    assert_eq!(broken["found"].as_str(), Some(sha256sum(&lines[3]).as_str()), "{broken:#}");
    assert_eq!(broken["expected"].as_str(), Some(sha256sum(&edited[3]).as_str()), "{broken:#}");
    assert!(broken["message"].as_str().unwrap().contains("line 4 was changed"), "{broken:#}");

    // The swap's entry deleted: the rollback after it no longer follows the attach.
    let mut deleted = lines.clone();
    deleted.remove(3);
    let broken = expect_broken(&work, &deleted, "changed_or_deleted", 4);
    assert_eq!(broken["action"].as_str(), Some("rollback"), "{broken:#}");

    // The swap and the rollback swapped.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    let broken = expect_broken(&work, &swapped, "reordered", 4);
    assert_eq!(broken["action"].as_str(), Some("rollback"), "{broken:#}");

    // A forged rollback after the swap, linked to it as ballast would: the entry after the
    // forgery links to the swap, not to it.
    let mut forged: Value = serde_json::from_str(&lines[4]).unwrap();
    forged["prev"] = Value::from(link(lines[3].as_bytes()));
    let mut inserted = lines.clone();
    inserted.insert(4, forged.to_string());
    let broken = expect_broken(&work, &inserted, "inserted", 6);
    assert!(broken["message"].as_str().unwrap().contains("from line 5 to line 5 were inserted"), "{broken:#}");

    // The last line cut short.
    let mut truncated = lines.clone();
    let last = truncated.last_mut().unwrap();
    last.truncate(last.len() / 2);
    std::fs::write(work.state_dir().join("audit.jsonl"), truncated.join("\n")).unwrap();
    let (code, report) = verify(&work);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!((report["broken"]["kind"].as_str(), report["broken"]["line"].as_u64()), (Some("torn"), Some(n)));

    // The log as ballast wrote it verifies again.
    std::fs::write(work.state_dir().join("audit.jsonl"), &text).unwrap();
    expect_intact(&work);
}

#[test]
fn verify_needs_no_interface_and_takes_none() {
    let work = Workspace::new("achain-args");
    let report = expect_intact(&work);
    assert_eq!(report["entries"].as_u64(), Some(0), "{report:#}");
    // Without --verify, history still needs --iface; with it, --iface is refused.
    assert_eq!(work.ballast(&["history"]).code(), Some(2));
    assert_eq!(work.ballast(&["history", "--verify", "--iface", "eth0"]).code(), Some(2));
}

#[test]
fn the_daemons_entries_chain_with_the_commands() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "daemon", 4, &[1, 2, 3])? else { return Ok(()) };
    // A reload swaps in a new generation; the daemon audits it.
    f.write_config(&daemon_config(&[1, 2, 3, 4]))?;
    wait_for("the reload in the audit log", SETUP.scrape_limit, || {
        Ok((!entries(&f.history()?, "reload").is_empty()).then_some(()))
    })?;
    f.stop_daemon()?;
    // An operator's command after the daemon's entries.
    f.ballast_on_lb(&["rollback", "--lineage-depth", "0"])?;
    let history = f.history()?;
    let actions: Vec<&str> = history.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions.first(), Some(&"start"), "{history:#?}");
    assert_eq!(actions.last(), Some(&"rollback"), "{history:#?}");
    let report: Value = serde_json::from_str(&f.lab.ballast(&["history", "--verify", "--json"])?)?;
    assert!(report["broken"].is_null(), "{report:#}");
    assert_eq!(report["unchained"].as_u64(), Some(0), "{report:#}");
    assert!(report["entries"].as_u64() >= Some(history.len() as u64), "{report:#}");
    Ok(())
}
