//! ballast: an immutable eBPF/XDP layer-4 load balancer (user space).
//!
//! Layers, each using only the ones listed before it (no cycles):
//! - [`generation`]: config to tables, artifact, digest; pure, no kernel, testable without root.
//! - [`kernel`]: loading, freezing and attaching programs, syscalls aya does not wrap, pins,
//!   network namespaces, reading back what runs.
//! - [`state`]: the state directory: kept artifacts, interface records, the audit log.
//! - [`ops`]: what the commands do: attach, swap, rollback, recover, verify, status, decap, prune.
//! - [`daemon`]: `ballast run`: health checks, reloads, metrics.
//! - [`cli`]: the command line: clap types, one file per command or group, renderers.
pub mod cli;
pub mod daemon;
pub mod error;
mod files;
pub mod generation;
pub mod kernel;
pub mod ops;
pub mod state;

pub use error::{Error, Result};

#[cfg(test)]
mod layers {
    //! The layers above, checked in the source: a module may use only the ones before it.
    use std::path::Path;

    /// Bottom first; `main.rs` is outside the library.
    const LAYERS: [&str; 8] = ["error", "files", "generation", "kernel", "state", "ops", "daemon", "cli"];

    /// The crate-level modules a source file names through `crate::`.
    fn uses(source: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find("};").unwrap_or(group.len());
                // Top-level names of the group: each name at depth 0 (before `::`, `,` or the end).
                let (mut depth, mut name, mut in_path) = (0, String::new(), false);
                for c in group[..end].chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            if !in_path && !name.is_empty() {
                                found.push(std::mem::take(&mut name));
                            }
                            (name, in_path) = (String::new(), false);
                        }
                        ':' if depth == 0 && !in_path => {
                            found.push(std::mem::take(&mut name));
                            in_path = true;
                        }
                        c if depth == 0 && !in_path && (c.is_alphanumeric() || c == '_') => name.push(c),
                        _ => {}
                    }
                }
                if !in_path && !name.is_empty() {
                    found.push(name);
                }
            } else {
                found.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
        found
    }

    fn layer_of(relative: &Path) -> &str {
        let first = relative.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("");
        first.strip_suffix(".rs").unwrap_or(first)
    }

    fn check(dir: &Path, root: &Path, violations: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                check(&path, root, violations);
                continue;
            }
            let relative = path.strip_prefix(root).unwrap();
            let layer = layer_of(relative);
            let Some(rank) = LAYERS.iter().position(|l| *l == layer) else { continue };
            let source = std::fs::read_to_string(&path).unwrap();
            for used in uses(&source) {
                if let Some(used_rank) = LAYERS.iter().position(|l| *l == used) {
                    if used_rank > rank {
                        violations.push(format!("{} ({layer}) uses crate::{used}", relative.display()));
                    }
                }
            }
        }
    }

    #[test]
    fn every_module_uses_only_the_layers_below_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut violations = Vec::new();
        check(&root, &root, &mut violations);
        assert!(violations.is_empty(), "layering broken:\n{}", violations.join("\n"));
    }

    #[test]
    fn the_checker_sees_grouped_and_inline_uses() {
        let source =
            "use crate::{\n    generation::{a, b},\n    kernel::pins,\n    Error,\n};\nfn f() { crate::ops::x(); }";
        assert_eq!(uses(source), ["generation", "kernel", "Error", "ops"]);
    }
}
