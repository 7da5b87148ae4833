//! `ballast push FILE REGISTRY/REPO[:TAG]`.
use std::path::Path;

use serde::Serialize;

use super::args::RegistryArgs;
use crate::{
    error::Context as _,
    ops::registry::{self, Pushed, RegistryOptions},
    Result,
};

impl RegistryArgs {
    /// The registry options; the password, with `--password-stdin`, is read from stdin now.
    pub(crate) fn options(&self) -> Result<RegistryOptions> {
        let password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("--password-stdin: reading stdin")?;
            Some(line.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            None
        };
        Ok(RegistryOptions {
            plain_http: self.plain_http,
            ca_file: self.ca_file.clone(),
            username: self.username.clone(),
            password,
        })
    }
}

#[derive(Serialize)]
struct PushReport {
    pushed: String,
    manifest_digest: String,
    generation: String,
    signature_tag: Option<String>,
}

pub fn run(file: &Path, reference: &str, registry: &RegistryArgs, json: bool) -> Result<()> {
    let Pushed { pinned, manifest_digest, generation_digest, signature_tag } =
        registry::push(file, reference, &registry.options()?)?;
    let report = PushReport { pushed: pinned, manifest_digest, generation: generation_digest, signature_tag };
    super::print(&report, json, render)
}

fn render(report: &PushReport) -> String {
    let signature = match &report.signature_tag {
        Some(tag) => format!("; signature as tag {tag}"),
        None => "; no signature".to_owned(),
    };
    format!("pushed generation {} as {}{signature}\n", report.generation, report.pushed)
}
