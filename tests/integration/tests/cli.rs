//! The `ballast` command line, run as a real process against real interfaces: attach, status,
//! detach and decap in network namespaces each test makes for itself (and always removes), the
//! kernel's view checked with `ip`, bpffs and map syscalls, and traffic sent through veth pairs.
//! Needs root; skips without it unless CI is set. Needs `target/debug/ballast`
//! (`cargo xtask test` builds it).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use ballast::generation::config::EXAMPLE_CONFIG;
use ballast_test_support::{pin_root, require_root, run, wait_until};
use ballast_tests::cli::{exit, tree, Netns, RunningStatus, Workspace, SOME_GATEWAY_MAC};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder};
use lb_common::maps::{
    Backend, Lineage, MaglevChunk, CONFIG_MAPS, MAGLEV_CHUNK_LEN, MAP_BACKENDS, MAP_LINEAGES, MAP_MAGLEV, MAP_VIPS,
};
use lb_common::vip_index::VipSlot;

/// The interface ballast attaches to in the single-namespace tests; its veth peer is `PEER_IF`.
const LB_IF: &str = "lb0";
const PEER_IF: &str = "lb0p";
/// The UDP VIP of the example config, as `status` names it and as a socket address.
const DNS_VIP: &str = "192.0.2.10:53/udp";
const DNS_VIP_ADDR: &str = "192.0.2.10:53";

/// `netns` with the veth pair `LB_IF` / `PEER_IF` in it, no addresses: enough to attach to.
fn with_lb_veth(netns: Netns) -> Netns {
    netns.add_veth(LB_IF, None, &netns, PEER_IF, None);
    netns
}

/// The example config, written into `netns`'s workspace.
fn example_config(netns: &Netns) -> PathBuf {
    netns.work().write("example.toml", EXAMPLE_CONFIG)
}

/// The example config with `from` replaced by `to` (which must be there: no vacuous edits).
fn example_edited(from: &str, to: &str) -> String {
    assert!(EXAMPLE_CONFIG.contains(from), "the example config no longer contains {from:?}");
    EXAMPLE_CONFIG.replacen(from, to, 1)
}

/// Attaches the example config to `LB_IF`, which must work; the id of the program running.
fn attach_example(netns: &Netns, config: &Path) -> u32 {
    netns.attach(LB_IF, config, SOME_GATEWAY_MAC).expect_success();
    let Some(program_id) = netns.xdp_program_id(LB_IF) else {
        panic!("ip link shows no XDP program after a successful attach")
    };
    program_id
}

#[test]
fn attach_status_detach() {
    if !require_root("attach_status_detach") {
        return;
    }
    let netns = with_lb_veth(Netns::create("as"));
    let config = example_config(&netns);

    // The attach command has exited when this returns: only the pin keeps the program there.
    let program_id = attach_example(&netns, &config);

    let status = netns.status(LB_IF);
    assert_eq!(status.program_id(), program_id, "status and ip link disagree on the program");
    assert_eq!(status.pin_dir(), netns.pin_root().join(LB_IF));
    assert!(status.pin_dir().is_dir(), "{} missing", status.pin_dir().display());
    let vips: BTreeSet<&str> = status.vips().iter().map(|v| v["vip"].as_str().unwrap()).collect();
    assert_eq!(vips, BTreeSet::from(["192.0.2.10:53/udp", "192.0.2.10:80/tcp", "[2001:db8::10]:443/tcp"]));

    let config_maps = status.maps_with_role("config");
    let config_names: BTreeSet<&str> = config_maps.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(config_names, BTreeSet::from(CONFIG_MAPS), "config maps");
    for map in config_maps {
        assert_eq!(map["read_only_for_program"], true, "config map not read-only for the program: {map}");
        assert_eq!(map["frozen"], true, "config map not frozen: {map}");
    }
    let counter_maps = status.maps_with_role("state");
    assert_eq!(counter_maps.len(), 3, "counter maps: {counter_maps:?}");
    for map in counter_maps {
        assert_eq!(map["frozen"], false, "the program could not count into a frozen map: {map}");
    }
    let budget = status.maps_with_role("budget");
    assert_eq!(budget.len(), 1, "the ICMP answer budget: {budget:?}");
    assert_eq!((&budget[0]["max_entries"], &budget[0]["frozen"]), (&1.into(), &false.into()), "{}", budget[0]);

    netns.ballast(&["detach", "--iface", LB_IF]).expect_success();
    let link = netns.ip(&["link", "show", LB_IF]);
    assert!(!link.contains("xdp"), "XDP still attached after detach:\n{link}");
    assert!(!status.pin_dir().exists(), "{} still exists after detach", status.pin_dir().display());
    assert!(!netns.pin_root().exists(), "{} still exists after detach", netns.pin_root().display());
}

/// The errno of a map write that failed in its syscall; panics if the write was accepted.
fn write_errno(what: &str, result: Result<(), MapError>) -> Option<i32> {
    match result {
        Ok(()) => panic!("writing {what} was ACCEPTED: the running generation can be edited in place"),
        Err(MapError::SyscallError(err)) => err.io_error.raw_os_error(),
        Err(other) => panic!("writing {what} failed before the kernel answered: {other}"),
    }
}

/// The `frozen` line of the kernel's fdinfo of a map.
fn fdinfo_frozen(map: &MapData) -> anyhow::Result<bool> {
    let path = format!("/proc/self/fdinfo/{}", map.fd().as_fd().as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = info.lines().find(|l| l.starts_with("frozen:")).with_context(|| format!("no frozen line in {info}"))?;
    match line["frozen:".len()..].trim() {
        "1" => Ok(true),
        "0" => Ok(false),
        other => anyhow::bail!("{path}: frozen: {other}"),
    }
}

/// Tries to write one entry of the right type into a config map of the running generation.
fn try_write_config_map(name: &str, map: &mut Map) -> Result<(), MapError> {
    match name {
        MAP_VIPS => Array::<_, VipSlot>::try_from(map)?.set(0, VipSlot::default(), 0),
        MAP_BACKENDS => Array::<_, Backend>::try_from(map)?.set(0, Backend::default(), 0),
        MAP_MAGLEV => Array::<_, MaglevChunk>::try_from(map)?.set(0, [0; MAGLEV_CHUNK_LEN], 0),
        MAP_LINEAGES => Array::<_, Lineage>::try_from(map)?.set(0, Lineage::default(), 0),
        other => panic!("unexpected config map {other}"),
    }
}

#[test]
fn config_maps_of_a_running_generation_refuse_writes() {
    if !require_root("config_maps_of_a_running_generation_refuse_writes") {
        return;
    }
    let netns = with_lb_veth(Netns::create("fz"));
    let config = example_config(&netns);
    attach_example(&netns, &config);
    let status = netns.status(LB_IF);

    let mut refused = BTreeSet::new();
    for entry in status.maps_with_role("config") {
        let name = entry["name"].as_str().unwrap();
        let data = MapData::from_id(status.number(&entry["id"]) as u32).unwrap();
        assert!(fdinfo_frozen(&data).unwrap(), "the kernel's fdinfo of {name} does not say frozen 1");
        let mut map = Map::from_map_data(data).unwrap();
        let errno = write_errno(name, try_write_config_map(name, &mut map));
        assert_eq!(errno, Some(libc::EPERM), "writing {name}: expected EPERM");
        refused.insert(name.to_owned());
    }
    assert_eq!(refused, CONFIG_MAPS.iter().map(|n| n.to_string()).collect(), "every config map must be tried");

    // Control: the same kind of write into a counter map goes through, so the refusals above
    // come from freezing, not from the way the maps were opened or written.
    let counters = status.maps_with_role("state").into_iter().find(|m| m["name"] == "REASON_COUNTERS").unwrap();
    let data = MapData::from_id(status.number(&counters["id"]) as u32).unwrap();
    assert!(!fdinfo_frozen(&data).unwrap(), "a counter map is frozen");
    let mut map = Map::from_map_data(data).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let zeros = PerCpuValues::try_from(vec![0u64; cpus]).unwrap();
    PerCpuArray::<_, u64>::try_from(&mut map).unwrap().set(0, zeros, 0).expect("writing a counter map");
}

/// One attach that must be refused: the arguments, the exit code when a `ballast::Error`
/// variant names the case, and what the error message must quote.
struct BrokenAttach {
    what: &'static str,
    config: String,
    iface: &'static str,
    gateway_mac: &'static str,
    exit_code: Option<i32>,
    message_mentions: &'static [&'static str],
}

fn broken_attaches() -> Vec<BrokenAttach> {
    let config = |what, config: String, message_mentions| BrokenAttach {
        what,
        config,
        iface: LB_IF,
        gateway_mac: SOME_GATEWAY_MAC,
        exit_code: Some(exit::CONFIG),
        message_mentions,
    };
    let duplicate_dns_vip =
        "[[vip]]\naddress = \"192.0.2.10\"\nport = 53\nprotocol = \"udp\"\nbackends = [{ address = \"10.2.0.9\" }]\n";
    vec![
        config(
            "unknown key",
            example_edited(r#"{ address = "10.1.0.2", weight = 1 }"#, r#"{ address = "10.1.0.2", weigth = 1 }"#),
            &["weigth"],
        ),
        config("duplicate VIP", format!("{EXAMPLE_CONFIG}\n{duplicate_dns_vip}"), &["vip[3]", "duplicates vip[1]"]),
        config(
            "empty backends",
            example_edited(
                "backends = [\n    { address = \"10.2.0.1\" },\n    { address = \"10.2.0.2\" },\n]",
                "backends = []",
            ),
            &["vip[1].backends", "empty"],
        ),
        config(
            "bad backend address",
            example_edited(r#"{ address = "10.1.0.1" }"#, r#"{ address = "10.1.0.300" }"#),
            &["vip[0].backends[0].address", "10.1.0.300"],
        ),
        config(
            "table size not prime",
            example_edited("table_size = 1021", "table_size = 1000"),
            &["vip[1].table_size", "1000", "not prime"],
        ),
        BrokenAttach {
            what: "bad gateway MAC",
            config: EXAMPLE_CONFIG.to_owned(),
            iface: LB_IF,
            gateway_mac: "02:00:00:00:00",
            exit_code: None,
            message_mentions: &["--gateway-mac", "02:00:00:00:00"],
        },
        BrokenAttach {
            what: "no such interface",
            config: EXAMPLE_CONFIG.to_owned(),
            iface: "nosuch0",
            gateway_mac: SOME_GATEWAY_MAC,
            exit_code: None,
            message_mentions: &["--iface", "nosuch0"],
        },
    ]
}

/// What an attach could change: the interface as `ip -d` shows it, and the pins (this
/// namespace's, and any outside the per-namespace directories that other tests use).
#[derive(Debug, PartialEq)]
struct Footprint {
    link: String,
    namespace_pins: Vec<String>,
    host_pins: Vec<String>,
}

fn footprint(netns: &Netns) -> Footprint {
    Footprint {
        link: netns.ip(&["-d", "link", "show", LB_IF]),
        namespace_pins: tree(&netns.pin_root()),
        host_pins: tree(&pin_root()).into_iter().filter(|p| !p.starts_with("netns-")).collect(),
    }
}

/// Runs every broken attach; each must be refused, say why, and leave `footprint` as it was.
fn expect_broken_attaches_change_nothing(netns: &Netns, tag: &str) {
    let before = footprint(netns);
    for (i, broken) in broken_attaches().iter().enumerate() {
        let config = netns.work().write(&format!("{tag}-{i}.toml"), &broken.config);
        let output = netns.attach(broken.iface, &config, broken.gateway_mac);
        assert!(output.refused(), "{}: attach was not refused: {output}", broken.what);
        if let Some(code) = broken.exit_code {
            assert_eq!(output.code(), Some(code), "{}: the exit code: {output}", broken.what);
        }
        for needle in broken.message_mentions {
            assert!(output.stderr.contains(needle), "{}: the error does not mention {needle:?}: {output}", broken.what);
        }
        assert_eq!(footprint(netns), before, "{}: the refused attach changed something", broken.what);
    }
}

#[test]
fn refused_attach_changes_nothing() {
    if !require_root("refused_attach_changes_nothing") {
        return;
    }
    let netns = with_lb_veth(Netns::create("bc"));
    expect_broken_attaches_change_nothing(&netns, "bc-idle");
    assert_eq!(netns.xdp_program_id(LB_IF), None);

    let config = example_config(&netns);
    let program_id = attach_example(&netns, &config);
    let again = netns.attach(LB_IF, &config, SOME_GATEWAY_MAC);
    assert!(again.refused(), "a second attach on a running generation was not refused: {again}");
    assert_eq!(again.code(), Some(exit::ALREADY_ATTACHED), "not refused as already attached: {again}");
    assert_eq!(netns.xdp_program_id(LB_IF), Some(program_id), "the refused attach replaced the program");
    assert_eq!(netns.status(LB_IF).program_id(), program_id);

    expect_broken_attaches_change_nothing(&netns, "bc-running");
    assert_eq!(netns.status(LB_IF).program_id(), program_id);
}

#[test]
fn same_interface_name_in_two_namespaces() {
    if !require_root("same_interface_name_in_two_namespaces") {
        return;
    }
    let first = with_lb_veth(Netns::create("pca"));
    // One state directory for both, as on a real host: records must not collide either.
    let second = with_lb_veth(Netns::create_in("pcb", first.work()));
    let config = example_config(&first);
    let first_program = attach_example(&first, &config);
    let second_program = attach_example(&second, &config);
    assert_ne!(first_program, second_program);
    let (first_status, second_status) = (first.status(LB_IF), second.status(LB_IF));
    assert_eq!((first_status.program_id(), second_status.program_id()), (first_program, second_program));
    assert_ne!(first_status.pin_dir(), second_status.pin_dir());

    first.ballast(&["detach", "--iface", LB_IF]).expect_success();
    assert_eq!(first.xdp_program_id(LB_IF), None);
    assert!(!first_status.pin_dir().exists());
    assert_eq!(
        second.xdp_program_id(LB_IF),
        Some(second_program),
        "detaching one namespace's generation hit the other"
    );
    assert!(second_status.pin_dir().is_dir());
    assert_eq!(second.status(LB_IF).program_id(), second_program);
}

/// Removes a pin directory of a deleted namespace, if it is still there, when dropped.
struct StalePins(PathBuf);

impl Drop for StalePins {
    fn drop(&mut self) {
        let _already_gone = std::fs::remove_dir_all(&self.0);
    }
}

/// A UTS namespace kept alive by a bind mount on a file: it takes exactly one namespace
/// inode, which a network namespace cannot promise (its /proc entries take more).
struct InodeFiller(PathBuf);

impl InodeFiller {
    fn new(dir: &Path, n: usize) -> anyhow::Result<InodeFiller> {
        let path = dir.join(format!("uts-filler-{n}"));
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let filler = InodeFiller(path);
        run(Command::new("unshare").arg(format!("--uts={}", filler.0.display())).arg("true"))?.ok()?;
        Ok(filler)
    }

    fn inode(&self) -> anyhow::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(&self.0).with_context(|| format!("{}", self.0.display()))?.ino())
    }
}

impl Drop for InodeFiller {
    fn drop(&mut self) {
        // The namespace goes with its last reference, the bind mount.
        let _not_mounted = run(Command::new("umount").arg(&self.0));
        let _already_gone = std::fs::remove_file(&self.0);
    }
}

/// How long to wait for a parallel test to give back a deleted namespace's inode.
const INODE_REUSE_WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_deleted_namespace_leaves_nothing_to_its_inode_successor() {
    if !require_root("a_deleted_namespace_leaves_nothing_to_its_inode_successor") {
        return;
    }
    let deleted = with_lb_veth(Netns::create("rua"));
    let config = example_config(&deleted);
    let state = std::sync::Arc::clone(deleted.work());
    attach_example(&deleted, &config);
    // The namespace goes away with the generation still pinned: its interface, and with it
    // the XDP attachment, are gone; the pins are left behind under its inode.
    let (inode, stale_pins) = deleted.delete_without_detaching();
    let stale_root = StalePins(stale_pins);
    // The kernel hands out the lowest free inode, to namespaces and to /proc entries alike: a
    // new network namespace takes one for itself, then more for its /proc/net entries. Free
    // inodes below the deleted one (other tests delete namespaces too) are filled first with
    // UTS namespaces, which take exactly one; once a filler gets the deleted inode itself, it
    // is given back and a network namespace takes it. A filler above it: the deleted namespace
    // is not freed yet (the kernel does that later), or a parallel test holds its inode: wait.
    let deadline = Instant::now() + INODE_REUSE_WAIT;
    let mut gap_fillers = Vec::new();
    let successor = loop {
        assert!(
            Instant::now() < deadline,
            "no new namespace got inode {inode} back in {INODE_REUSE_WAIT:?}: cannot check"
        );
        let filler = InodeFiller::new(state.dir(), gap_fillers.len()).unwrap();
        let got = filler.inode().unwrap();
        if got < inode {
            gap_fillers.push(filler);
            continue;
        }
        drop(filler);
        if got == inode {
            let candidate = with_lb_veth(Netns::create_in("ru", &state));
            if candidate.inode() == inode {
                break candidate;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(successor.xdp_program_id(LB_IF), None, "a fresh veth has no XDP program");
    let attach = successor.attach(LB_IF, &config, SOME_GATEWAY_MAC);
    assert!(attach.success(), "attach on a fresh interface refused because of a deleted namespace's pins: {attach}");
    let program_id = successor.xdp_program_id(LB_IF);
    assert!(program_id.is_some());

    // `ballast prune` finds the deleted namespace's pins (the kernel detached their link) and
    // removes them; the successor's generation, attached, stays.
    let stale = stale_root.0.join(LB_IF);
    let listed = state.ballast(&["prune", "--dry-run"]);
    assert!(listed.success() && listed.stdout.contains(&stale.display().to_string()), "{listed}");
    assert!(stale.join("link").exists(), "--dry-run removed {}", stale.display());
    let pruned = state.ballast(&["prune"]);
    assert!(pruned.success() && pruned.stdout.contains(&format!("removed {}", stale.display())), "{pruned}");
    assert!(!stale_root.0.exists(), "prune left {}: {:?}", stale_root.0.display(), tree(&stale_root.0));
    assert!(!pruned.stdout.contains(&successor.pin_root().display().to_string()), "{pruned}");
    assert_eq!(successor.xdp_program_id(LB_IF), program_id, "prune touched a running generation");
    assert!(successor.pin_root().join(LB_IF).join("link").exists());
}

#[test]
fn ip_netns_exec_is_refused() {
    if !require_root("ip_netns_exec_is_refused") {
        return;
    }
    let netns = with_lb_veth(Netns::create("nx"));
    let config = example_config(&netns);
    let attach = ["attach", "--config", config.to_str().unwrap(), "--iface", LB_IF, "--gateway-mac", SOME_GATEWAY_MAC];
    let output = netns.ballast_under_ip_netns_exec(&attach);
    assert!(output.refused(), "attach under ip netns exec was not refused: {output}");
    assert!(output.stderr.contains("--netns"), "the refusal does not point at --netns: {output}");
    assert_eq!(netns.xdp_program_id(LB_IF), None, "the refused attach attached: {output}");
    assert!(!netns.pin_root().exists(), "the refused attach pinned in {}", netns.pin_root().display());

    // A detach from there is refused too, and leaves the generation running.
    let program_id = attach_example(&netns, &config);
    let output = netns.ballast_under_ip_netns_exec(&["detach", "--iface", LB_IF]);
    assert!(output.refused() && output.stderr.contains("--netns"), "{output}");
    assert_eq!(netns.xdp_program_id(LB_IF), Some(program_id));
}

/// Forwarding topology: the client (10.77.0.1 on `cl0`) routes 192.0.2.0/24 via the load
/// balancer (10.77.0.2 on `lb0`).
const CLIENT_IF: &str = "cl0";
const CLIENT_ADDR: &str = "10.77.0.1";
const LB_ADDR: &str = "10.77.0.2";
const DATAGRAMS: u64 = 200;
const DATAGRAMS_PER_SOURCE_PORT: u64 = 4;

/// The load balancer's namespace `TAGl` and the client's `TAGc`, joined as above. veth hands
/// XDP_TX frames only to a peer that runs XDP: the client runs the decapsulator, for an address
/// no forwarded packet has, so it passes them all (and counts them).
fn forwarding_topology(tag: &str) -> (Netns, Netns) {
    let lb = Netns::create(&format!("{tag}l"));
    let client = Netns::create(&format!("{tag}c"));
    lb.add_veth(LB_IF, Some(&format!("{LB_ADDR}/24")), &client, CLIENT_IF, Some(&format!("{CLIENT_ADDR}/24")));
    client.ip(&["route", "add", "192.0.2.0/24", "via", LB_ADDR]);
    client.ballast(&["decap", "attach", "--iface", CLIENT_IF, "--address", "192.0.2.250"]).expect_success();
    (lb, client)
}

#[test]
fn forwards_real_traffic_and_passes_the_rest() {
    if !require_root("forwards_real_traffic_and_passes_the_rest") {
        return;
    }
    let (lb, client) = forwarding_topology("fw");
    let config = example_config(&lb);
    lb.attach(LB_IF, &config, &client.mac(CLIENT_IF)).expect_success();

    // Not for a VIP: the load balancer's own address still answers.
    let ping = run(Command::new("ip").args([
        "netns",
        "exec",
        client.name(),
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-w",
        "3",
        LB_ADDR,
    ]))
    .unwrap();
    assert!(ping.success(), "ping of the load balancer's own address failed while attached: {ping}");

    client.inside(|| {
        for _ in 0..DATAGRAMS / DATAGRAMS_PER_SOURCE_PORT {
            let socket = UdpSocket::bind((CLIENT_ADDR, 0)).unwrap();
            for i in 0..DATAGRAMS_PER_SOURCE_PORT {
                socket.send_to(format!("query {i}").as_bytes(), DNS_VIP_ADDR).unwrap();
            }
        }
    });
    let all_forwarded = wait_until(Duration::from_secs(3), || lb.status(LB_IF).reason("forwarded") >= DATAGRAMS);
    let status = lb.status(LB_IF);
    assert!(all_forwarded, "not all datagrams forwarded: {:#}", status.0);
    assert_eq!(status.reason("forwarded"), DATAGRAMS, "{:#}", status.0);
    assert!(status.reason("pass_not_vip") >= 3, "the pings were not passed as non-VIP traffic: {:#}", status.0);
    let vip = status.vip(DNS_VIP);
    assert_eq!(status.number(&vip["packets"]), DATAGRAMS);
    let backends = vip["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let per_backend: Vec<u64> = backends.iter().map(|b| status.number(&b["packets"])).collect();
    assert_eq!(per_backend.iter().sum::<u64>(), DATAGRAMS, "per-backend counts {per_backend:?}");
    assert!(per_backend.iter().all(|n| *n > 0), "every source port went to one backend: {per_backend:?}");
    for other in status.vips().iter().filter(|v| v["vip"] != DNS_VIP) {
        assert_eq!(status.number(&other["packets"]), 0, "{other}");
    }

    // And the encapsulated frames really left the load balancer: they reached the client.
    let reached_client = wait_until(Duration::from_secs(3), || {
        client.decap_counters(CLIENT_IF).get("pass_not_local").copied() == Some(DATAGRAMS)
    });
    assert!(reached_client, "forwarded frames seen by the client: {:?}", client.decap_counters(CLIENT_IF));
}

/// Decapsulation topology: a sender (10.78.0.1 on `tx0`) and a backend (10.78.0.2 on `rx0`,
/// serving 192.0.2.10:5353 on its loopback).
const SENDER_IF: &str = "tx0";
const BACKEND_IF: &str = "rx0";
const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const SERVICE_PORT: u16 = 5353;
const CLIENT_PORT: u16 = 40000;

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("{text:?} is not a MAC address"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("{text:?} is not a MAC address: not 6 bytes"))
}

/// Ethernet + IPIP (sender -> backend) around UDP (sender -> service), checksums computed.
fn ipip_frame(source_mac: [u8; 6], backend_mac: [u8; 6], payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut inner = Vec::new();
    PacketBuilder::ipv4(SENDER_ADDR.octets(), SERVICE_ADDR.octets(), 64)
        .udp(CLIENT_PORT, SERVICE_PORT)
        .write(&mut inner, payload)
        .context("writing the inner UDP packet")?;
    let outer = Ipv4Header::new(inner.len() as u16, 64, IpNumber::IPV4, SENDER_ADDR.octets(), BACKEND_ADDR.octets())
        .context("making the outer IPv4 header")?;
    let mut frame = Vec::new();
    Ethernet2Header { source: source_mac, destination: backend_mac, ether_type: EtherType::IPV4 }
        .write(&mut frame)
        .context("writing the Ethernet header")?;
    outer.write(&mut frame).context("writing the outer IPv4 header")?;
    frame.extend_from_slice(&inner);
    Ok(frame)
}

/// Sends one frame out of `iface` through an AF_PACKET socket (in the calling thread's namespace).
fn send_frame(iface: &str, destination_mac: [u8; 6], frame: &[u8]) -> anyhow::Result<()> {
    let protocol = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket(2); owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol as i32) };
    assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: raw is a fresh descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {iface}");
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&destination_mac);
    // SAFETY: frame and address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(sent, frame.len() as isize, "sending the frame: {}", std::io::Error::last_os_error());
    Ok(())
}

#[test]
fn decap_delivers_ipip_to_a_local_socket() {
    if !require_root("decap_delivers_ipip_to_a_local_socket") {
        return;
    }
    let sender = Netns::create("dcs");
    let backend = Netns::create("dcb");
    sender.add_veth(
        SENDER_IF,
        Some(&format!("{SENDER_ADDR}/24")),
        &backend,
        BACKEND_IF,
        Some(&format!("{BACKEND_ADDR}/24")),
    );
    backend.ip(&["addr", "add", &format!("{SERVICE_ADDR}/32"), "dev", "lo"]);
    let attached = backend
        .ballast(&["decap", "attach", "--iface", BACKEND_IF, "--address", &BACKEND_ADDR.to_string()])
        .expect_success();
    assert!(attached.stdout.contains(&BACKEND_ADDR.to_string()), "{attached}");
    assert_eq!(backend.decap_counters(BACKEND_IF).get("decapsulated"), Some(&0));

    let server = backend.inside(|| UdpSocket::bind((SERVICE_ADDR, SERVICE_PORT)).unwrap());
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let payload = b"through the decapsulator";
    let backend_mac = parse_mac(&backend.mac(BACKEND_IF)).unwrap();
    let frame = ipip_frame(parse_mac(&sender.mac(SENDER_IF)).unwrap(), backend_mac, payload).unwrap();
    sender.inside(|| send_frame(SENDER_IF, backend_mac, &frame)).unwrap();

    let mut buffer = [0u8; 256];
    let (len, from) = server.recv_from(&mut buffer).unwrap_or_else(|e| {
        panic!("no datagram reached the server ({e}); decap counters {:?}", backend.decap_counters(BACKEND_IF))
    });
    assert_eq!(&buffer[..len], payload);
    assert_eq!(from, (SENDER_ADDR, CLIENT_PORT).into());
    assert_eq!(backend.decap_counters(BACKEND_IF).get("decapsulated"), Some(&1));
}

/// A UDP VIP 192.0.2.10:53 with these backends, written as `tag` into `work`.
fn dns_config(work: &Workspace, tag: &str, backends: &[&str]) -> PathBuf {
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{b}\" }}")).collect();
    let text = format!(
        "hash_seed = 7\n[[vip]]\naddress = \"192.0.2.10\"\nport = 53\nprotocol = \"udp\"\ntable_size = 1021\nbackends = [ {} ]\n",
        list.join(", ")
    );
    work.write(tag, text)
}

fn send_dns_queries(client: &Netns, source_ports: u64) -> anyhow::Result<()> {
    client.inside(|| {
        for _ in 0..source_ports {
            let socket =
                UdpSocket::bind((CLIENT_ADDR, 0)).with_context(|| format!("binding a socket to {CLIENT_ADDR}"))?;
            socket.send_to(b"query", DNS_VIP_ADDR).with_context(|| format!("sending a query to {DNS_VIP_ADDR}"))?;
        }
        Ok(())
    })
}

fn packets_by_backend(status: &RunningStatus) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let vip = status.vip(DNS_VIP);
    let backends = vip["backends"].as_array().with_context(|| format!("{DNS_VIP} lists no backends: {vip}"))?;
    backends
        .iter()
        .map(|b| {
            let address =
                b["address"].as_str().with_context(|| format!("a backend of {DNS_VIP} without address: {b}"))?;
            Ok((address.to_owned(), status.number(&b["packets"])))
        })
        .collect()
}

#[test]
fn counters_follow_their_backend_across_a_swap() {
    if !require_root("counters_follow_their_backend_across_a_swap") {
        return;
    }
    let (lb, client) = forwarding_topology("ct");
    lb.attach(LB_IF, &dns_config(lb.work(), "ct1", &["10.2.0.1", "10.2.0.2", "10.2.0.3"]), &client.mac(CLIENT_IF))
        .expect_success();
    send_dns_queries(&client, 300).unwrap();
    assert!(wait_until(Duration::from_secs(3), || lb.status(LB_IF).reason("forwarded") >= 300));
    let before = packets_by_backend(&lb.status(LB_IF)).unwrap();
    assert!(before.values().all(|n| *n > 0), "{before:?}");

    // 10.2.0.1 leaves and 10.2.0.4 arrives: the survivors' positions in the generation shift,
    // their counters must not.
    let next = dns_config(lb.work(), "ct2", &["10.2.0.2", "10.2.0.3", "10.2.0.4"]);
    lb.ballast(&["swap", next.to_str().unwrap(), "--iface", LB_IF]).expect_success();
    let after = packets_by_backend(&lb.status(LB_IF)).unwrap();
    for survivor in ["10.2.0.2", "10.2.0.3"] {
        assert_eq!(
            after[survivor], before[survivor],
            "{survivor} lost or gained counts in the swap: {before:?} -> {after:?}"
        );
    }
    assert_eq!(after["10.2.0.4"], 0, "a new backend starts from zero: {after:?}");
    assert_eq!(lb.status(LB_IF).number(&lb.status(LB_IF).vip(DNS_VIP)["packets"]), 300, "the VIP counter carries over");

    send_dns_queries(&client, 300).unwrap();
    assert!(wait_until(Duration::from_secs(3), || lb.status(LB_IF).reason("forwarded") >= 600));
    let status = lb.status(LB_IF);
    let last = packets_by_backend(&status).unwrap();
    assert_eq!(status.number(&status.vip(DNS_VIP)["packets"]), 600);
    assert_eq!(last.values().sum::<u64>() + before["10.2.0.1"], 600, "{last:?}");
    assert!(last["10.2.0.4"] > 0, "{last:?}");
}
