//! Signed generations (README "Signing and the trust policy"): with `STATE_DIR/policy.toml`
//! requiring signatures, `attach`, `swap`, `rollback` and `run` make live only what a key of
//! `allowed_signers` signed with `ssh-keygen -Y sign -n ballast` (keys and signatures made by
//! ssh-keygen here); every refusal says which and leaves the running generation as it was
//! (`verify` passes, same digest); the audit log names the signer's fingerprint.
//!
//! Root only (network namespaces, XDP); without it they skip, unless CI is set. Needs
//! `target/debug/ballast` and ssh-keygen (openssh-client).
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_test_support::{require_root, run, run_with_timeout, wait_until, Output};
use ballast_tests::cli::{exit, utf8, Artifact, Netns, Workspace};
use serde_json::Value;

const LB_IF: &str = "lb0";
const PEER_IF: &str = "cl0";

fn config(seed: u32) -> String {
    format!(
        "hash_seed = {seed}\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1021\n\
         backends = [{{ address = \"10.1.0.1\" }}, {{ address = \"10.1.0.2\" }}]\n"
    )
}

fn ssh_keygen(args: &[&str]) {
    run(Command::new("ssh-keygen").args(args)).unwrap_or_else(|e| panic!("{e:#}")).expect_success();
}

/// A namespace with a veth pair (LB_IF, PEER_IF), a state directory whose policy requires
/// signatures by the key `ops`, and the keys `ops` (allowed) and `stranger` (not).
struct Signing {
    ns: Netns,
    gateway_mac: String,
    ops: PathBuf,
    ops_fingerprint: String,
    stranger: PathBuf,
}

impl Signing {
    fn new(tag: &str) -> Signing {
        let ns = Netns::create(tag);
        ns.add_veth(LB_IF, None, &ns, PEER_IF, None);
        let gateway_mac = ns.mac(PEER_IF);
        let work = ns.work();
        let key = |name: &str| {
            let path = work.path(name);
            ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", utf8(&path)]);
            path
        };
        let (ops, stranger) = (key("ops"), key("stranger"));
        let public = std::fs::read_to_string(work.path("ops.pub")).unwrap_or_else(|e| panic!("ops.pub: {e}"));
        let allowed = work.write("allowed_signers", format!("ops@example.org namespaces=\"ballast\" {public}"));
        let listed = run(Command::new("ssh-keygen").args(["-l", "-f", utf8(&ops)])).unwrap_or_else(|e| panic!("{e:#}"));
        let ops_fingerprint = listed.stdout.split_whitespace().nth(1).unwrap_or_default().to_owned();
        assert!(ops_fingerprint.starts_with("SHA256:"), "{listed}");
        let signing = Signing { ns, gateway_mac, ops, ops_fingerprint, stranger };
        signing.write_policy(&format!(
            "[signatures]\nrequired = true\nallowed_signers = \"{}\"\nnamespace = \"ballast\"\n",
            allowed.display()
        ));
        signing
    }

    fn work(&self) -> &Workspace {
        self.ns.work()
    }

    fn write_policy(&self, text: &str) {
        std::fs::create_dir_all(self.work().state_dir()).unwrap_or_else(|e| panic!("the state directory: {e}"));
        std::fs::write(self.work().state_dir().join("policy.toml"), text)
            .unwrap_or_else(|e| panic!("policy.toml: {e}"));
    }

    /// `ssh-keygen -Y sign -n NAMESPACE -f KEY FILE`: FILE.sig.
    fn sign(&self, key: &Path, namespace: &str, file: &Path) {
        let _ = std::fs::remove_file(sig(file));
        ssh_keygen(&["-q", "-Y", "sign", "-n", namespace, "-f", utf8(key), utf8(file)]);
    }

    fn lb(&self, args: &[&str]) -> Output {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--iface", LB_IF]);
        self.ns.ballast(&full)
    }

    fn attach(&self, generation: &Path) -> Output {
        self.lb(&["attach", "--config", utf8(generation), "--gateway-mac", &self.gateway_mac])
    }

    /// `verify` passes and names `digest`.
    fn expect_running(&self, digest: &str) {
        let out = self.lb(&["verify"]).expect_success();
        assert!(out.stdout.contains(&format!("verified: {digest} runs as recorded")), "{out}");
    }

    /// A refused command: exit code, and the error names `why`.
    fn expect_refused(&self, out: Output, why: &str) {
        assert!(!out.success(), "not refused ({why}): {out}");
        assert!(out.stderr.contains(why), "the error does not say '{why}': {out}");
    }

    /// The audit log's last entry.
    fn last_audit(&self) -> Value {
        let log = std::fs::read_to_string(self.work().state_dir().join("audit.jsonl"))
            .unwrap_or_else(|e| panic!("audit.jsonl: {e}"));
        let last = log.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("the last audit entry is not JSON ({e}): {last}"))
    }

    /// The last audit entry is `action`, ok, signed by `ops`, covering what names `covers`.
    fn expect_signed_entry(&self, action: &str, covers: &str) {
        let entry = self.last_audit();
        assert_eq!((entry["action"].as_str(), entry["result"].as_str()), (Some(action), Some("ok")), "{entry}");
        assert_eq!(entry["signed"]["fingerprint"], self.ops_fingerprint.as_str(), "{entry}");
        assert_eq!(entry["signed"]["principal"], "ops@example.org", "{entry}");
        assert!(entry["signed"]["covers"].as_str().is_some_and(|c| c.contains(covers)), "{covers}: {entry}");
    }
}

fn sig(file: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sig", file.display()))
}

#[test]
fn only_generations_signed_by_an_allowed_key_go_live() {
    if !require_root("only_generations_signed_by_an_allowed_key_go_live") {
        return;
    }
    let s = Signing::new("sig");
    let a: Artifact = s.work().build("a", &config(1));
    let b: Artifact = s.work().build("b", &config(2));

    // Unsigned: nothing is attached.
    s.expect_refused(s.attach(&a.path), "unsigned");
    assert_eq!(s.ns.xdp_program_id(LB_IF), None, "an unsigned attach loaded a program");
    s.sign(&s.ops, "ballast", &a.path);
    s.attach(&a.path).expect_success();
    s.expect_signed_entry("attach", &a.digest);
    s.expect_running(&a.digest);

    // Every bad signature of b is refused, naming which, and a keeps running.
    s.expect_refused(s.lb(&["swap", b.arg()]), "unsigned");
    s.expect_running(&a.digest);
    s.sign(&s.stranger, "ballast", &b.path);
    s.expect_refused(s.lb(&["swap", b.arg()]), "signed by a key that is not allowed");
    s.expect_running(&a.digest);
    s.sign(&s.ops, "git", &b.path);
    s.expect_refused(s.lb(&["swap", b.arg()]), "wrong namespace: signed for namespace 'git'");
    s.expect_running(&a.digest);
    std::fs::copy(sig(&a.path), sig(&b.path)).expect("a's signature as b's");
    s.expect_refused(s.lb(&["swap", b.arg()]), "is for other bytes");
    s.expect_running(&a.digest);
    // A signed artifact changed after signing.
    s.sign(&s.ops, "ballast", &b.path);
    let original = std::fs::read(&b.path).expect("b");
    let mut altered = original.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    std::fs::write(&b.path, &altered).expect("altering b");
    assert!(!s.lb(&["swap", b.arg()]).success(), "an altered artifact went live");
    s.expect_running(&a.digest);
    std::fs::write(&b.path, &original).expect("restoring b");

    s.lb(&["swap", b.arg(), "--lineage-depth", "0"]).expect_success();
    s.expect_signed_entry("swap", &b.digest);
    s.expect_running(&b.digest);

    // Rollback checks the signature kept beside a in the state directory again.
    s.lb(&["rollback", "--lineage-depth", "0"]).expect_success();
    s.expect_signed_entry("rollback", &format!("kept generation {}", a.digest));
    s.expect_running(&a.digest);
    let kept_sig = s.work().state_dir().join(format!("generations/{}.sig", b.digest.trim_start_matches("sha256:")));
    std::fs::remove_file(&kept_sig).expect("b's kept signature");
    s.expect_refused(s.lb(&["rollback", "--lineage-depth", "0"]), "unsigned");
    s.expect_running(&a.digest);

    // A signed config: the signature covers the TOML, the generation is built from it.
    let c_toml = s.work().write("c.toml", config(3));
    s.sign(&s.ops, "ballast", &c_toml);
    s.lb(&["swap", utf8(&c_toml), "--lineage-depth", "0"]).expect_success();
    s.expect_signed_entry("swap", "c.toml (sha256:");
    let c_digest = s.last_audit()["to"].as_str().expect("to").to_owned();
    s.expect_running(&c_digest);
    // Kept with the config it was built from: rolled back to and forth, checked again each time.
    s.lb(&["rollback", "--lineage-depth", "0"]).expect_success();
    s.lb(&["rollback", "--lineage-depth", "0", "--to", &c_digest]).expect_success();
    s.expect_signed_entry("rollback", &format!("kept generation {c_digest}, derived from the signed"));

    // A bad policy is refused naming the field and the file; nothing changes.
    let policy = s.work().state_dir().join("policy.toml");
    s.write_policy("[signatures]\nrequired = true\nallowed_signers = \"/nonexistent/allowed_signers\"\n");
    let out = s.lb(&["swap", a.arg()]);
    assert_eq!(out.code(), Some(exit::CONFIG), "{out}");
    s.expect_refused(out, &format!("{}: signatures.allowed_signers", policy.display()));
    s.write_policy("[signatures]\nrequired = true\nallowed_signers = \"/x\"\nkeys = 1\n");
    s.expect_refused(s.lb(&["swap", a.arg()]), &format!("{}: signatures.keys", policy.display()));
    s.expect_running(&c_digest);

    // Without a policy nothing is required (as before policies).
    std::fs::remove_file(&policy).expect("removing the policy");
    std::fs::remove_file(sig(&a.path)).expect("a's signature");
    s.lb(&["swap", a.arg(), "--lineage-depth", "0"]).expect_success();
    assert!(s.last_audit().get("signed").is_none(), "{}", s.last_audit());
    s.expect_running(&a.digest);
}

#[test]
fn the_daemon_runs_only_a_signed_config() {
    if !require_root("the_daemon_runs_only_a_signed_config") {
        return;
    }
    let s = Signing::new("sigrun");
    let lb_toml = s.work().write("lb.toml", config(7));
    let run_args = |extra: &[&str]| {
        let mut args = vec!["run", "--config", utf8(&lb_toml), "--gateway-mac", &s.gateway_mac, "--iface", LB_IF];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let refs = |args: &[String]| args.iter().map(String::as_str).collect::<Vec<_>>().join(" ");

    // Unsigned: the daemon stops at start, nothing attached.
    let args = run_args(&[]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_timeout(&mut s.ns.ballast_command(&argv), Duration::from_secs(30)).expect("ballast run");
    s.expect_refused(out, "lb.toml (sha256:");
    assert_eq!(s.ns.xdp_program_id(LB_IF), None, "an unsigned config was attached by {}", refs(&args));

    // Signed: attached, audited with the signer and the config's digest.
    s.sign(&s.ops, "ballast", &lb_toml);
    let mut daemon = s.ns.ballast_command(&argv).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = daemon.stderr.take().expect("stderr");
    let reader = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().expect("log").push_str(&(line + "\n"));
            }
        })
    };
    let audited = |action: &str| {
        let log = std::fs::read_to_string(s.work().state_dir().join("audit.jsonl")).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("\"action\":\"{action}\""))).count()
    };
    let logged = |what: &str| log.lock().expect("log").matches(what).count();
    let hup = |daemon: &std::process::Child| {
        // SAFETY: a signal to the child we spawned.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    };
    let started = wait_until(Duration::from_secs(30), || audited("start") == 1);
    let mut checks = vec![("started", started)];
    let first = s.last_audit();
    let first_digest = first["to"].as_str().unwrap_or_default().to_owned();

    // A reload of an unsigned config is refused like an invalid one: the generation stays.
    let before = logged("invalid config");
    let _ = std::fs::remove_file(sig(&lb_toml));
    // Same hash seed, a backend more: slots change owner, so the daemon builds it with a lineage.
    s.work().write("lb.toml", config(7).replace("}]", "}, { address = \"10.1.0.3\" }]"));
    hup(&daemon);
    checks.push(("unsigned reload refused", wait_until(Duration::from_secs(30), || logged("invalid config") > before)));
    checks.push(("it said unsigned", logged("unsigned") > 0));
    checks.push(("nothing reloaded", audited("reload") == 0));
    // Signed, it is swapped in.
    s.sign(&s.ops, "ballast", &lb_toml);
    hup(&daemon);
    checks.push(("signed reload applied", wait_until(Duration::from_secs(30), || audited("reload") == 1)));
    let reloaded = s.last_audit();

    // SAFETY: as above.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().expect("the daemon exits");
    reader.join().expect("the stderr reader");
    let log = log.lock().expect("log").clone();
    for (what, ok) in checks {
        assert!(ok, "{what}: no ({status}); the daemon's log:\n{log}");
    }
    assert_eq!(first["action"], "start", "{first}");
    assert_eq!(first["signed"]["fingerprint"], s.ops_fingerprint.as_str(), "{first}");
    let covers = first["signed"]["covers"].as_str().unwrap_or_default();
    assert!(covers.contains("lb.toml (sha256:") && covers.contains(&format!("went live as {first_digest}")), "{first}");
    // The reload's generation names the config's signer, the parent it was built after.
    s.expect_signed_entry("reload", "lb.toml (sha256:");
    let digest = reloaded["to"].as_str().unwrap_or_default().to_owned();
    assert_ne!(digest, first_digest, "{reloaded}");
    let covers = reloaded["signed"]["covers"].as_str().unwrap_or_default();
    assert!(covers.contains(&format!("lineage built after {first_digest}; went live as {digest}")), "{reloaded}");
    s.expect_running(&digest);
}
