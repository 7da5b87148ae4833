//! Commands run to their end with a deadline, their output captured.
use std::fmt;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// What [`run`] allows a command unless told otherwise (a ballast attach or swap of a test
/// config takes well under a second, a debug build's pre-flight a few).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// The program and its arguments, for messages.
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (None: ended by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Exited on its own with a non-zero code (a crash by signal is not a refusal).
    pub fn refused(&self) -> bool {
        self.code().is_some_and(|code| code != 0)
    }

    /// Panics, showing everything, unless the command succeeded (for tests).
    #[track_caller]
    pub fn expect_success(self) -> Output {
        assert!(self.success(), "expected success: {self}");
        self
    }

    /// Panics, showing everything, unless the command exited with `code` (for tests).
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Output {
        assert_eq!(self.code(), Some(code), "expected exit code {code}: {self}");
        self
    }

    /// Itself if it succeeded, else an error showing everything (for the lab and bench).
    pub fn ok(self) -> anyhow::Result<Output> {
        if !self.success() {
            bail!("{self}");
        }
        Ok(self)
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {self}"))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout\n{}--- stderr\n{}",
            self.command_line, self.status, self.stdout, self.stderr
        )
    }
}

/// [`run_with_timeout`] with [`DEFAULT_TIMEOUT`].
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    run_with_timeout(command, DEFAULT_TIMEOUT)
}

/// Runs `command` (stdin from /dev/null, stdout and stderr captured) to its end; whatever its
/// exit status, that is the `Output`. Err when it cannot be started, or when it runs longer
/// than `timeout`: then it is killed (SIGKILL) and reaped first, and the error shows what it
/// printed so far. Never panics. Output that a left-behind grandchild keeps writing to the
/// inherited pipes is not waited for beyond a short grace period.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let command_line = command_line(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{command_line}`"))?;
    let stdout = Captured::start(child.stdout.take());
    let stderr = Captured::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            outcome => {
                let _already_gone = child.kill();
                let _reaped = child.wait();
                let why = match outcome {
                    Ok(_) => format!("ran longer than {timeout:?} and was killed"),
                    Err(err) => format!("could not be waited for ({err}) and was killed"),
                };
                return Err(anyhow!(
                    "`{command_line}` {why}\n--- stdout\n{}--- stderr\n{}",
                    stdout.finish(),
                    stderr.finish()
                ));
            }
        }
    };
    Ok(Output { command_line, status, stdout: stdout.finish(), stderr: stderr.finish() })
}

/// `ip args` (iproute2), which must succeed; its stdout.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    Ok(run(Command::new("ip").args(args))?.ok()?.stdout)
}

/// `program arg arg`, with the environment the command adds (`VAR=value program ...`).
fn command_line(command: &Command) -> String {
    let envs = command
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), value?.to_string_lossy())));
    let words =
        std::iter::once(command.get_program()).chain(command.get_args()).map(|w| w.to_string_lossy().into_owned());
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// A pipe read on a thread of its own into a buffer.
struct Captured {
    text: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Captured {
    /// How long output may still arrive after the command ended.
    const GRACE: Duration = Duration::from_secs(2);

    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Captured {
        let text = Arc::new(Mutex::new(Vec::new()));
        let buffer = Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                buffer.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&chunk[..n]);
            }
        });
        Captured { text, reader }
    }

    /// What was read: all of it once the pipe closes, or what came within [`Self::GRACE`].
    fn finish(self) -> String {
        let deadline = Instant::now() + Self::GRACE;
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let bytes = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The digest (`sha256:` and hex) `sha256sum`, an implementation independent of ballast's,
/// gives `bytes`.
pub fn sha256sum(bytes: &[u8]) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    let mut stdin = child.stdin.take().context("sha256sum has no stdin")?;
    stdin.write_all(bytes).context("writing to sha256sum")?;
    drop(stdin);
    let out = child.wait_with_output().context("sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().context("sha256sum printed nothing")?;
    Ok(format!("sha256:{hex}"))
}
