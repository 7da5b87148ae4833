//! `ballast build` and `ballast check`: config to generation, without the kernel.
use std::path::Path;

use serde::Serialize;

use crate::{
    files,
    generation::{
        artifact::Artifact,
        config::Config,
        describe,
        lineage::{LineageOptions, LineageSummary},
        program, Generation,
    },
    Error, Result,
};

/// What `ballast build --json` prints.
#[derive(Serialize)]
pub struct Built {
    pub digest: String,
    pub output: String,
    pub bytes: usize,
    pub vips: usize,
    pub backends: usize,
    /// With --after: the predecessors' digests, newest first, and the slots that changed
    /// owner; None: a settled generation.
    pub lineage: Option<LineageSummary>,
}

/// What `ballast check --json` prints.
#[derive(Serialize)]
pub struct Checked {
    pub config: String,
    pub valid: bool,
    pub vips: Vec<CheckedVip>,
    pub backends: usize,
    pub table_entries: usize,
}

#[derive(Serialize)]
pub struct CheckedVip {
    pub vip: String,
    pub table_size: u32,
    pub backends: usize,
}

/// Builds `config` into `output`; with `after` = (PREV, depth), after the artifact PREV.
pub fn build(config: &Path, output: &Path, after: Option<(&Path, usize)>, json: bool) -> Result<()> {
    // Judged before anything is built or written: the output must not be the input (through
    // a symlink or a hard link either), nor anything but a regular file.
    if files::same_file(config, output) {
        return Err(Error::Other(format!(
            "-o {} is the config itself: the artifact would destroy it; nothing was written",
            output.display()
        )));
    }
    files::write_target(output)?;
    let config = Config::load(config)?;
    let artifact = match after {
        None => Artifact::build(&config, program::LOAD_BALANCER)?,
        Some((previous, depth)) => {
            let previous = Artifact::read(previous).map_err(|e| e.context("--after"))?;
            let options = LineageOptions { depth, ..LineageOptions::default() };
            Artifact::build_after(&config, program::LOAD_BALANCER, &previous, &options)?
        }
    };
    let bytes = artifact.to_bytes();
    artifact.write(output)?;
    let built = Built {
        digest: artifact.digest_string(),
        output: output.display().to_string(),
        bytes: bytes.len(),
        vips: artifact.generation.vip_count(),
        backends: artifact.generation.backends.len(),
        lineage: LineageSummary::of(&artifact, artifact.generation.lineage.len()),
    };
    super::print(&built, json, |built| {
        let lineage = built.lineage.as_ref().map_or(String::new(), |l| format!("lineage: {}\n", l.render()));
        format!("{}\n{lineage}", built.digest)
    })
}

pub fn check(config: &Path, json: bool) -> Result<()> {
    let generation = Generation::build(&Config::load(config)?)?;
    if json {
        super::print(&checked(config, &generation), true, |_| String::new())
    } else {
        super::out(&render_check(config, &generation))
    }
}

pub fn checked(config: &Path, generation: &Generation) -> Checked {
    Checked {
        config: config.display().to_string(),
        valid: true,
        vips: generation
            .config
            .vips
            .iter()
            .map(|vip| CheckedVip { vip: describe(vip), table_size: vip.table_size, backends: vip.backends.len() })
            .collect(),
        backends: generation.backends.len(),
        table_entries: generation.maglev.len(),
    }
}

pub fn render_check(config: &Path, generation: &Generation) -> String {
    let mut out = format!(
        "{}: valid; {} VIPs, {} backends, {} table entries\n",
        config.display(),
        generation.vip_count(),
        generation.backends.len(),
        generation.maglev.len()
    );
    for vip in &generation.config.vips {
        out.push_str(&format!("  {}  table {}  backends {}\n", describe(vip), vip.table_size, vip.backends.len()));
    }
    out
}
