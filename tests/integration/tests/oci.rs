//! OCI distribution (README "Registries"): `ballast push` and `ballast pull` against a real
//! registry (Debian's docker-registry, distribution 2.8, started here on 127.0.0.1 with its
//! storage in the test's directory; plain HTTP without auth, or with basic auth, or TLS with a
//! private CA), read back by a second client (skopeo);
//! `attach` and `swap` from `oci://REF`, recording the manifest digest; a registry serving other
//! bytes is refused with nothing changed; the trust policy applies to pulled generations.
//!
//! Root only (network namespaces, XDP); without it they skip, unless CI is set. Needs
//! `target/debug/ballast`, docker-registry, skopeo and ssh-keygen (`cargo xtask setup`).
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_test_support::{fixture, require_root, run, wait_until, Output, TempDir};
use ballast_tests::cli::{utf8, Artifact, Netns, Workspace};
use serde_json::Value;

const LB_IF: &str = "lb0";
const PEER_IF: &str = "cl0";

/// A fixture config, which must read.
fn config(name: &str) -> String {
    fixture(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A namespace with a veth pair (LB_IF, PEER_IF); the gateway MAC to attach with.
fn namespace(tag: &str) -> (Netns, String) {
    let ns = Netns::create(tag);
    ns.add_veth(LB_IF, None, &ns, PEER_IF, None);
    let gateway_mac = ns.mac(PEER_IF);
    (ns, gateway_mac)
}

/// A docker-registry process on 127.0.0.1:<free port>, storing in a temporary directory;
/// killed (by its pid) and waited for when dropped.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    dir: TempDir,
}

impl Registry {
    fn start(tag: &str) -> Registry {
        Registry::start_with(tag, |_| String::new())
    }

    /// With `extra(dir)`, lines of its config (`auth:`, `http.tls`), given the registry's directory.
    fn start_with(tag: &str, extra: impl FnOnce(&TempDir) -> String) -> Registry {
        let dir = TempDir::new(&format!("registry-{tag}")).unwrap_or_else(|e| panic!("{e:#}"));
        let extra = extra(&dir);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("a free port: {e}"))
            .port();
        let storage = dir.join("storage");
        let config = dir
            .write(
                "config.yml",
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n{extra}",
                    storage.display()
                ),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        let log = std::fs::File::create(dir.join("registry.log")).unwrap_or_else(|e| panic!("registry.log: {e}"));
        let child = Command::new("docker-registry")
            .args(["serve", utf8(&config)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("registry.log: {e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting docker-registry (apt-get install docker-registry): {e}"));
        let registry = Registry { child, port, storage, dir };
        let up = wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "docker-registry did not listen on 127.0.0.1:{port}");
        registry
    }

    /// `127.0.0.1:PORT/REPO`.
    fn repo(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    /// The file the registry serves the blob `digest` (`sha256:...`) from.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ballast push FILE REF --plain-http --json`, which must succeed: its report.
fn push(work: &Workspace, file: &Path, reference: &str) -> Value {
    let out = work.ballast(&["push", utf8(file), reference, "--plain-http", "--json"]).expect_success();
    out.json().unwrap_or_else(|e| panic!("push --json: {e:#}"))
}

fn skopeo(args: &[&str]) -> Output {
    run(Command::new("skopeo").args(args)).unwrap_or_else(|e| panic!("{e:#} (apt-get install skopeo)"))
}

fn ssh_keygen(args: &[&str]) {
    run(Command::new("ssh-keygen").args(args)).unwrap_or_else(|e| panic!("{e:#}")).expect_success();
}

/// A refused command: exit code, and the error names `why`.
fn expect_refused(out: Output, why: &str) {
    assert!(!out.success(), "not refused ({why}): {out}");
    assert!(out.stderr.contains(why), "the error does not say '{why}': {out}");
}

/// The last entry of the audit log of `work`.
fn last_audit(work: &Workspace) -> Value {
    let log = std::fs::read_to_string(work.state_dir().join("audit.jsonl")).unwrap_or_else(|e| panic!("audit: {e}"));
    let last = log.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("the last audit entry is not JSON ({e}): {last}"))
}

#[test]
fn push_and_pull_by_tag_and_digest_and_skopeo_reads_it() {
    if !require_root("push_and_pull_by_tag_and_digest_and_skopeo_reads_it") {
        return;
    }
    let registry = Registry::start("pull");
    let work = Workspace::new("oci-pull");
    let a: Artifact = work.build("a", &config("ipv4-one-vip"));
    let repo = registry.repo("lb/web");
    let pushed = push(&work, &a.path, &format!("{repo}:v1"));
    assert_eq!(pushed["generation"], a.digest.as_str(), "{pushed}");
    let manifest_digest = pushed["manifest_digest"].as_str().unwrap_or_default().to_owned();
    assert!(manifest_digest.starts_with("sha256:") && manifest_digest.len() == 71, "{pushed}");
    assert_eq!(pushed["pushed"], format!("{repo}@{manifest_digest}").as_str(), "{pushed}");
    assert_eq!(pushed["signature_tag"], Value::Null, "{pushed}");

    // By tag and by digest: the same bytes as the file, no signature.
    let original = std::fs::read(&a.path).unwrap_or_else(|e| panic!("{e}"));
    for (name, reference) in
        [("by-tag.bal", format!("{repo}:v1")), ("by-digest.bal", format!("{repo}@{manifest_digest}"))]
    {
        let file = work.path(name);
        let out = work.ballast(&["pull", &reference, "-o", utf8(&file), "--plain-http", "--json"]).expect_success();
        let report = out.json().unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(report["manifest_digest"], manifest_digest.as_str(), "{report}");
        assert_eq!(report["generation"], a.digest.as_str(), "{report}");
        assert_eq!(std::fs::read(&file).unwrap_or_else(|e| panic!("{e}")), original, "{reference}: other bytes");
        assert!(!PathBuf::from(format!("{}.sig", file.display())).exists(), "{reference}: a signature appeared");
    }

    // skopeo reads the manifest ballast wrote, and copies the blobs (checking their digests).
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{repo}:v1")]).expect_success();
    let manifest: Value = serde_json::from_str(&raw.stdout).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(manifest["artifactType"], "application/vnd.ballast.generation.v1", "{manifest}");
    assert_eq!(manifest["annotations"]["dev.ballast.generation.digest"], a.digest.as_str(), "{manifest}");
    assert_eq!(manifest["annotations"]["dev.ballast.generation.summary"], "1 VIPs, 1 backends", "{manifest}");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.ballast.generation.v1", "{manifest}");
    let copied = work.path("skopeo-copy");
    let out =
        skopeo(&["copy", "--src-tls-verify=false", &format!("docker://{repo}:v1"), &format!("dir:{}", utf8(&copied))]);
    out.expect_success();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap_or_default();
    let copied_layer = copied.join(layer.trim_start_matches("sha256:"));
    assert_eq!(std::fs::read(&copied_layer).unwrap_or_else(|e| panic!("{e}")), original, "skopeo's copy differs");

    // Manifests skopeo pushes from an edited copy: a layer of another media type is not a
    // ballast artifact; an annotation naming another generation is a digest mismatch.
    let edited = |tag: &str, edit: &dyn Fn(&mut Value)| {
        let mut changed = manifest.clone();
        edit(&mut changed);
        std::fs::write(copied.join("manifest.json"), changed.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let to = format!("docker://{repo}:{tag}");
        skopeo(&["copy", "--dest-tls-verify=false", &format!("dir:{}", utf8(&copied)), &to]).expect_success();
        let file = work.path(&format!("{tag}.bal"));
        let out = work.ballast(&["pull", &format!("{repo}:{tag}"), "-o", utf8(&file), "--plain-http"]);
        assert!(!file.exists(), "{tag}: a refused pull wrote its output");
        out
    };
    let foreign = edited("foreign", &|m| m["layers"][0]["mediaType"] = "application/octet-stream".into());
    expect_refused(foreign, "not a ballast artifact: the layer is a application/octet-stream");
    let other = "sha256:".to_owned() + &"0".repeat(64);
    let lying = edited("lying", &|m| m["annotations"]["dev.ballast.generation.digest"] = other.clone().into());
    expect_refused(lying, &format!("digest mismatch: {repo}@sha256:"));

    // What is not there, or not ballast's, is named as such; nothing is written.
    let missing = work.path("missing.bal");
    let out = work.ballast(&["pull", &format!("{repo}:nope"), "-o", utf8(&missing), "--plain-http"]);
    expect_refused(out, &format!("{repo}:nope: pulling the manifest: not found"));
    let closed = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap_or_else(|e| panic!("{e}"));
    let out = work.ballast(&["pull", &format!("{closed}/lb/web:v1"), "-o", utf8(&missing), "--plain-http"]);
    expect_refused(out, "registry unreachable");
    assert!(!missing.exists(), "a failed pull wrote its output");
}

#[test]
fn attach_and_swap_from_oci_record_the_digest_and_refuse_other_bytes() {
    if !require_root("attach_and_swap_from_oci_record_the_digest_and_refuse_other_bytes") {
        return;
    }
    let registry = Registry::start("attach");
    let (ns, gateway_mac) = namespace("oci");
    let work = ns.work();
    let a = work.build("a", &config("ipv4-one-vip"));
    let b = work.build("b", &config("ipv4-only"));
    let repo = registry.repo("lb/edge");
    let pushed_a = push(work, &a.path, &format!("{repo}:live"));
    let digest_a = pushed_a["manifest_digest"].as_str().unwrap_or_default().to_owned();

    let reference = format!("oci://{repo}:live");
    let out = ns.ballast(&[
        "attach",
        "--config",
        &reference,
        "--iface",
        LB_IF,
        "--gateway-mac",
        &gateway_mac,
        "--plain-http",
    ]);
    let out = out.expect_success();
    assert!(out.stdout.contains(&format!("attached {}", a.digest)), "{out}");
    let entry = last_audit(work);
    assert_eq!((entry["action"].as_str(), entry["result"].as_str()), (Some("attach"), Some("ok")), "{entry}");
    assert_eq!(entry["to"], a.digest.as_str(), "{entry}");
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert_eq!(
        reason,
        format!("pulled from oci://{repo}@{digest_a}"),
        "the audit entry does not name the digest: {entry}"
    );
    assert!(!reason.contains(":live"), "the audit entry names the tag: {entry}");
    let verify = |digest: &str| {
        let out = ns.ballast(&["verify", "--iface", LB_IF]).expect_success();
        assert!(out.stdout.contains(&format!("verified: {digest} runs as recorded")), "{out}");
    };
    verify(&a.digest);

    // The registry serves other bytes for B's layer: the swap is refused, A runs on.
    let pushed_b = push(work, &b.path, &format!("{repo}:next"));
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{repo}:next")]).expect_success();
    let manifest: Value = serde_json::from_str(&raw.stdout).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let layer = registry.blob_file(manifest["layers"][0]["digest"].as_str().unwrap_or_default());
    let mut bytes = std::fs::read(&layer).unwrap_or_else(|e| panic!("{}: {e}", layer.display()));
    let good = bytes.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&layer, &bytes).unwrap_or_else(|e| panic!("{}: {e}", layer.display()));
    let out = ns.ballast(&["swap", &format!("oci://{repo}:next"), "--iface", LB_IF, "--plain-http"]);
    expect_refused(out, "digest mismatch");
    verify(&a.digest);

    // Whole again, by digest: B goes live, its manifest digest recorded.
    std::fs::write(&layer, &good).unwrap_or_else(|e| panic!("{}: {e}", layer.display()));
    let pinned = pushed_b["pushed"].as_str().unwrap_or_default().to_owned();
    let out = ns.ballast(&["swap", &format!("oci://{pinned}"), "--iface", LB_IF, "--plain-http"]);
    out.expect_success();
    verify(&b.digest);
    let entry = last_audit(work);
    assert_eq!((entry["action"].as_str(), entry["to"].as_str()), (Some("swap"), Some(b.digest.as_str())), "{entry}");
    assert_eq!(entry["reason"], format!("pulled from oci://{pinned}").as_str(), "{entry}");
}

#[test]
fn the_trust_policy_applies_to_pulled_generations() {
    if !require_root("the_trust_policy_applies_to_pulled_generations") {
        return;
    }
    let registry = Registry::start("trust");
    let (ns, gateway_mac) = namespace("ocisig");
    let work = ns.work();
    let key = work.path("ops");
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", utf8(&key)]);
    let public = std::fs::read_to_string(work.path("ops.pub")).unwrap_or_else(|e| panic!("ops.pub: {e}"));
    let allowed = work.write("allowed_signers", format!("ops@example.org namespaces=\"ballast\" {public}"));
    std::fs::create_dir_all(work.state_dir()).unwrap_or_else(|e| panic!("the state directory: {e}"));
    let policy = format!("[signatures]\nrequired = true\nallowed_signers = \"{}\"\n", allowed.display());
    std::fs::write(work.state_dir().join("policy.toml"), policy).unwrap_or_else(|e| panic!("policy.toml: {e}"));

    let a = work.build("a", &config("ipv4-one-vip"));
    let repo = registry.repo("lb/signed");
    push(work, &a.path, &format!("{repo}:unsigned"));
    let attach = |tag: &str| {
        let reference = format!("oci://{repo}:{tag}");
        ns.ballast(&["attach", "--config", &reference, "--iface", LB_IF, "--gateway-mac", &gateway_mac, "--plain-http"])
    };
    expect_refused(attach("unsigned"), "unsigned");
    assert_eq!(ns.xdp_program_id(LB_IF), None, "an unsigned pulled generation was loaded");

    // Signed, the signature pushed with it (its own tag) and pulled with it: attached.
    ssh_keygen(&["-q", "-Y", "sign", "-n", "ballast", "-f", utf8(&key), utf8(&a.path)]);
    let pushed = push(work, &a.path, &format!("{repo}:signed"));
    let manifest_digest = pushed["manifest_digest"].as_str().unwrap_or_default();
    assert_eq!(pushed["signature_tag"], format!("{}.sig", manifest_digest.replace(':', "-")).as_str(), "{pushed}");
    attach("signed").expect_success();
    let entry = last_audit(work);
    assert_eq!(entry["signed"]["principal"], "ops@example.org", "{entry}");
    assert!(entry["signed"]["covers"].as_str().is_some_and(|c| c.contains(&a.digest)), "{entry}");
    let out = ns.ballast(&["verify", "--iface", LB_IF]).expect_success();
    assert!(out.stdout.contains(&format!("verified: {} runs as recorded", a.digest)), "{out}");
}

#[test]
fn credentials_come_from_the_flags_or_the_docker_config() {
    if !require_root("credentials_come_from_the_flags_or_the_docker_config") {
        return;
    }
    // The user `ci` with the password `ballast-test-password` (bcrypt, cost 4, as htpasswd -B).
    let users = "ci:$2b$04$9/c5pe7bOR2eIhjtxdxSlO/Bqai.Qc7JxlzB0cTrlnSVfNqgFFStC\n";
    let registry = Registry::start_with("auth", |dir| {
        let file = dir.write("htpasswd", users).unwrap_or_else(|e| panic!("{e:#}"));
        format!("auth:\n  htpasswd:\n    realm: ballast-test\n    path: {}\n", file.display())
    });
    let work = Workspace::new("oci-auth");
    let a = work.build("a", &config("ipv4-one-vip"));
    let reference = format!("{}:v1", registry.repo("lb/private"));
    let with_password = |args: &[&str], password: &str| {
        let mut command = work.command(args);
        command.env("DOCKER_CONFIG", work.path("no-docker-config"));
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ballast: {e}"));
        let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        std::io::Write::write_all(&mut stdin, format!("{password}\n").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        drop(stdin);
        child.wait_with_output().unwrap_or_else(|e| panic!("ballast: {e}"))
    };
    let push = ["push", a.arg(), &reference, "--plain-http"];

    // Anonymous, or with a wrong password: unauthorized, nothing pushed.
    let anonymous = |args: &[&str]| {
        run(work.command(args).env("DOCKER_CONFIG", work.path("no-docker-config"))).unwrap_or_else(|e| panic!("{e:#}"))
    };
    expect_refused(anonymous(&push), &format!("{reference}: pushing the config: unauthorized"));
    let out = with_password(&[&push[..], &["--username", "ci", "--password-stdin"]].concat(), "wrong");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("unauthorized"), "{stderr}");

    // --username with --password-stdin.
    let out = with_password(&[&push[..], &["--username", "ci", "--password-stdin"]].concat(), "ballast-test-password");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // ~/.docker/config.json's auths (here $DOCKER_CONFIG/config.json), as docker login writes it.
    let pulled = work.path("pulled.bal");
    let pull = ["pull", &reference, "-o", utf8(&pulled), "--plain-http"];
    expect_refused(anonymous(&pull), &format!("{reference}: pulling the manifest: unauthorized"));
    let config_dir = work.path("docker");
    std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
    // base64("ci:ballast-test-password")
    let auths = r#"{"auths": {"REGISTRY": {"auth": "Y2k6YmFsbGFzdC10ZXN0LXBhc3N3b3Jk"}}}"#;
    let registry_host = format!("127.0.0.1:{}", registry.port);
    std::fs::write(config_dir.join("config.json"), auths.replace("REGISTRY", &registry_host))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run(work.command(&pull).env("DOCKER_CONFIG", &config_dir)).unwrap_or_else(|e| panic!("{e:#}"));
    out.expect_success();
    assert_eq!(std::fs::read(&pulled).ok(), std::fs::read(&a.path).ok(), "the pulled artifact differs");
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args)).unwrap_or_else(|e| panic!("{e:#}")).expect_success();
}

#[test]
fn a_private_ca_is_trusted_with_ca_file_only() {
    if !require_root("a_private_ca_is_trusted_with_ca_file_only") {
        return;
    }
    // A CA, and the registry's certificate for 127.0.0.1 signed by it.
    let registry = Registry::start_with("tls", |dir| {
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ballast-test-ca"],
            ]
            .concat(),
        );
        openssl(
            dir.path(),
            &[&["req"][..], &ec, &["-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1"]].concat(),
        );
        dir.write("leaf.ext", "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
            .unwrap_or_else(|e| panic!("{e:#}"));
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-extfile",
                "leaf.ext",
            ],
        );
        format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        )
    });
    let ca = registry.dir.join("ca.pem");
    let work = Workspace::new("oci-tls");
    let a = work.build("a", &config("ipv4-one-vip"));
    let reference = format!("{}:v1", registry.repo("lb/tls"));
    let out = work.ballast(&["push", a.arg(), &reference]);
    expect_refused(out, "invalid peer certificate");
    work.ballast(&["push", a.arg(), &reference, "--ca-file", utf8(&ca)]).expect_success();
    let pulled = work.path("pulled.bal");
    work.ballast(&["pull", &reference, "-o", utf8(&pulled), "--ca-file", utf8(&ca)]).expect_success();
    assert_eq!(std::fs::read(&pulled).ok(), std::fs::read(&a.path).ok(), "the pulled artifact differs");
}
