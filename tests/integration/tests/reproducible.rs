//! Reproducible artifacts: a generation's digest covers its config and the program's bytes, so
//! the same commit must give the same eBPF objects wherever it is built. This test copies the
//! sources the objects are made of (lb-common, lb-ebpf, the workspace manifest and lock, and
//! lb-userspace's build script verbatim) into a temporary directory, runs that build script
//! there with a target directory of its own, and wants each object it makes to have the digest
//! `ballast version --json` gives for the one this ballast carries. Only the eBPF crate and the
//! build script's few dependencies are built (about a minute), not the workspace. No root.
//! And `ballast version --json` itself: each digest is the SHA-256 of the bytes ballast embeds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use ballast_test_support::{ballast_binary, run, run_with_timeout, TempDir};

/// The build script's package in the copy: lb-userspace's build.rs and build_ebpf.rs with only
/// its build-dependencies, and an empty library.
const PROBE: &str = "lb-userspace";

#[test]
fn ebpf_objects_are_the_same_when_built_in_another_directory() {
    let carried = carried_programs().unwrap();
    let copy = TempDir::new("reproducible").unwrap();
    let workspace = workspace_root();
    assert_ne!(copy.path(), workspace, "the copy must be somewhere else");
    let out_dir = build_copy(&workspace, copy.path()).unwrap();
    for (name, digest) in &carried {
        let object = out_dir.join(name);
        let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("reading {}: {e}", object.display()));
        let copy_root = copy.path().to_string_lossy().into_owned();
        let workspace_root = workspace.to_string_lossy().into_owned();
        let named: Vec<&String> =
            [&copy_root, &workspace_root].into_iter().filter(|dir| contains(&bytes, dir.as_bytes())).collect();
        assert_eq!(
            &sha256(&object).unwrap(),
            digest,
            "{name} built in {copy_root} differs from the one ballast carries (built in {workspace_root}); \
             it names the build directories {named:?}"
        );
        assert!(named.is_empty(), "{name} names the build directories {named:?}");
    }
}

#[test]
fn version_json_gives_the_digest_of_each_embedded_program() {
    let output = run(Command::new(ballast_binary().unwrap()).args(["version", "--json"])).unwrap().expect_success();
    let version = output.json().unwrap();
    let clap = run(Command::new(ballast_binary().unwrap()).arg("--version")).unwrap().expect_success();
    assert_eq!(clap.stdout.trim(), format!("ballast {}", version["version"].as_str().unwrap()), "{output}");
    let dir = TempDir::new("version-json").unwrap();
    let embedded = [
        ("lb-ebpf", ballast::generation::program::LOAD_BALANCER),
        ("lb-decap", ballast::generation::program::DECAPSULATOR),
        ("lb-health", ballast::generation::program::HEALTH_TUNNEL),
    ];
    let carried = carried_programs().unwrap();
    assert_eq!(carried.len(), embedded.len(), "{output}");
    for ((name, digest), (embedded_name, bytes)) in carried.iter().zip(embedded) {
        assert_eq!(name, embedded_name, "{output}");
        let object = dir.write(name, bytes).unwrap();
        assert_eq!(digest, &sha256(&object).unwrap(), "{name}: {output}");
        let listed = version["programs"].as_array().unwrap().iter().find(|p| p["name"] == name.as_str()).unwrap();
        assert_eq!(listed["bytes"].as_u64(), Some(bytes.len() as u64), "{output}");
        assert!(listed["role"].as_str().is_some_and(|r| !r.is_empty()), "{output}");
    }
    let text = run(Command::new(ballast_binary().unwrap()).arg("version")).unwrap().expect_success();
    for (name, digest) in &carried {
        assert!(text.stdout.lines().any(|l| l.starts_with(name.as_str()) && l.contains(digest.as_str())), "{text}");
    }
}

/// `ballast version --json`: each carried program's name and digest.
fn carried_programs() -> anyhow::Result<Vec<(String, String)>> {
    let output = run(Command::new(ballast_binary()?).args(["version", "--json"]))?.ok()?;
    let version = output.json()?;
    let programs = version["programs"].as_array().ok_or_else(|| anyhow!("no programs: {output}"))?;
    let named = programs
        .iter()
        .map(|p| Some((p["name"].as_str()?.to_owned(), p["digest"].as_str()?.to_owned())))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| anyhow!("a program without name or digest: {output}"))?;
    if named.len() != 3 {
        bail!("expected the load balancer, the decapsulator and the health program: {output}");
    }
    Ok(named)
}

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// Copies what the eBPF objects are built from into `copy`, builds lb-userspace's build script
/// there and returns its OUT_DIR.
fn build_copy(workspace: &Path, copy: &Path) -> anyhow::Result<PathBuf> {
    for part in ["Cargo.lock", "ebpf-toolchain.rs", "lb-common", "lb-ebpf"] {
        run(Command::new("cp").arg("-r").arg(workspace.join(part)).arg(copy))?.ok()?;
    }
    let manifest = read(&workspace.join("Cargo.toml"))?;
    let members = format!("[\"lb-common\", \"lb-ebpf\", \"{PROBE}\"]");
    let manifest = replace_array(&manifest, "\nmembers = [", &members)?;
    let manifest = replace_array(&manifest, "\ndefault-members = [", &members)?;
    write(&copy.join("Cargo.toml"), &manifest)?;

    let probe = copy.join(PROBE);
    std::fs::create_dir_all(probe.join("src")).context("creating the probe crate")?;
    for file in ["build.rs", "build_ebpf.rs"] {
        std::fs::copy(workspace.join("lb-userspace").join(file), probe.join(file))
            .with_context(|| format!("copying lb-userspace/{file}"))?;
    }
    let real = read(&workspace.join("lb-userspace/Cargo.toml"))?;
    let build_dependencies = section(&real, "[build-dependencies]")?;
    write(
        &probe.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"{PROBE}\"\nversion = \"0.0.0\"\nedition.workspace = true\npublish = false\n\n\
             {build_dependencies}"
        ),
    )?;
    write(&probe.join("src/lib.rs"), "")?;

    let target = copy.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(copy).args(["build", "--offline", "-p", PROBE]).env("CARGO_TARGET_DIR", &target);
    run_with_timeout(&mut build, Duration::from_secs(600))?.ok()?;
    // target/debug/build/lb-userspace-HASH/out: the one holding the objects.
    let builds = target.join("debug/build");
    let entries = std::fs::read_dir(&builds).with_context(|| format!("reading {}", builds.display()))?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("out"))
        .find(|out| out.join("lb-ebpf").is_file())
        .ok_or_else(|| anyhow!("no OUT_DIR with lb-ebpf under {}", builds.display()))
}

/// `text` with the TOML array that starts at `start` (up to its `]`) replaced by `with`.
fn replace_array(text: &str, start: &str, with: &str) -> anyhow::Result<String> {
    let from = text.find(start).ok_or_else(|| anyhow!("no `{}` in the workspace manifest", start.trim()))?;
    let open = from + start.len() - 1;
    let close = open + text[open..].find(']').ok_or_else(|| anyhow!("`{}` has no `]`", start.trim()))?;
    Ok(format!("{}{with}{}", &text[..open], &text[close + 1..]))
}

/// The TOML table `header` of `text`, up to the next table.
fn section(text: &str, header: &str) -> anyhow::Result<String> {
    let from = text.find(header).ok_or_else(|| anyhow!("no {header} in lb-userspace/Cargo.toml"))?;
    let rest = &text[from + header.len()..];
    let end = rest.find("\n[").map_or(rest.len(), |i| i + 1);
    Ok(format!("{header}{}", &rest[..end]))
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    ballast_test_support::sha256sum(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
