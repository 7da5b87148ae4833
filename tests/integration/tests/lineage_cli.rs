//! Lineage generations through the command line, as an operator makes them: `ballast build
//! --after` (build once for a fleet), `ballast swap` deriving one from what runs, `inspect` and
//! `status` showing it, `verify` proving it from the kernel, `swap --settle` ending it, and bad
//! input to all of these refused without changing anything.
use ballast::generation::lineage::MAX_DEPTH;
use ballast_test_support::require_root;
use ballast_tests::cli::{utf8, Artifact, Netns, Workspace, SOME_GATEWAY_MAC};
use serde_json::Value;

const LB_IF: &str = "lb0";
const PEER_IF: &str = "lb0p";

/// The web VIP with backends 10.1.0.1 to 10.1.0.N.
fn web(backends: usize) -> String {
    let list: Vec<String> = (1..=backends).map(|i| format!("{{ address = \"10.1.0.{i}\" }}")).collect();
    format!(
        "hash_seed = 7\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1021\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// `ballast build CONFIG --after PREV -o NAME.bal --json`, which must succeed: its output.
fn build_after(work: &Workspace, name: &str, backends: usize, previous: &Artifact) -> (Artifact, Value) {
    let config = work.write(&format!("{name}.toml"), web(backends));
    let path = work.path(&format!("{name}.bal"));
    let out = work
        .ballast(&["build", utf8(&config), "--after", previous.arg(), "-o", utf8(&path), "--json"])
        .expect_success();
    let json = out.json().unwrap_or_else(|e| panic!("{e:#}"));
    let digest = json["digest"].as_str().unwrap_or_else(|| panic!("no digest: {json}")).to_owned();
    (Artifact { path, digest }, json)
}

#[test]
fn build_after_is_deterministic_chains_and_inspect_shows_it() {
    let work = Workspace::new("lineage-build");
    let three = work.build("three", &web(3));
    let four = work.build("four", &web(4));
    let (after, json) = build_after(&work, "after", 4, &three);
    let (again, _) = build_after(&work, "again", 4, &three);
    assert_eq!(after.digest, again.digest, "same config after the same predecessor: same digest");
    assert_eq!(std::fs::read(&after.path).unwrap(), std::fs::read(&again.path).unwrap(), "and the same bytes");
    assert_ne!(after.digest, four.digest);
    let lineage = &json["lineage"];
    assert_eq!(lineage["predecessors"], serde_json::json!([three.digest]), "{json}");
    assert_eq!(lineage["settled"], four.digest.as_str(), "the settled form is the plain build: {json}");
    let changed = lineage["changed_slots"].as_u64().unwrap();
    assert!((150..400).contains(&changed), "a 4th backend takes about a quarter of 1021 slots: {changed}");
    assert_eq!(lineage["slots_with_hops"].as_u64(), Some(changed), "each moved slot keeps its previous owner");

    let inspected = work.ballast(&["inspect", after.arg(), "--json"]).expect_success().json().unwrap();
    assert_eq!(inspected["digest"], after.digest.as_str());
    assert_eq!(inspected["lineage"], *lineage);
    let text = work.ballast(&["inspect", after.arg()]).expect_success();
    assert!(text.stdout.contains("lineage") && text.stdout.contains(&three.digest), "{text}");
    // A plain artifact has none.
    assert!(work.ballast(&["inspect", four.arg(), "--json"]).expect_success().json().unwrap()["lineage"].is_null());

    // Built after a lineage generation: both predecessors, newest first.
    let (chained, json) = build_after(&work, "chained", 3, &after);
    assert_eq!(json["lineage"]["predecessors"], serde_json::json!([after.digest, three.digest]), "{json}");
    assert!(work.ballast(&["inspect", chained.arg()]).success());
}

#[test]
fn bad_predecessors_and_depths_are_refused_and_write_nothing() {
    let work = Workspace::new("lineage-bad");
    let three = work.build("three", &web(3));
    let config = work.write("four.toml", web(4));
    let output = work.path("out.bal");
    let missing = work.path("missing.bal");
    let mut damaged = std::fs::read(&three.path).unwrap();
    damaged[40] ^= 0x55;
    let damaged = work.write("damaged.bal", damaged);
    let depth = (MAX_DEPTH + 1).to_string();
    let cases: [(&str, Vec<&str>, &str); 4] = [
        ("a missing predecessor", vec!["--after", utf8(&missing)], "--after"),
        ("a config as predecessor", vec!["--after", utf8(&config)], "--after"),
        ("a damaged predecessor", vec!["--after", utf8(&damaged)], "digest mismatch"),
        ("a depth past the limit", vec!["--after", three.arg(), "--lineage-depth", &depth], "lineage depth"),
    ];
    for (what, extra, says) in cases {
        let out = work.ballast(&[&["build", utf8(&config), "-o", utf8(&output)][..], &extra].concat());
        assert!(!out.success(), "{what} was accepted: {out}");
        assert!(out.stderr.contains(says), "{what}: the error should say {says:?}: {out}");
        assert!(!output.exists(), "{what}: an artifact was written");
    }
    let out = work.ballast(&["build", utf8(&config), "-o", utf8(&output), "--lineage-depth", "2"]);
    assert_eq!(out.code(), Some(2), "--lineage-depth without --after is a usage error: {out}");
}

fn status(netns: &Netns) -> Value {
    netns.status(LB_IF).0
}

#[test]
fn swap_derives_from_what_runs_verify_proves_it_and_settle_ends_it() {
    if !require_root("swap_derives_from_what_runs_verify_proves_it_and_settle_ends_it") {
        return;
    }
    let netns = Netns::create("lin");
    netns.add_veth(LB_IF, None, &netns, PEER_IF, None);
    let work = netns.work();
    let three = work.build("three", &web(3));
    let four = work.build("four", &web(4));
    netns.attach(LB_IF, &three.path, SOME_GATEWAY_MAC).expect_success();
    assert!(status(&netns)["lineage"].is_null());

    let out = netns.ballast(&["swap", four.arg(), "--iface", LB_IF]).expect_success();
    assert!(out.stdout.contains("lineage:") && out.stdout.contains("slots changed owner"), "{out}");
    // Pre-flight: four SYNs, and one ACK to a changed slot that must leave in GUE.
    assert!(out.stdout.contains("pre-flight 5 packets ok"), "{out}");
    let running = status(&netns);
    let lineage = &running["lineage"];
    assert_eq!(lineage["predecessors"], serde_json::json!([three.digest]), "{running:#}");
    assert_eq!(lineage["settled"], four.digest.as_str());
    assert_ne!(running["generation"], four.digest.as_str(), "what runs is four built after three");
    // The kernel's LINEAGES agree with what `build --after` makes of the same pair.
    let (built, json) = build_after(work, "built", 4, &three);
    assert_eq!(running["generation"], built.digest.as_str(), "swap and build --after derive the same generation");
    assert_eq!(lineage["slots_with_hops"], json["lineage"]["slots_with_hops"]);
    let verify = netns.ballast(&["verify", "--iface", LB_IF]).expect_success();
    assert!(verify.stdout.contains("LINEAGES hash to the recorded digest"), "{verify}");

    // A rollback returns to three's config built after what runs: the connections that
    // moved to 10.1.0.4 meanwhile keep it as their hop.
    netns.ballast(&["rollback", "--iface", LB_IF]).expect_success();
    let back = status(&netns);
    assert_eq!(back["lineage"]["settled"], three.digest.as_str(), "{back:#}");
    assert_eq!(back["lineage"]["predecessors"], serde_json::json!([running["generation"], three.digest]));
    netns.ballast(&["swap", four.arg(), "--iface", LB_IF, "--lineage-depth", "1"]).expect_success();
    let running = status(&netns);
    assert_eq!(running["lineage"]["predecessors"], serde_json::json!([back["generation"]]), "depth 1: {running:#}");

    // Swapping the same config again changes nothing.
    let again = netns.ballast(&["swap", four.arg(), "--iface", LB_IF]).expect_success();
    assert_eq!(status(&netns)["generation"], running["generation"], "{again}");

    let settled = netns.ballast(&["swap", "--settle", "--iface", LB_IF]).expect_success();
    let now = status(&netns);
    assert!(now["lineage"].is_null(), "{settled}\n{now:#}");
    assert_eq!(now["generation"], four.digest.as_str(), "settled: the plain build of the config");
    let history = netns.ballast(&["history", "--iface", LB_IF, "--json"]).expect_success().json().unwrap();
    assert!(history.as_array().unwrap().iter().any(|e| e["action"] == "settle"), "{history:#}");

    let twice = netns.ballast(&["swap", "--settle", "--iface", LB_IF]);
    assert!(!twice.success() && twice.stderr.contains("settled already"), "{twice}");
    assert_eq!(status(&netns)["generation"], four.digest.as_str(), "a refused settle changes nothing");

    // --lineage-depth 0 swaps the artifact exactly as given.
    netns.ballast(&["swap", three.arg(), "--iface", LB_IF, "--lineage-depth", "0"]).expect_success();
    assert_eq!(status(&netns)["generation"], three.digest.as_str());
    // An artifact built after another generation than the one that runs keeps its lineage,
    // and the swap says so.
    let (stale, _) = build_after(work, "stale", 3, &four);
    let warned = netns.ballast(&["swap", stale.arg(), "--iface", LB_IF]).expect_success();
    assert!(warned.stdout.contains("WARNING") && warned.stdout.contains(&four.digest), "{warned}");
    assert_eq!(status(&netns)["generation"], stale.digest.as_str());
}
