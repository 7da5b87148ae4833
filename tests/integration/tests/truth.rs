//! The truth about what runs: every reader (`verify`, `status`, `swap`, `rollback`, `attach`,
//! `detach`) checks with the kernel that the pinned link still serves the named interface of
//! the named network namespace, and says so; `attach` replaces a dead link. A program that is
//! not the one this ballast carries is refused unless allowed, and `verify` compares the
//! running program's instructions (the kernel's tag) with what the recorded artifact loads
//! to. Lost state is adopted from the kernel, not answered with circular advice; host
//! parameters follow the interface at every swap; foot-guns (unusable gateway MACs, an
//! every-port VIP on a host address) are refused.
//!
//! Each test has its own state directory and network namespace (`bt-<tag><pid>`), which the
//! guard detaches and deletes when dropped. No traffic leaves the namespace: frames are run
//! through the live program with BPF_PROG_TEST_RUN. Needs root (skips without it unless CI
//! is set) and `target/debug/ballast`; `bpftool` for the detached-link test.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use ballast::generation::artifact::Artifact as BallastArtifact;
use ballast::generation::config::Config;
use ballast::generation::program::LOAD_BALANCER;
use ballast::generation::Generation;
use ballast::kernel::loader::LoadedGeneration;
use ballast::kernel::running::{LinkState, Running};
use ballast_test_support::{fixture, require_root, run};
use ballast_tests::cli::{exit, Artifact, Netns, Workspace};
use ballast_tests::{IcmpAnswer, Packet, TcpFlags};
use ballast_tests::{ETHERNET_HEADER_LEN, XDP_DROP, XDP_TX};
use serde_json::Value;

const LB_IF: &str = "lb0";
const PEER_IF: &str = "cl0";
const LB_ADDR: &str = "10.200.0.1";
const PEER_ADDR: &str = "10.200.0.2";
/// The VIP of `tests/fixtures/ipv4-one-vip.toml`.
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The client address of the test frames.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const VIP_PORT: u16 = 80;

/// A load balancer namespace with `LB_IF` and its veth peer `PEER_IF` beside it, addressed.
struct Lab {
    lb: Netns,
    gateway_mac: String,
    work: Arc<Workspace>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let work = Arc::new(Workspace::new(tag));
        let lb = Netns::create_in(tag, &work);
        lb.add_veth(LB_IF, Some(&format!("{LB_ADDR}/24")), &lb, PEER_IF, Some(&format!("{PEER_ADDR}/24")));
        let gateway_mac = lb.mac(PEER_IF);
        Lab { lb, gateway_mac, work }
    }

    fn build(&self, name: &str, toml: &str) -> Artifact {
        self.work.build(name, toml)
    }

    /// `ballast args --iface LB_IF --netns LB`; the caller judges the outcome.
    fn lb(&self, args: &[&str]) -> ballast_test_support::Output {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--iface", LB_IF]);
        self.lb.ballast(&full)
    }

    fn attach(&self, artifact: &Artifact) -> ballast_test_support::Output {
        self.lb(&["attach", "--config", artifact.arg(), "--gateway-mac", &self.gateway_mac])
    }

    fn status_json(&self) -> anyhow::Result<Value> {
        self.lb(&["status", "--json"]).expect_success().json().context("reading `ballast status --json`")
    }

    fn record_path(&self) -> PathBuf {
        self.work.state_dir().join("ifaces").join(self.lb.key(LB_IF)).join("record.json")
    }

    fn history(&self) -> String {
        self.lb(&["history"]).expect_success().stdout
    }

    /// The running program of LB_IF, read in the namespace.
    fn with_running<T: Send>(&self, work: impl FnOnce(&Running) -> T + Send) -> anyhow::Result<T> {
        let running = self.lb.inside(|| Running::read(LB_IF).map(|running| work(&running)));
        running.with_context(|| format!("reading the program running on {LB_IF}"))
    }

    /// One frame through the running program: (action, output).
    fn test_run(&self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.with_running(|running| running.test_run(frame))?.context("running a frame through the running program")
    }

    /// `verify`, which must pass.
    fn expect_verified(&self) {
        let out = self.lb(&["verify"]);
        assert!(out.success() && out.stdout.contains("runs as recorded"), "verify must pass: {out}");
    }

    /// `verify`, which must fail, its failing checks naming all of `names` and its output all
    /// of `mentions`.
    fn expect_verify_fails(&self, names: &[&str], mentions: &[&str]) -> ballast_test_support::Output {
        let out = self.lb(&["verify"]);
        assert!(out.refused(), "verify must fail: {out}");
        for name in names {
            assert!(out.stdout.contains(&format!("FAIL {name}")), "verify must fail `{name}`: {out}");
            assert!(out.stderr.contains(name), "verify's error must name `{name}`: {out}");
        }
        for text in mentions {
            assert!(out.stdout.contains(text), "verify must say `{text}`: {out}");
        }
        out
    }

    /// `status` in text and JSON must say the generation does not serve, and why (`why`).
    fn expect_not_serving(&self, state: &str, why: &str) {
        let text = self.lb(&["status"]).expect_success();
        assert!(text.stdout.contains("NOT SERVING") && text.stdout.contains(why), "status: {text}");
        let json = self.status_json().unwrap_or_else(|err| panic!("{err:#}"));
        assert_eq!(json["serving"], false, "{json}");
        assert_eq!(json["link"]["state"], state, "{json}");
        assert!(json["problem"].as_str().is_some_and(|p| p.contains(why)), "{json}");
    }

    /// `swap` and `rollback` must refuse a dead link, saying `ballast attach` replaces it.
    fn expect_swap_refused_as_dead(&self, artifact: &Artifact) {
        for out in
            [self.lb(&["swap", artifact.arg(), "--lineage-depth", "0"]), self.lb(&["rollback", "--lineage-depth", "0"])]
        {
            assert_eq!(out.code(), Some(exit::NOT_ATTACHED), "{out}");
            assert!(out.stderr.contains("is dead") && out.stderr.contains("`ballast attach"), "{out}");
        }
    }
}

fn one_vip() -> anyhow::Result<String> {
    fixture("ipv4-one-vip").context("reading the fixture ipv4-one-vip")
}

/// The one-VIP config with another backend set: another generation.
fn one_vip_two_backends() -> anyhow::Result<String> {
    let one_vip = one_vip()?;
    let text = one_vip.replace("table_size = 101", "table_size = 211").replace(
        r#"backends = [{ address = "10.1.0.1" }]"#,
        r#"backends = [{ address = "10.1.0.1" }, { address = "10.1.0.2" }]"#,
    );
    assert_ne!(text, one_vip, "the fixture changed: adapt this test");
    Ok(text)
}

fn vip_frame(sport: u16, payload: usize) -> Vec<u8> {
    Packet::tcp(CLIENT.into(), VIP.into(), sport, VIP_PORT, TcpFlags::SYN).with_payload_len(payload).frame()
}

/// A frame to no VIP: the load balancer passes it.
fn other_frame() -> Vec<u8> {
    let other: IpAddr = Ipv4Addr::new(198, 18, 0, 99).into();
    Packet::tcp(CLIENT.into(), other, 1000, 22, TcpFlags::SYN).frame()
}

fn vip_packets(status: &Value) -> u64 {
    status["vips"][0]["packets"].as_u64().unwrap_or_else(|| panic!("no VIP packets in {status}"))
}

// ---------------------------------------------------------------------------------------------
// The ELF of the embedded program, altered two ways

/// (offset, size) of the section `name` of an ELF64 little-endian object (None: there is
/// none); Err if the object ends before a field this reads.
fn elf_section(elf: &[u8], name: &str) -> anyhow::Result<Option<(usize, usize)>> {
    // The little-endian field of `len` (2, 4 or 8) bytes at `at`.
    let field = |at: usize, len: usize| -> anyhow::Result<usize> {
        let bytes = elf.get(at..at + len).with_context(|| format!("the ELF ends before its field at {at:#x}"))?;
        let mut word = [0; 8];
        word[..len].copy_from_slice(bytes);
        usize::try_from(u64::from_le_bytes(word)).with_context(|| format!("the ELF field at {at:#x} as a usize"))
    };
    let (shoff, shentsize, shnum, shstrndx) = (field(0x28, 8)?, field(0x3a, 2)?, field(0x3c, 2)?, field(0x3e, 2)?);
    let header = |i: usize| shoff + i * shentsize;
    let names = field(header(shstrndx) + 0x18, 8)?;
    for h in (0..shnum).map(header) {
        let start = names + field(h, 4)?;
        let Some(len) = elf[start..].iter().position(|b| *b == 0) else { continue };
        if &elf[start..start + len] == name.as_bytes() {
            return Ok(Some((field(h + 0x18, 8)?, field(h + 0x20, 8)?)));
        }
    }
    Ok(None)
}

/// The embedded program with one letter of its debug strings changed: other bytes, same code.
fn program_with_other_debug_strings() -> anyhow::Result<Vec<u8>> {
    let mut elf = LOAD_BALANCER.to_vec();
    let (offset, size) = [".debug_str", ".debug_info", ".debug_line", ".comment"]
        .iter()
        .find_map(|name| elf_section(&elf, name).transpose())
        .transpose()?
        .context("the embedded program has no debug section to alter")?;
    let letter = elf[offset..offset + size]
        .iter()
        .position(u8::is_ascii_alphabetic)
        .context("the embedded program's debug section has no letter to alter")?
        + offset;
    elf[letter] ^= 0x20;
    assert_ne!(elf, LOAD_BALANCER);
    Ok(elf)
}

/// The embedded program with every `r0 = XDP_PASS` turned into `r0 = XDP_DROP`: other code,
/// which the verifier accepts and whose forwarding path is unchanged.
fn program_that_drops_what_it_should_pass() -> anyhow::Result<Vec<u8>> {
    let mut elf = LOAD_BALANCER.to_vec();
    let (offset, size) = elf_section(&elf, "xdp")?.context("the embedded program has no `xdp` section")?;
    let pass = [0xb7, 0, 0, 0, 2, 0, 0, 0];
    let mut changed = 0;
    for at in (offset..offset + size).step_by(8) {
        if elf[at..at + 8] == pass {
            elf[at + 4] = XDP_DROP as u8;
            changed += 1;
        }
    }
    assert!(changed > 0, "no `r0 = XDP_PASS` in the program to alter");
    Ok(elf)
}

/// `config` built with `program` (the digest recomputed over it), written to NAME.bal.
fn foreign_artifact(lab: &Lab, name: &str, config: &str, program: &[u8]) -> anyhow::Result<Artifact> {
    let config = Config::from_toml_str(config).with_context(|| format!("parsing the config of {name}"))?;
    let artifact = BallastArtifact::build(&config, program).with_context(|| format!("building {name}"))?;
    let path = lab.work.path(&format!("{name}.bal"));
    artifact.write(&path).with_context(|| format!("writing {}", path.display()))?;
    Ok(Artifact { path, digest: artifact.digest_string() })
}

// ---------------------------------------------------------------------------------------------
// Dead links

#[test]
fn a_link_detached_behind_ballasts_back_is_reported_refused_and_replaced_keeping_its_counters() -> anyhow::Result<()> {
    if !require_root("a_link_detached_behind_ballasts_back_is_reported_refused_and_replaced_keeping_its_counters") {
        return Ok(());
    }
    let lab = Lab::new("trdet");
    let artifact = lab.build("one", &one_vip()?);
    lab.attach(&artifact).expect_success();
    assert!(lab.with_running(Running::is_serving)?);
    assert_eq!(lab.test_run(&vip_frame(1000, 0))?.0, XDP_TX);
    let counted = vip_packets(&lab.status_json()?);
    assert!(counted >= 1, "the probe frame counts");
    let link_id = lab.status_json()?["link_id"].as_u64().unwrap().to_string();
    let out = run(Command::new("bpftool").args(["link", "detach", "id", &link_id])).unwrap();
    assert!(out.success(), "{out}");

    assert_eq!(lab.lb.xdp_program_id(LB_IF), None, "the kernel detached it: nothing forwards");
    assert_eq!(lab.with_running(|r| r.link.clone())?, LinkState::Detached);
    lab.expect_verify_fails(&["link"], &["detached"]);
    lab.expect_not_serving("detached", "detached");
    lab.expect_swap_refused_as_dead(&artifact);

    let out = lab.attach(&artifact).expect_success();
    assert!(out.stdout.contains("replaced the dead link"), "{out}");
    assert!(lab.lb.xdp_program_id(LB_IF).is_some(), "attached again");
    lab.expect_verified();
    assert!(vip_packets(&lab.status_json()?) >= counted, "the counters stay");
    assert!(lab.history().contains("replace-dead-link"), "audited as a replacement");
    // Serving again: attach refuses and says swap.
    let out = lab.attach(&artifact);
    assert_eq!(out.code(), Some(exit::ALREADY_ATTACHED), "{out}");
    assert!(out.stderr.contains("ballast swap"), "{out}");
    Ok(())
}

#[test]
fn a_renamed_interface_is_not_served_by_its_name() -> anyhow::Result<()> {
    if !require_root("a_renamed_interface_is_not_served_by_its_name") {
        return Ok(());
    }
    let lab = Lab::new("trren");
    let artifact = lab.build("one", &one_vip()?);
    lab.attach(&artifact).expect_success();
    lab.lb.ip(&["link", "set", LB_IF, "name", "lb9"]);
    lab.expect_verify_fails(&["link"], &["named lb9"]);
    lab.expect_not_serving("elsewhere", "named lb9");
    lab.expect_swap_refused_as_dead(&artifact);
    lab.lb.ip(&["link", "set", "lb9", "name", LB_IF]);
    lab.expect_verified();
    Ok(())
}

#[test]
fn a_deleted_and_recreated_interface_is_not_served_until_attach_replaces_the_link() -> anyhow::Result<()> {
    if !require_root("a_deleted_and_recreated_interface_is_not_served_until_attach_replaces_the_link") {
        return Ok(());
    }
    let lab = Lab::new("trrec");
    let artifact = lab.build("one", &one_vip()?);
    lab.attach(&artifact).expect_success();
    lab.lb.ip(&["link", "del", LB_IF]);
    lab.lb.add_veth(LB_IF, Some(&format!("{LB_ADDR}/24")), &lab.lb, PEER_IF, None);
    lab.expect_verify_fails(&["link"], &["detached"]);
    lab.expect_not_serving("detached", "detached");
    lab.expect_swap_refused_as_dead(&artifact);
    lab.attach(&artifact).expect_success();
    lab.expect_verified();
    Ok(())
}

#[test]
fn an_interface_moved_to_another_namespace_is_not_served_here() -> anyhow::Result<()> {
    if !require_root("an_interface_moved_to_another_namespace_is_not_served_here") {
        return Ok(());
    }
    let lab = Lab::new("trmov");
    let elsewhere = Netns::create_in("trmov2", &lab.work);
    let artifact = lab.build("one", &one_vip()?);
    lab.attach(&artifact).expect_success();
    lab.lb.ip(&["link", "set", LB_IF, "netns", elsewhere.name()]);
    assert!(elsewhere.xdp_program_id(LB_IF).is_some(), "the program went with the interface");
    lab.expect_verify_fails(&["link"], &["not in this network namespace"]);
    lab.expect_not_serving("elsewhere", "no interface lb0 here");
    lab.expect_swap_refused_as_dead(&artifact);

    // A new interface of the same name here: still not served, until attach replaces the link.
    lab.lb.add_veth(LB_IF, None, &lab.lb, "cl1", None);
    lab.expect_verify_fails(&["link"], &["another network namespace"]);
    lab.expect_swap_refused_as_dead(&artifact);
    lab.attach(&artifact).expect_success();
    lab.expect_verified();
    assert_eq!(elsewhere.xdp_program_id(LB_IF), None, "the moved interface's link was the one replaced");
    Ok(())
}

#[test]
fn running_read_reports_nothing_pinned_as_not_attached_and_a_live_link_as_serving() -> anyhow::Result<()> {
    if !require_root("running_read_reports_nothing_pinned_as_not_attached_and_a_live_link_as_serving") {
        return Ok(());
    }
    let lab = Lab::new("trapi");
    let err = lab.lb.inside(|| Running::read(LB_IF).err().expect("nothing is pinned"));
    assert!(matches!(err.root(), ballast::Error::NotAttached(_)), "{err}");
    lab.attach(&lab.build("one", &one_vip()?)).expect_success();
    let (serving, problem) = lab.with_running(|r| (r.is_serving(), r.problem(LB_IF)))?;
    assert!(serving && problem.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Foreign programs

#[test]
fn a_program_that_is_not_ballasts_own_is_flagged_and_refused_unless_allowed() -> anyhow::Result<()> {
    if !require_root("a_program_that_is_not_ballasts_own_is_flagged_and_refused_unless_allowed") {
        return Ok(());
    }
    let lab = Lab::new("trfor");
    let own = lab.build("own", &one_vip()?);
    let foreign = foreign_artifact(&lab, "foreign", &one_vip_two_backends()?, &program_with_other_debug_strings()?)?;

    let out = lab.work.ballast(&["inspect", own.arg(), "--json"]).expect_success();
    assert_eq!(out.json().unwrap()["program_is_embedded"], true, "{out}");
    let out = lab.work.ballast(&["inspect", foreign.arg(), "--json"]).expect_success();
    assert_eq!(out.json().unwrap()["program_is_embedded"], false, "{out}");
    let out = lab.work.ballast(&["inspect", foreign.arg()]).expect_success();
    assert!(out.stdout.contains("NOT this ballast's program"), "{out}");
    let out = lab.work.ballast(&["inspect", own.arg()]).expect_success();
    assert!(out.stdout.contains("this ballast's own program"), "{out}");

    let out = lab.attach(&foreign);
    assert_eq!(out.code(), Some(exit::ARTIFACT), "{out}");
    assert!(out.stderr.contains("--allow-foreign-program"), "{out}");
    assert_eq!(lab.lb(&["status"]).code(), Some(exit::NOT_ATTACHED), "nothing was attached");

    lab.attach(&own).expect_success();
    let out = lab.lb(&["swap", foreign.arg(), "--lineage-depth", "0"]);
    assert_eq!(out.code(), Some(exit::ARTIFACT), "{out}");
    assert!(out.stderr.contains("--allow-foreign-program"), "{out}");
    lab.lb(&["swap", foreign.arg(), "--allow-foreign-program", "--lineage-depth", "0"]).expect_success();
    // Same code, other bytes: the instructions are what the recorded artifact loads to.
    lab.expect_verified();
    lab.lb(&["rollback", "--lineage-depth", "0"]).expect_success();
    let out = lab.lb(&["rollback", "--lineage-depth", "0", "--to", &foreign.digest]);
    assert_eq!(out.code(), Some(exit::ARTIFACT), "rolling back to a foreign program needs the flag too: {out}");
    lab.lb(&["rollback", "--lineage-depth", "0", "--to", &foreign.digest, "--allow-foreign-program"]).expect_success();

    // attach with the flag, once the interface is free.
    lab.lb(&["detach"]).expect_success();
    let allowed =
        lab.lb(&["attach", "--config", foreign.arg(), "--gateway-mac", &lab.gateway_mac, "--allow-foreign-program"]);
    allowed.expect_success();
    Ok(())
}

#[test]
fn verify_catches_a_running_program_whose_instructions_are_not_the_recorded_artifacts() -> anyhow::Result<()> {
    if !require_root("verify_catches_a_running_program_whose_instructions_are_not_the_recorded_artifacts") {
        return Ok(());
    }
    let lab = Lab::new("trtag");
    let own = lab.build("own", &one_vip()?);
    lab.attach(&own).expect_success();
    lab.expect_verified();
    assert_eq!(lab.test_run(&other_frame())?.0, ballast_tests::XDP_PASS);

    // Behind ballast's back: the same digest in .rodata, the same maps (read back from the
    // kernel), the same host parameters, other instructions.
    let pin = lab.status_json()?["pin_dir"].as_str().map(PathBuf::from).unwrap().join("link");
    let (config, impostor_program) = (one_vip()?, program_that_drops_what_it_should_pass()?);
    lab.lb.inside(|| {
        let running = Running::read(LB_IF).unwrap();
        let tables = running.tables().unwrap();
        let mut generation = Generation::build(&Config::from_toml_str(&config).unwrap()).unwrap();
        generation.vip_index.slots = tables.vip_slots;
        generation.vip_index.seed = u32::from_ne_bytes(running.global("VIP_INDEX_SEED").unwrap().try_into().unwrap());
        generation.backends = tables.backends;
        generation.maglev = tables.maglev;
        let impostor =
            BallastArtifact { generation, program: impostor_program, digest: running.digest.unwrap(), lineage: None };
        let mut loaded = LoadedGeneration::load_artifact(&impostor, &running.host().unwrap(), None).unwrap();
        loaded.replace_on(FdLink::from(PinnedLink::from_pin(&pin).unwrap())).unwrap();
    });
    assert_eq!(lab.test_run(&other_frame())?.0, XDP_DROP, "the impostor runs");
    assert_eq!(lab.status_json()?["generation"], own.digest, "and claims the recorded digest");
    let out = lab.expect_verify_fails(&["program"], &["NOT what the recorded artifact loads to"]);
    assert!(out.stdout.contains("ok   running digest") && out.stdout.contains("ok   config maps"), "{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lost state

#[test]
fn swap_adopts_a_generation_running_without_a_record_and_keeps_its_counters() -> anyhow::Result<()> {
    if !require_root("swap_adopts_a_generation_running_without_a_record_and_keeps_its_counters") {
        return Ok(());
    }
    let lab = Lab::new("tradopt");
    let first = lab.build("first", &one_vip()?);
    let second = lab.build("second", &one_vip_two_backends()?);
    lab.attach(&first).expect_success();
    assert_eq!(lab.test_run(&vip_frame(1000, 0))?.0, XDP_TX);
    let counted = vip_packets(&lab.status_json()?);

    // The whole state directory is lost.
    std::fs::remove_dir_all(lab.work.state_dir()).unwrap();
    let out = lab.attach(&first);
    assert!(out.refused() && out.stderr.contains("ballast swap"), "attach on a live generation says swap: {out}");
    let out = lab.lb(&["swap", second.arg(), "--lineage-depth", "0"]).expect_success();
    assert!(out.stdout.contains(&format!("adopted {}", first.digest)), "{out}");
    lab.expect_verified();
    assert!(vip_packets(&lab.status_json()?) >= counted, "the VIP kept its counter slot");
    let history = lab.history();
    assert!(history.contains("adopt") && history.contains("swap"), "{history}");
    // The adopted generation's host parameters came from the kernel.
    let record: Value = serde_json::from_str(&std::fs::read_to_string(lab.record_path()).unwrap()).unwrap();
    assert_eq!(record["host"]["gateway_mac"], lab.gateway_mac.as_str(), "{record}");
    Ok(())
}

#[test]
fn swap_and_rollback_adopt_past_a_corrupt_or_missing_record() -> anyhow::Result<()> {
    if !require_root("swap_and_rollback_adopt_past_a_corrupt_or_missing_record") {
        return Ok(());
    }
    let lab = Lab::new("trcor");
    let first = lab.build("first", &one_vip()?);
    let second = lab.build("second", &one_vip_two_backends()?);
    lab.attach(&first).expect_success();
    lab.lb(&["swap", second.arg(), "--lineage-depth", "0"]).expect_success();

    std::fs::write(lab.record_path(), "{ this is not a record").unwrap();
    let out = lab.lb(&["verify"]);
    assert!(out.refused() && out.stdout.contains("FAIL record") && out.stdout.contains("unreadable"), "{out}");
    let out = lab.lb(&["swap", first.arg(), "--lineage-depth", "0"]).expect_success();
    assert!(out.stdout.contains("adopted") && out.stdout.contains("unreadable"), "{out}");
    lab.expect_verified();

    // Record gone, artifacts kept: rollback adopts, and --to finds a kept generation.
    std::fs::remove_file(lab.record_path()).unwrap();
    let out = lab.lb(&["rollback", "--lineage-depth", "0", "--to", &second.digest]).expect_success();
    assert!(out.stdout.contains("adopted"), "{out}");
    assert_eq!(lab.status_json()?["generation"], second.digest);
    lab.expect_verified();
    Ok(())
}

#[test]
fn detach_works_without_a_record_with_a_corrupt_one_and_without_a_link() -> anyhow::Result<()> {
    if !require_root("detach_works_without_a_record_with_a_corrupt_one_and_without_a_link") {
        return Ok(());
    }
    let lab = Lab::new("trdetach");
    let artifact = lab.build("one", &one_vip()?);
    let pin_dir = || lab.lb.pin_root().join(LB_IF);

    lab.attach(&artifact).expect_success();
    std::fs::write(lab.record_path(), "garbage").unwrap();
    lab.lb(&["detach"]).expect_success();
    assert!(!pin_dir().exists() && lab.lb.xdp_program_id(LB_IF).is_none(), "detached");
    assert!(!lab.record_path().exists(), "the corrupt record went too");

    lab.attach(&artifact).expect_success();
    std::fs::remove_dir_all(lab.work.state_dir()).unwrap();
    lab.lb(&["detach"]).expect_success();
    assert!(!pin_dir().exists() && lab.lb.xdp_program_id(LB_IF).is_none(), "detached");

    // Pins without a link (the link unpinned by hand): detach removes what is left.
    lab.attach(&artifact).expect_success();
    std::fs::remove_file(pin_dir().join("link")).unwrap();
    lab.lb(&["detach"]).expect_success();
    assert!(!pin_dir().exists(), "the counters' pins went too: {:?}", ballast_tests::cli::tree(&pin_dir()));
    assert_eq!(lab.lb(&["detach"]).code(), Some(exit::NOT_ATTACHED), "nothing left");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host parameters

#[test]
fn swap_follows_the_interfaces_mac_and_mtu_and_changes_gateway_and_source() -> anyhow::Result<()> {
    if !require_root("swap_follows_the_interfaces_mac_and_mtu_and_changes_gateway_and_source") {
        return Ok(());
    }
    let lab = Lab::new("trhost");
    let artifact = lab.build("one", &one_vip()?);
    lab.attach(&artifact).expect_success();
    lab.expect_verified();
    // 1400 bytes of inner IP: 1420 once encapsulated, past an MTU of 1400.
    let big = vip_frame(2000, 1400 - 40);
    assert_eq!(lab.test_run(&big)?.0, XDP_TX);

    let new_mac = "02:00:5e:10:00:01";
    lab.lb.ip(&["link", "set", LB_IF, "address", new_mac, "mtu", "1400"]);
    lab.expect_verify_fails(&["host vs interface"], &[new_mac, "1400"]);
    let (action, out) = lab.test_run(&big)?;
    assert_eq!(action, XDP_TX, "the running program still believes in the old MTU");
    assert_ne!(&out[6..12], &mac_bytes(new_mac)?, "and sends from the old MAC");

    let out = lab.lb(&["swap", artifact.arg(), "--lineage-depth", "0"]).expect_success();
    assert!(out.stdout.contains("MTU 1500 -> 1400"), "{out}");
    lab.expect_verified();
    // Too big now: answered with "fragmentation needed" announcing the new MTU less IPIP's 20.
    let (action, answer) = lab.test_run(&big)?;
    assert_eq!(action, XDP_TX, "too big now");
    let answer = IcmpAnswer::parse(&answer)?;
    assert_eq!((answer.kind, answer.code, answer.checksum_valid), (3, 4, true), "frag-needed: {answer:?}");
    assert_eq!(answer.mtu(), 1380, "the MTU it announces");
    let (action, out) = lab.test_run(&vip_frame(2001, 0))?;
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[6..12], &mac_bytes(new_mac)?, "sent from the interface's MAC now");
    assert_eq!(&out[..6], &mac_bytes(&lab.gateway_mac)?, "to the recorded gateway");

    let gateway = "02:00:5e:10:00:99";
    lab.lb(&["swap", artifact.arg(), "--gateway-mac", gateway, "--source", "10.200.0.1", "--lineage-depth", "0"])
        .expect_success();
    lab.expect_verified();
    let (action, out) = lab.test_run(&vip_frame(2002, 0))?;
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[..6], &mac_bytes(gateway)?, "to the new gateway");
    assert_eq!(&out[ETHERNET_HEADER_LEN + 12..ETHERNET_HEADER_LEN + 16], &[10, 200, 0, 1], "from the fixed source");
    assert_eq!(lab.status_json()?["host"]["gateway_mac"], gateway);
    // A rollback keeps the host parameters and can change them too.
    lab.lb(&["swap", lab.build("two", &one_vip_two_backends()?).arg(), "--lineage-depth", "0"]).expect_success();
    lab.lb(&["rollback", "--lineage-depth", "0", "--synthetic-source"]).expect_success();
    lab.expect_verified();
    let (_, out) = lab.test_run(&vip_frame(2003, 0))?;
    assert_eq!(&out[..6], &mac_bytes(gateway)?, "the gateway stays");
    assert_eq!(out[ETHERNET_HEADER_LEN + 12..ETHERNET_HEADER_LEN + 14], [172, 16], "synthetic source again");

    // What the record says and what runs must agree too.
    let mut record: Value = serde_json::from_str(&std::fs::read_to_string(lab.record_path()).unwrap()).unwrap();
    record["host"]["gateway_mac"] = Value::from("02:00:5e:10:00:42");
    std::fs::write(lab.record_path(), record.to_string()).unwrap();
    lab.expect_verify_fails(&["host vs record"], &["02:00:5e:10:00:42"]);
    Ok(())
}

fn mac_bytes(text: &str) -> anyhow::Result<[u8; 6]> {
    ballast::generation::address::parse_mac(text).with_context(|| format!("parsing the MAC address {text}"))
}

// ---------------------------------------------------------------------------------------------
// Foot-guns

#[test]
fn unusable_gateway_macs_are_refused_by_attach_and_swap() -> anyhow::Result<()> {
    if !require_root("unusable_gateway_macs_are_refused_by_attach_and_swap") {
        return Ok(());
    }
    let lab = Lab::new("trmac");
    let artifact = lab.build("one", &one_vip()?);
    let own = lab.lb.mac(LB_IF);
    for mac in ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01", own.as_str()] {
        let out = lab.lb(&["attach", "--config", artifact.arg(), "--gateway-mac", mac]);
        assert!(out.refused(), "{mac}: {out}");
        assert!(
            out.stderr.contains("--gateway-mac") && out.stderr.contains(mac),
            "the error names flag and value: {out}"
        );
        assert_eq!(lab.lb.xdp_program_id(LB_IF), None, "{mac}: nothing attached");
    }
    lab.attach(&artifact).expect_success();
    for mac in ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:80:c2:00:00:0e"] {
        let out = lab.lb(&["swap", artifact.arg(), "--gateway-mac", mac, "--lineage-depth", "0"]);
        assert!(out.refused() && out.stderr.contains("--gateway-mac") && out.stderr.contains(mac), "{out}");
    }
    lab.expect_verified();
    Ok(())
}

#[test]
fn an_every_port_vip_on_a_host_address_is_refused_unless_allowed() -> anyhow::Result<()> {
    if !require_root("an_every_port_vip_on_a_host_address_is_refused_unless_allowed") {
        return Ok(());
    }
    let lab = Lab::new("trvip");
    let every_port_on = |address: &str| {
        format!(
            "hash_seed = 1\n[[vip]]\naddress = \"{address}\"\nport = 0\nprotocol = \"tcp\"\ntable_size = 101\n\
             backends = [{{ address = \"10.1.0.1\" }}]\n"
        )
    };
    let on_lb = lab.build("on-lb", &every_port_on(LB_ADDR));
    // The peer's address is on another interface of the same host: as dangerous.
    let on_peer = lab.build("on-peer", &every_port_on(PEER_ADDR));
    let exact_port = lab.build("exact", &one_vip()?);
    for artifact in [&on_lb, &on_peer] {
        let out = lab.attach(artifact);
        assert!(out.refused(), "{out}");
        assert!(out.stderr.contains("--allow-every-port-vip-on-host-address") && out.stderr.contains("SSH"), "{out}");
        assert_eq!(lab.lb.xdp_program_id(LB_IF), None, "nothing attached");
    }
    lab.attach(&exact_port).expect_success();
    let out = lab.lb(&["swap", on_lb.arg(), "--lineage-depth", "0"]);
    assert!(out.refused() && out.stderr.contains("--allow-every-port-vip-on-host-address"), "{out}");
    lab.lb(&["swap", on_lb.arg(), "--allow-every-port-vip-on-host-address", "--lineage-depth", "0"]).expect_success();
    lab.lb(&["detach"]).expect_success();
    lab.lb(&[
        "attach",
        "--config",
        on_peer.arg(),
        "--gateway-mac",
        &lab.gateway_mac,
        "--allow-every-port-vip-on-host-address",
    ])
    .expect_success();
    Ok(())
}
