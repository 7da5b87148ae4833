//! `ballast pull REF -o FILE`, and the `oci://REF` generations of attach and swap.
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::args::RegistryArgs;
use crate::{
    generation::signature::signature_path,
    ops::registry::{self, Pulled},
    state::StateDir,
    Result,
};

impl RegistryArgs {
    /// `generation` as a file to read: an `oci://REF` is pulled into the state directory
    /// (tag resolved once), with the reference by digest it was pulled as.
    pub(crate) fn resolve(&self, state: &StateDir, generation: &Path) -> Result<(PathBuf, Option<String>)> {
        match registry::oci_reference(generation) {
            Some(reference) => {
                let (file, pinned) = registry::pull_into_state(state, reference, &self.options()?)?;
                Ok((file, Some(pinned)))
            }
            None => Ok((generation.to_owned(), None)),
        }
    }
}

/// The audit entry's reason for a generation pulled as `pinned`.
pub(crate) fn pulled_reason(pinned: Option<String>) -> Option<String> {
    pinned.map(|pinned| format!("pulled from {pinned}"))
}

#[derive(Serialize)]
struct PullReport {
    pulled: String,
    manifest_digest: String,
    generation: String,
    file: PathBuf,
    signature: Option<PathBuf>,
}

pub fn run(reference: &str, output: &Path, registry: &RegistryArgs, json: bool) -> Result<()> {
    let pulled: Pulled = registry::pull(reference, &registry.options()?)?;
    registry::write_pulled(&pulled, output)?;
    let report = PullReport {
        pulled: pulled.pinned,
        manifest_digest: pulled.manifest_digest,
        generation: pulled.generation_digest,
        file: output.to_owned(),
        signature: pulled.signature.is_some().then(|| signature_path(output)),
    };
    super::print(&report, json, render)
}

fn render(report: &PullReport) -> String {
    let signature = match &report.signature {
        Some(path) => format!(", signature {}", path.display()),
        None => ", no signature".to_owned(),
    };
    format!("pulled {} (generation {}) to {}{signature}\n", report.pulled, report.generation, report.file.display())
}
