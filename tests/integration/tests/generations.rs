//! Generations as the `ballast` command line handles them, run as a real process: content-addressed
//! artifacts (`build`, `inspect`), refusal of altered artifacts, atomic `swap` / `rollback` under
//! continuous traffic, `verify` against tampering, crash safety of `swap` at every checkpoint
//! (BALLAST_TEST_PAUSE_AT), the per-interface lock and the retention of old generations.
//!
//! Every test has its own state directory (BALLAST_STATE_DIR, passed to each command) and its
//! own network namespaces (`bt-<tag><pid>`), which a guard detaches and deletes when dropped, also
//! when the test panics. Traffic goes only between namespaces the test made. The kernel tests need
//! root; without it they skip, unless CI is set. Needs `target/debug/ballast`
//! (`cargo build -p lb-userspace`).

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use ballast::generation::config::Config;
use ballast::generation::Generation;
use ballast::kernel::loader::LoadedGeneration;
use ballast::state::HostRecord;
use ballast_test_support::{pin_root, require_root, run, wait_until, Output};
use ballast_tests::cli::{exit, Artifact, Netns, Workspace};
use serde_json::Value;

/// Longest a paused command may take to reach its checkpoint.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(20);
/// The interface ballast runs on, in the load balancer's namespace.
const LB_IF: &str = "lb0";
/// Its veth peer: in the same namespace (one-namespace labs) or in the client's.
const PEER_IF: &str = "cl0";
/// Addresses of the two-namespace lab.
const LB_ADDR: &str = "10.200.0.1";
const CLIENT_ADDR: &str = "10.200.0.2";
/// The VIP of the traffic configs.
const VIP: &str = "192.0.2.10";
const VIP_PORT: u16 = 7000;
/// The decapsulator on the client's interface takes IPIP to this address only: the frames
/// ballast forwards (to 10.9.0.x) count as pass_not_local there.
const DECAP_ADDRESS: &str = "192.0.2.250";
/// The checkpoints of `swap`, in order (lb-userspace/src/ops/swap.rs).
const SWAP_STEPS: [&str; 6] = ["locked", "preflight", "loaded", "intent-written", "link-updated", "record-written"];

// ---------------------------------------------------------------------------------------------
// Configs, artifacts, state directories

/// One VIP of a config: backends as (address, weight).
#[derive(Clone)]
struct VipSpec {
    address: &'static str,
    port: u16,
    protocol: &'static str,
    table_size: u32,
    backends: Vec<(String, u32)>,
}

#[derive(Clone)]
struct ConfigSpec {
    hash_seed: u32,
    vips: Vec<VipSpec>,
}

impl ConfigSpec {
    /// The UDP VIP the traffic goes to, three IPv4 backends; `seed` tells generations apart.
    fn traffic(seed: u32, weights: [u32; 3]) -> ConfigSpec {
        let backends = weights.iter().enumerate().map(|(i, w)| (format!("10.9.0.{}", i + 1), *w)).collect();
        ConfigSpec {
            hash_seed: seed,
            vips: vec![VipSpec { address: VIP, port: VIP_PORT, protocol: "udp", table_size: 1021, backends }],
        }
    }

    /// The TOML of this config; `reversed` writes VIPs and backends in the opposite order and
    /// lays the file out differently (inline tables, comments), which must not matter.
    fn toml(&self, reversed: bool) -> String {
        let mut text = format!("# written by tests/generations.rs\nhash_seed = {}\n", self.hash_seed);
        let order = |n: usize| -> Vec<usize> {
            if reversed {
                (0..n).rev().collect()
            } else {
                (0..n).collect()
            }
        };
        for v in order(self.vips.len()).into_iter().map(|i| &self.vips[i]) {
            text += &format!(
                "\n[[vip]]\naddress = \"{}\"\nport = {}\nprotocol = \"{}\"\ntable_size = {}\n",
                v.address, v.port, v.protocol, v.table_size
            );
            if reversed {
                text += "backends = [\n";
                for (address, weight) in order(v.backends.len()).into_iter().map(|i| &v.backends[i]) {
                    text += &format!("  {{ weight = {weight}, address = \"{address}\" }},  # reordered\n");
                }
                text += "]\n";
            } else {
                let list: Vec<String> =
                    v.backends.iter().map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}")).collect();
                text += &format!("backends = [{}]\n", list.join(", "));
            }
        }
        text
    }
}

/// `ballast build` of `spec`, which must succeed.
fn build(work: &Workspace, name: &str, spec: &ConfigSpec) -> Artifact {
    work.build(name, &spec.toml(false))
}

/// `sha256:<hex>` as the artifact file name the state directory keeps it under.
fn stored_name(digest: &str) -> String {
    format!("{}.bal", digest.trim_start_matches("sha256:"))
}

// ---------------------------------------------------------------------------------------------
// Labs

/// A load balancer namespace with `LB_IF`, and either its veth peer `PEER_IF` beside it (no
/// traffic) or a client namespace holding the peer, with addresses, a route to the VIP through
/// `LB_IF` and the decapsulator on `PEER_IF`, which lets XDP_TX frames arrive and counts them.
/// Field order is drop order: namespaces go (detached with the state directory) before it.
struct Lab {
    lb: Netns,
    client: Option<Netns>,
    gateway_mac: String,
    work: Arc<Workspace>,
}

impl Lab {
    fn one_namespace(tag: &str) -> Lab {
        let work = Arc::new(Workspace::new(tag));
        let lb = Netns::create_in(&format!("{tag}l"), &work);
        lb.add_veth(LB_IF, None, &lb, PEER_IF, None);
        let gateway_mac = lb.mac(PEER_IF);
        Lab { lb, client: None, gateway_mac, work }
    }

    fn with_client(tag: &str) -> anyhow::Result<Lab> {
        let work = Arc::new(Workspace::new(tag));
        let lb = Netns::create_in(&format!("{tag}l"), &work);
        let client = Netns::create_in(&format!("{tag}c"), &work);
        lb.add_veth(LB_IF, Some(&format!("{LB_ADDR}/24")), &client, PEER_IF, Some(&format!("{CLIENT_ADDR}/24")));
        // A permanent neighbour: no datagram waits for (or is dropped during) ARP resolution.
        client.ip(&["neigh", "replace", LB_ADDR, "lladdr", &lb.mac(LB_IF), "dev", PEER_IF, "nud", "permanent"]);
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", LB_ADDR, "dev", PEER_IF]);
        let gateway_mac = client.mac(PEER_IF);
        let lab = Lab { lb, client: Some(client), gateway_mac, work };
        lab.client()?.ballast(&["decap", "attach", "--iface", PEER_IF, "--address", DECAP_ADDRESS]).expect_success();
        Ok(lab)
    }

    fn client(&self) -> anyhow::Result<&Netns> {
        self.client.as_ref().context("a lab without a client namespace")
    }

    /// `ballast args --iface LB_IF --netns LB`, not yet run.
    fn lb_command(&self, args: &[&str]) -> Command {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--iface", LB_IF]);
        self.lb.ballast_command(&full)
    }

    fn lb(&self, args: &[&str]) -> Output {
        run(&mut self.lb_command(args)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn attach(&self, artifact: &Artifact) -> Output {
        self.lb(&["attach", "--config", artifact.arg(), "--gateway-mac", &self.gateway_mac])
    }

    fn swap(&self, artifact: &Artifact) -> Output {
        self.lb(&["swap", artifact.arg(), "--lineage-depth", "0"])
    }

    fn rollback(&self, to: Option<&str>) -> Output {
        match to {
            Some(digest) => self.lb(&["rollback", "--lineage-depth", "0", "--to", digest]),
            None => self.lb(&["rollback", "--lineage-depth", "0"]),
        }
    }

    fn verify(&self) -> Output {
        self.lb(&["verify"])
    }

    /// `verify`, which must pass.
    fn expect_verified(&self, digest: &str) {
        let out = self.verify().expect_success();
        assert!(
            out.stdout.contains(&format!("verified: {digest} runs as recorded")),
            "verify names another generation: {out}"
        );
    }

    /// `verify`, which must fail naming `check` as failed.
    fn expect_verify_fails(&self, check: &str) -> Output {
        let out = self.verify();
        assert!(out.refused(), "verify passed: {out}");
        let failed = out.stdout.lines().any(|l| l.starts_with("FAIL") && l.contains(check));
        assert!(failed, "verify does not name the failed check `{check}`: {out}");
        out
    }

    /// `status --json`, which must succeed.
    fn status(&self) -> anyhow::Result<Value> {
        self.lb(&["status", "--json"]).expect_success().json().context("ballast status --json")
    }

    /// The digest of the generation the kernel runs (None: a program without one).
    fn running(&self) -> anyhow::Result<Option<String>> {
        Ok(self.status()?["generation"].as_str().map(str::to_owned))
    }

    fn program_id(&self) -> anyhow::Result<u64> {
        let status = self.status()?;
        status["program"]["id"].as_u64().with_context(|| format!("no program id in {status}"))
    }

    fn history(&self) -> anyhow::Result<Vec<Value>> {
        let history = self.lb(&["history", "--json"]).expect_success().json().context("ballast history --json")?;
        history.as_array().cloned().with_context(|| format!("history is not a list: {history}"))
    }

    fn record_path(&self) -> PathBuf {
        self.work.state_dir().join("ifaces").join(self.lb.key(LB_IF)).join("record.json")
    }

    fn record_text(&self) -> String {
        let path = self.record_path();
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn record(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.record_text()).context("record.json is not JSON")
    }

    /// `ballast swap artifact` stopped at checkpoint `step`.
    fn paused_swap(&self, artifact: &Artifact, step: &str) -> anyhow::Result<Paused> {
        let mut command = self.lb_command(&["swap", artifact.arg(), "--lineage-depth", "0"]);
        command.env("BALLAST_TEST_PAUSE_AT", step);
        Paused::start(command, step)
    }

    /// Decapsulator counters on the client's `PEER_IF`, by reason.
    fn decap_counter(&self, reason: &str) -> anyhow::Result<u64> {
        let counters = self.client()?.decap_counters(PEER_IF);
        counters.get(reason).copied().with_context(|| format!("no count of {reason}: {counters:?}"))
    }
}

/// `out` must be a refusal (a non-zero exit of its own) whose message says `why`: for
/// refusals that no `ballast::Error` variant (exit code) names.
fn expect_refused_saying(out: Output, why: &str) -> Output {
    assert!(out.refused(), "expected a refusal: {out}");
    assert!(out.stderr.contains(why), "expected a refusal saying {why:?}: {out}");
    out
}

/// A ballast command stopped at a checkpoint; killed (SIGKILL) when dropped.
struct Paused {
    child: Child,
    command_line: String,
}

impl Paused {
    /// Starts `command` and waits until its stderr says "paused at STEP".
    fn start(mut command: Command, step: &str) -> anyhow::Result<Paused> {
        let command_line = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let stderr = child.stderr.take().with_context(|| format!("no piped stderr of {command_line}"))?;
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let paused = Paused { child, command_line };
        let wanted = format!("paused at {step}");
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(&wanted) => return Ok(paused),
                Ok(line) => seen.push(line),
                Err(_) => panic!(
                    "`{}` did not say `{wanted}` within {PAUSE_TIMEOUT:?}; stderr:\n{}",
                    paused.command_line,
                    seen.join("\n")
                ),
            }
        }
    }

    /// SIGKILL, then reap.
    fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().with_context(|| format!("killing `{}`", self.command_line))?;
        let status = self.child.wait().with_context(|| format!("reaping the killed `{}`", self.command_line))?;
        assert!(status.code().is_none(), "`{}` was not killed but exited: {status}", self.command_line);
        Ok(())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _already_dead = self.child.kill();
        let _reaped = self.child.wait();
    }
}

/// Builds `count` distinct traffic generations (seeds `first..`), named `tag-N`.
fn generations(work: &Workspace, tag: &str, first: u32, count: u32) -> Vec<Artifact> {
    (first..first + count)
        .map(|seed| build(work, &format!("{tag}-{seed}"), &ConfigSpec::traffic(seed, [1, 2, 3])))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Determinism (no kernel involved: runs without root too)

fn mixed_spec() -> ConfigSpec {
    let v4 = |n: u32| format!("10.1.0.{n}");
    let v6 = |n: u32| format!("2001:db8:1::{n}");
    ConfigSpec {
        hash_seed: 0x5eed,
        vips: vec![
            VipSpec {
                address: "192.0.2.10",
                port: 80,
                protocol: "tcp",
                table_size: 1021,
                backends: vec![(v4(1), 1), (v4(2), 2), (v4(3), 1)],
            },
            VipSpec {
                address: "192.0.2.11",
                port: 53,
                protocol: "udp",
                table_size: 503,
                backends: vec![(v4(7), 3), (v4(8), 1), (v4(9), 0)],
            },
            VipSpec {
                address: "2001:db8::10",
                port: 443,
                protocol: "tcp",
                table_size: 2039,
                backends: vec![(v6(1), 1), (v6(2), 1)],
            },
        ],
    }
}

#[test]
fn build_is_deterministic_and_content_addressed() {
    let work = Workspace::new("det");
    let spec = mixed_spec();
    let first = build(&work, "first", &spec);
    let second = build(&work, "second", &spec);
    assert_eq!(first.digest, second.digest, "two builds of one config print different digests");
    let bytes = |a: &Artifact| std::fs::read(&a.path).unwrap_or_else(|e| panic!("reading {}: {e}", a.path.display()));
    assert!(bytes(&first) == bytes(&second), "two builds of one config are not byte-identical");

    let reordered = work.build("reordered", &spec.toml(true));
    assert_eq!(
        reordered.digest,
        first.digest,
        "VIPs and backends in another order gave another digest:\n{}",
        spec.toml(true)
    );
    assert!(bytes(&reordered) == bytes(&first), "a reordered config gives another artifact file");

    let mut weight = spec.clone();
    weight.vips[0].backends[1].1 = 3;
    let mut address = spec.clone();
    address.vips[1].backends[0].0 = "10.1.0.77".to_owned();
    let mut seed = spec.clone();
    seed.hash_seed += 1;
    let mut digests = BTreeSet::from([first.digest.clone()]);
    for (what, changed) in [("weight", weight), ("backend-address", address), ("hash-seed", seed)] {
        let artifact = build(&work, what, &changed);
        assert!(
            digests.insert(artifact.digest.clone()),
            "changing the {what} did not change the digest ({})",
            artifact.digest
        );
    }

    for input in [first.path.clone(), work.path("first.toml")] {
        let report =
            work.ballast(&["inspect", "--json", input.to_str().expect("UTF-8")]).expect_success().json().unwrap();
        check_inspection(&report, &spec, &first.digest);
    }
}

/// `inspect --json` lists the spec's VIPs and backends, shares summing to 1 per VIP and close to
/// the weights, and the digest.
fn check_inspection(report: &Value, spec: &ConfigSpec, digest: &str) {
    assert_eq!(report["digest"], digest, "inspect shows another digest: {report:#}");
    let vips = report["vips"].as_array().unwrap_or_else(|| panic!("no vips in {report:#}"));
    let listed: BTreeSet<&str> = vips.iter().filter_map(|v| v["vip"].as_str()).collect();
    let expected: Vec<String> = spec
        .vips
        .iter()
        .map(|v| {
            let address = if v.address.contains(':') { format!("[{}]", v.address) } else { v.address.to_owned() };
            format!("{address}:{}/{}", v.port, v.protocol)
        })
        .collect();
    assert_eq!(listed, expected.iter().map(String::as_str).collect(), "inspect lists other VIPs: {report:#}");
    for (vip_spec, name) in spec.vips.iter().zip(&expected) {
        let Some(vip) = vips.iter().find(|v| v["vip"] == name.as_str()) else {
            panic!("{name} is not listed: {report:#}")
        };
        assert_eq!(vip["table_size"], vip_spec.table_size, "{name}: table size");
        let backends = vip["backends"].as_array().unwrap_or_else(|| panic!("no backends in {vip:#}"));
        assert_eq!(backends.len(), vip_spec.backends.len(), "{name}: backends listed: {vip:#}");
        let total_weight: u32 = vip_spec.backends.iter().map(|b| b.1).sum();
        let mut share_sum = 0.0;
        for (address, weight) in &vip_spec.backends {
            let backend = backends
                .iter()
                .find(|b| b["address"] == address.as_str())
                .unwrap_or_else(|| panic!("{name}: {address} missing: {vip:#}"));
            assert_eq!(backend["weight"], *weight, "{name} {address}: weight");
            let share = backend["share"].as_f64().unwrap_or_else(|| panic!("no share in {backend}"));
            let wanted = f64::from(*weight) / f64::from(total_weight);
            assert!((share - wanted).abs() < 0.02, "{name} {address}: share {share}, weight says {wanted}");
            share_sum += share;
        }
        assert!((share_sum - 1.0).abs() < 1e-9, "{name}: shares sum to {share_sum}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Altered artifacts are refused and change nothing

/// A way to alter an artifact. Its refusal must be an unreadable artifact or a digest mismatch
/// (`ballast::Error::{ArtifactUnreadable, DigestMismatch}`): exit code 4.
struct Alteration {
    what: String,
    /// XOR `mask` into the byte at `at`; None: drop the last byte.
    flip: Option<(usize, u8)>,
}

/// Bytes worth altering in an artifact (layout in lb-userspace/src/generation/artifact.rs: magic, version,
/// u64 config length, config, u64 program length, program, 32-byte digest). A bit flip keeps
/// the config text ASCII, a whole-byte flip does not: both must be refused as altered.
fn alterations(bytes: &[u8]) -> anyhow::Result<Vec<Alteration>> {
    let config_len = le_u64(bytes, 12).context("the config length")? as usize;
    let program_at = 20 + config_len + 8;
    let program_len = le_u64(bytes, 20 + config_len).context("the program length")? as usize;
    assert_eq!(program_at + program_len + 32, bytes.len(), "the artifact layout is not the documented one");
    let flip = |what: &str, at: usize, mask: u8| Alteration {
        what: format!("{what}: byte {at} ^ {mask:#04x}"),
        flip: Some((at, mask)),
    };
    Ok(vec![
        flip("first byte (magic)", 0, 0xff),
        flip("config length", 12, 0x01),
        flip("middle of the config", 20 + config_len / 2, 0x01),
        flip("middle of the config", 20 + config_len / 2, 0xff),
        flip("middle of the program", program_at + program_len / 2, 0xff),
        flip("last byte (digest)", bytes.len() - 1, 0x01),
        Alteration { what: "last byte cut off".to_owned(), flip: None },
    ])
}

/// The little-endian u64 at `at` in `bytes`.
fn le_u64(bytes: &[u8], at: usize) -> anyhow::Result<u64> {
    let field = bytes.get(at..at + 8).with_context(|| format!("{} bytes end before byte {}", bytes.len(), at + 8))?;
    Ok(u64::from_le_bytes(field.try_into()?))
}

/// What a refused command must leave as it was.
#[derive(Debug, PartialEq)]
struct Footprint {
    program_id: u64,
    running: Option<String>,
    record: String,
    stored: BTreeSet<String>,
    peer_pinned: bool,
    peer_recorded: bool,
}

fn footprint(lab: &Lab) -> anyhow::Result<Footprint> {
    let peer_dir = pin_root().join(lab.lb.key(PEER_IF));
    Ok(Footprint {
        program_id: lab.program_id()?,
        running: lab.running()?,
        record: lab.record_text(),
        stored: lab.work.stored_generations(),
        peer_pinned: peer_dir.exists(),
        peer_recorded: lab.work.state_dir().join("ifaces").join(lab.lb.key(PEER_IF)).join("record.json").exists(),
    })
}

#[test]
fn altered_artifacts_are_refused_and_change_nothing() -> anyhow::Result<()> {
    if !require_root("altered_artifacts_are_refused_and_change_nothing") {
        return Ok(());
    }
    let lab = Lab::one_namespace("cor");
    let [running, other]: [Artifact; 2] = generations(&lab.work, "cor", 1, 2).try_into().expect("two");
    lab.attach(&running).expect_success();
    let before = footprint(&lab)?;
    assert_eq!(before.running.as_deref(), Some(running.digest.as_str()));

    let good = std::fs::read(&other.path).expect("reading the artifact");
    // Every case and command is tried; the failures are reported together.
    let mut problems = Vec::new();
    for Alteration { what, flip } in alterations(&good)? {
        let mut bytes = good.clone();
        match flip {
            Some((at, mask)) => bytes[at] ^= mask,
            None => bytes.truncate(good.len() - 1),
        }
        let path = lab.work.path("altered.bal");
        std::fs::write(&path, &bytes).expect("writing the altered artifact");
        let arg = path.to_str().expect("UTF-8");
        let mut swap = lab.lb_command(&["swap", arg, "--lineage-depth", "0"]);
        // Got as far as the lock: not refused. It then pauses, and run's deadline ends it.
        swap.env("BALLAST_TEST_PAUSE_AT", "locked");
        // On the interface that runs nothing: only the refusal keeps the artifact off it.
        let attach = [
            "attach",
            "--config",
            arg,
            "--iface",
            PEER_IF,
            "--gateway-mac",
            &lab.gateway_mac,
            "--netns",
            lab.lb.name(),
        ];
        let attempts = [
            ("inspect", run(&mut lab.work.command(&["inspect", arg]))),
            ("swap", run(&mut swap)),
            ("attach", run(&mut lab.work.command(&attach))),
        ];
        for (command, out) in attempts {
            match out {
                Err(err) => problems.push(format!("{what}: {command} was not refused at once: {err:#}")),
                Ok(out) if out.success() => problems.push(format!("{what}: {command} accepted it: {out}")),
                Ok(out) if out.code() != Some(exit::ARTIFACT) => {
                    problems.push(format!(
                        "{what}: {command} refused it, but not as an unreadable or altered artifact (exit code {}, not {}): {}",
                        out.status,
                        exit::ARTIFACT,
                        out.stderr.trim()
                    ));
                }
                Ok(_) => {}
            }
        }
        let after = footprint(&lab)?;
        if after != before {
            problems.push(format!("{what}: a refused command changed something: {before:?} became {after:?}"));
        }
    }
    assert!(problems.is_empty(), "altered artifacts were not refused as they must be:\n{}", problems.join("\n"));
    lab.expect_verified(&running.digest);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Swap and rollback under continuous traffic: no frame lost

/// What the sender thread did.
struct Sent {
    /// Datagrams the kernel accepted (sendto succeeded).
    sent: u64,
    /// sendto refusals with ENOBUFS (the veth ring was full; nothing left): retried.
    enobufs: u64,
    elapsed: Duration,
}

/// Sends UDP datagrams to the VIP from inside namespace `netns` at up to `rate` per second, at
/// most `limit` in all, until `stop`.
fn start_sender(netns: String, rate: u64, limit: u64, stop: Arc<AtomicBool>) -> JoinHandle<anyhow::Result<Sent>> {
    std::thread::spawn(move || {
        ballast::kernel::netns::enter(&netns).context("entering the client's namespace")?;
        let target: SocketAddr = format!("{VIP}:{VIP_PORT}").parse().context("the VIP's socket address")?;
        // Several flows, so that both generations spread them over their backends.
        let sockets = (0..4)
            .map(|_| UdpSocket::bind("0.0.0.0:0"))
            .collect::<Result<Vec<UdpSocket>, _>>()
            .context("binding a UDP socket")?;
        for socket in &sockets {
            // IP_RECVERR: a datagram the device drops is reported (ENOBUFS), not silently lost.
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a pointer to a c_int and its size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_IP,
                    libc::IP_RECVERR,
                    std::ptr::from_ref(&on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
        }
        let payload = [0x5au8; 64];
        let start = Instant::now();
        let (mut sent, mut enobufs) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) && sent < limit {
            // At most 64 at a time, also when catching up after a stall: well below the 256
            // frames a veth ring holds.
            let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(limit).min(sent + 64);
            while sent < due {
                match sockets[(sent % 4) as usize].send_to(&payload, target) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        enobufs += 1;
                        break;
                    }
                    Err(e) => return Err(e).context("sending to the VIP"),
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(Sent { sent, enobufs, elapsed: start.elapsed() })
    })
}

/// Sets its flag when dropped: stops the sender also when the test panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn hundred_swaps_and_rollbacks_under_traffic_lose_nothing() -> anyhow::Result<()> {
    if !require_root("hundred_swaps_and_rollbacks_under_traffic_lose_nothing") {
        return Ok(());
    }
    const SWAPS: usize = 100;
    const RATE: u64 = 20_000;
    let started = Instant::now();
    let lab = Lab::with_client("tr")?;
    let a = build(&lab.work, "a", &ConfigSpec::traffic(7, [1, 1, 1]));
    let b = build(&lab.work, "b", &ConfigSpec::traffic(7, [1, 3, 0]));
    lab.attach(&a).expect_success();
    let forwarded = || {
        let status = lab.status().unwrap();
        status["reasons"]["forwarded"].as_u64().unwrap_or_else(|| panic!("no forwarded count in {status}"))
    };
    let (forwarded_before, received_before) = (forwarded(), lab.decap_counter("pass_not_local")?);

    let stop = Arc::new(AtomicBool::new(false));
    // Bounded: at most RATE per second for three minutes, whatever happens to the main thread.
    let sender = start_sender(lab.client()?.name().to_owned(), RATE, RATE * 180, Arc::clone(&stop));
    // A failed swap (a panic) stops the sender too.
    let stop_guard = StopOnDrop(Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    let swapping = Instant::now();
    for i in 0..SWAPS {
        // swap to B, roll back to A, ...: 50 each way.
        let (out, expected) = if i % 2 == 0 { (lab.swap(&b), &b) } else { (lab.rollback(None), &a) };
        let out = out.expect_success();
        assert!(out.stdout.contains(&format!("-> {}", expected.digest)), "swap {i} went elsewhere: {out}");
    }
    let swap_time = swapping.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    drop(stop_guard);
    let sent = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    eprintln!(
        "{SWAPS} swaps in {swap_time:?}; {} datagrams sent in {:?} ({} ENOBUFS retries)",
        sent.sent, sent.elapsed, sent.enobufs
    );
    assert!(sent.sent > RATE, "the sender sent only {} datagrams in {:?}", sent.sent, sent.elapsed);

    let mut received = 0;
    wait_until(Duration::from_secs(3), || {
        received = lab.decap_counter("pass_not_local").unwrap() - received_before;
        received >= sent.sent
    });
    let forwarded = forwarded() - forwarded_before;
    assert_eq!(forwarded, sent.sent, "ballast forwarded {forwarded} of {} datagrams sent", sent.sent);
    assert_eq!(received, sent.sent, "{received} encapsulated frames came back of {} sent", sent.sent);

    assert_eq!(lab.running()?.as_deref(), Some(a.digest.as_str()));
    lab.expect_verified(&a.digest);
    let history = lab.history()?;
    let changes: Vec<&Value> = history.iter().filter(|e| e["action"] == "swap" || e["action"] == "rollback").collect();
    assert_eq!(changes.len(), SWAPS, "history has {} swap/rollback entries", changes.len());
    assert!(changes.iter().all(|e| e["result"] == "ok"), "a swap or rollback is not ok in the history: {changes:#?}");
    eprintln!("swap test took {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. verify: what runs against what the record says

/// Replaces the program behind the pinned link of `LB_IF`, outside ballast's records, with
/// `generation` loaded by the library (no generation digest in its .rodata).
fn replace_behind_ballasts_back(lab: &Lab, generation: &Generation) -> anyhow::Result<()> {
    let status = lab.status()?;
    let pin_dir = status["pin_dir"].as_str().with_context(|| format!("no pin_dir in the status: {status}"))?;
    let link_path = PathBuf::from(pin_dir).join("link");
    let host: HostRecord =
        serde_json::from_value(lab.record()?["host"].clone()).context("host parameters in the record")?;
    let host = host.params().context("recorded host parameters")?;
    lab.lb.inside(|| {
        let mut loaded = LoadedGeneration::load(generation, &host, None).context("loading with the library")?;
        let link = PinnedLink::from_pin(&link_path)
            .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
        loaded.replace_on(FdLink::from(link)).context("bpf_link_update")
    })
}

#[test]
fn verify_detects_a_program_or_record_that_is_not_the_recorded_one() -> anyhow::Result<()> {
    if !require_root("verify_detects_a_program_or_record_that_is_not_the_recorded_one") {
        return Ok(());
    }
    let lab = Lab::one_namespace("ver");
    let [a, b]: [Artifact; 2] = generations(&lab.work, "ver", 1, 2).try_into().expect("two");
    lab.attach(&a).expect_success();
    lab.expect_verified(&a.digest);

    // Another program behind the pinned link, ballast's records untouched.
    let intruder = Generation::build(
        &Config::from_toml_str(&ConfigSpec::traffic(99, [5, 1, 1]).toml(false)).expect("valid config"),
    )
    .expect("generation");
    let program_before = lab.program_id()?;
    replace_behind_ballasts_back(&lab, &intruder)?;
    assert_ne!(lab.program_id()?, program_before, "the library did not replace the program");
    assert_eq!(lab.running()?, None, "the intruder has no generation digest");
    lab.expect_verify_fails("running digest");
    lab.expect_verify_fails("config maps");

    // A swap puts back a recorded generation; B then A, so that B stays stored.
    lab.swap(&b).expect_success();
    lab.swap(&a).expect_success();
    lab.expect_verified(&a.digest);

    // The record edited to name another (stored) generation.
    let original = lab.record_text();
    assert!(original.contains(&a.digest), "the record does not name {}: {original}", a.digest);
    std::fs::write(
        lab.record_path(),
        original.replacen(&format!("\"current\": \"{}\"", a.digest), &format!("\"current\": \"{}\"", b.digest), 1),
    )
    .expect("editing the record");
    assert_eq!(lab.record()?["current"], b.digest.as_str(), "the record edit did not take");
    lab.expect_verify_fails("running digest");
    std::fs::write(lab.record_path(), original).expect("restoring the record");
    lab.expect_verified(&a.digest);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Crash safety: a swap killed at every checkpoint

#[test]
fn swap_killed_at_every_step_leaves_one_whole_generation_and_is_repaired() -> anyhow::Result<()> {
    if !require_root("swap_killed_at_every_step_leaves_one_whole_generation_and_is_repaired") {
        return Ok(());
    }
    let lab = Lab::one_namespace("crash");
    let gens = generations(&lab.work, "crash", 1, 1 + 2 * SWAP_STEPS.len() as u32);
    lab.attach(&gens[0]).expect_success();
    let mut current = &gens[0];
    for (n, step) in SWAP_STEPS.iter().enumerate() {
        let (new, repair) = (&gens[1 + 2 * n], &gens[2 + 2 * n]);
        let pins_before = pin_listing(&lab)?;
        lab.paused_swap(new, step)?.kill()?;

        // Exactly one whole generation runs: the old one until the link is updated, then the new.
        let live = if SWAP_STEPS[..=n].contains(&"link-updated") { new } else { current };
        assert_eq!(
            lab.running()?.as_deref(),
            Some(live.digest.as_str()),
            "killed at {step}: the wrong generation runs"
        );
        assert_eq!(pin_listing(&lab)?, pins_before, "killed at {step}: the pins changed");
        let interrupted = matches!(*step, "intent-written" | "link-updated");
        if interrupted {
            lab.expect_verify_fails("record");
        } else {
            lab.expect_verified(&live.digest);
        }

        // The next command settles the record and does its own work.
        let out = lab.swap(repair).expect_success();
        assert_eq!(
            out.stdout.starts_with("recovered:"),
            interrupted,
            "killed at {step}: the next swap's report: {out}"
        );
        assert!(out.stdout.contains(&format!("{} -> {}", live.digest, repair.digest)), "killed at {step}: {out}");
        lab.expect_verified(&repair.digest);
        // The generation replaced is the rollback target.
        assert_eq!(
            lab.record()?["previous"][0],
            live.digest.as_str(),
            "killed at {step}: record {}",
            lab.record_text()
        );
        current = repair;
    }
    let recoveries = lab.history()?.iter().filter(|e| e["action"] == "recover").count();
    assert_eq!(recoveries, 2, "recoveries in the history");
    Ok(())
}

/// A swap killed after the link update, followed by `rollback`: the rollback must settle the
/// record first and return to the generation that ran before the interrupted swap.
#[test]
fn rollback_after_a_swap_killed_after_the_link_update() -> anyhow::Result<()> {
    if !require_root("rollback_after_a_swap_killed_after_the_link_update") {
        return Ok(());
    }
    let lab = Lab::one_namespace("crrb");
    let [a, b, c]: [Artifact; 3] = generations(&lab.work, "crrb", 1, 3).try_into().expect("three");
    lab.attach(&a).expect_success();
    lab.swap(&b).expect_success();
    lab.paused_swap(&c, "link-updated")?.kill()?;
    assert_eq!(lab.running()?.as_deref(), Some(c.digest.as_str()));
    let out = lab.rollback(None).expect_success();
    assert!(out.stdout.starts_with("recovered:"), "rollback did not report the recovery: {out}");
    lab.expect_verified(&lab.running()?.expect("a digest"));
    assert_eq!(
        lab.running()?.as_deref(),
        Some(b.digest.as_str()),
        "rollback after an interrupted swap B -> C went to {:?}, not back to B (A is {})\n{out}",
        lab.running()?,
        a.digest
    );
    Ok(())
}

/// The pin directory of `LB_IF`: what is pinned there.
fn pin_listing(lab: &Lab) -> anyhow::Result<BTreeSet<String>> {
    let dir = pin_root().join(lab.lb.key(LB_IF));
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    entries
        .map(|e| {
            let entry = e.with_context(|| format!("a directory entry of {}", dir.display()))?;
            Ok(entry.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 6. One command at a time per interface

#[test]
fn a_second_swap_is_refused_while_one_holds_the_lock() -> anyhow::Result<()> {
    if !require_root("a_second_swap_is_refused_while_one_holds_the_lock") {
        return Ok(());
    }
    let lab = Lab::one_namespace("lock");
    let [a, b, c]: [Artifact; 3] = generations(&lab.work, "lock", 1, 3).try_into().expect("three");
    lab.attach(&a).expect_success();
    let holder = lab.paused_swap(&b, "locked")?;
    let started = Instant::now();
    let refused = lab.swap(&c).expect_code(exit::LOCK_HELD);
    assert!(started.elapsed() < Duration::from_secs(5), "the second swap waited {:?}: {refused}", started.elapsed());
    assert_eq!(lab.running()?.as_deref(), Some(a.digest.as_str()), "the refused swap changed what runs");
    holder.kill()?;
    lab.swap(&c).expect_success();
    lab.expect_verified(&c.digest);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Retention: the current generation and the 9 before it

#[test]
fn rollback_reaches_back_nine_generations_and_no_further() -> anyhow::Result<()> {
    if !require_root("rollback_reaches_back_nine_generations_and_no_further") {
        return Ok(());
    }
    const SWAPS: usize = 12;
    const DEPTH: usize = 9;
    let lab = Lab::one_namespace("ret");
    let gens = generations(&lab.work, "ret", 1, SWAPS as u32 + 1);
    lab.attach(&gens[0]).expect_success();
    for generation in &gens[1..] {
        lab.swap(generation).expect_success();
    }
    let kept: BTreeSet<String> = gens[SWAPS - DEPTH..].iter().map(|g| stored_name(&g.digest)).collect();
    assert_eq!(
        lab.work.stored_generations(),
        kept,
        "the state directory keeps other artifacts than the last {}",
        DEPTH + 1
    );

    let before = (lab.program_id()?, lab.record_text());
    for forgotten in &gens[..SWAPS - DEPTH] {
        let hex = forgotten.digest.trim_start_matches("sha256:");
        expect_refused_saying(lab.rollback(Some(hex)), "no kept generation");
        assert_eq!((lab.program_id()?, lab.record_text()), before, "a refused rollback changed something");
    }
    let oldest = &gens[SWAPS - DEPTH];
    lab.rollback(Some(&oldest.digest)).expect_success();
    lab.expect_verified(&oldest.digest);
    assert!(lab.work.stored_generations().len() <= DEPTH + 1);
    Ok(())
}
