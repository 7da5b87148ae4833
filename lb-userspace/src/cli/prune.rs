//! `ballast prune`.
use serde::Serialize;

use crate::{
    ops::prune::{self, Stale},
    Result,
};

/// One removed (or, with `--dry-run`, removable) pin directory, as `--json` prints it.
#[derive(Serialize)]
pub struct Pruned {
    pub dir: String,
    /// "generation" or "decapsulator".
    pub what: &'static str,
    pub removed: bool,
}

pub fn run(dry_run: bool, json: bool) -> Result<()> {
    let stale = prune::prune(dry_run)?;
    if json {
        let pruned: Vec<Pruned> = stale
            .iter()
            .map(|s| Pruned { dir: s.dir.display().to_string(), what: s.what, removed: !dry_run })
            .collect();
        super::print(pruned.as_slice(), true, |_| String::new())
    } else {
        super::out(&render(&stale, dry_run))
    }
}

pub fn render(stale: &[Stale], dry_run: bool) -> String {
    if stale.is_empty() {
        return "nothing to prune: every pinned link is attached\n".to_owned();
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    stale
        .iter()
        .map(|Stale { dir, what }| format!("{verb} {} ({what} detached: its interface is gone)\n", dir.display()))
        .collect()
}
