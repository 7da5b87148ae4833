//! Running external commands: one place that starts them, checks their status and names
//! the command in every error.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// The cargo that started xtask (or `cargo` from PATH), to run in the workspace root.
pub fn cargo() -> Result<Command> {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(program);
    command.current_dir(workspace_root()?);
    Ok(command)
}

/// The command as a shell line, with the environment it sets, for messages.
pub fn describe(command: &Command) -> String {
    let environment = command
        .get_envs()
        .filter_map(|(name, value)| Some(format!("{}={}", name.to_string_lossy(), value?.to_string_lossy())));
    let program = command.get_program().to_string_lossy();
    let arguments = command.get_args().map(|argument| argument.to_string_lossy());
    environment
        .chain(std::iter::once(program.into_owned()))
        .chain(arguments.map(|argument| argument.into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints and runs `command` with the terminal's stdout and stderr, and returns its status.
pub fn status_of(command: &mut Command) -> Result<ExitStatus> {
    let line = describe(command);
    println!("$ {line}");
    command.status().with_context(|| format!("could not start `{line}`"))
}

/// Prints and runs `command`; Err names the command when it cannot start or exits non-zero.
pub fn run(command: &mut Command) -> Result<()> {
    let status = status_of(command)?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(command));
    }
    Ok(())
}

/// For probes: whether `command` starts and exits 0; its output is discarded.
pub fn succeeds(command: &mut Command) -> bool {
    stdout_of(command).is_some()
}

/// For probes: `command`'s stdout when it starts and exits 0, else None; stderr is discarded.
pub fn stdout_of(command: &mut Command) -> Option<String> {
    let output = command.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
