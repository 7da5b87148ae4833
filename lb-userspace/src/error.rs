//! The library's errors. Callers act on the variants: the CLI maps them to exit codes, the
//! daemon and recovery tell "nothing runs" from "could not tell", tests match them. Every
//! message is whole on its own (its causes included), so `{}` prints what `anyhow`'s `{:#}`
//! would: the library's errors have no `source()` chain to print twice.
use std::fmt;

/// A refused config: `path` names the field (`vip[2].backends[5].address`), or is empty when
/// the file as a whole is at fault (TOML syntax, unknown keys, generation limits). It lives
/// here, below every layer, and `generation::config` re-exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or text was refused; nothing was changed.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A file is not a readable generation artifact (or config): damaged, truncated, not
    /// ballast's, of another format version.
    #[error("{0}")]
    ArtifactUnreadable(String),
    /// An artifact's content does not hash to the digest it records.
    #[error("digest mismatch: {0}")]
    DigestMismatch(String),
    /// The artifact's program is not the one this ballast carries, and that was not allowed
    /// explicitly (`--allow-foreign-program`).
    #[error("{0}")]
    ForeignProgram(String),
    /// No generation runs on the interface (or nothing is recorded for it).
    #[error("{0}")]
    NotAttached(String),
    /// A generation (or the decapsulator) already runs where one was to be attached.
    #[error("{0}")]
    AlreadyAttached(String),
    /// Another ballast command holds the interface's lock.
    #[error("{0}")]
    LockHeld(String),
    /// A generation failed its pre-flight; it was not attached.
    #[error("{0}")]
    PreflightFailed(String),
    /// The kernel refused a bpf or netlink operation.
    #[error("{what}: {detail}")]
    KernelRefused { what: String, detail: String },
    /// A file or directory could not be read or written.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Anything else, described; no caller tells these apart.
    #[error("{0}")]
    Other(String),
    /// `context: cause`.
    #[error("{context}: {cause}")]
    Context { context: String, cause: Box<Error> },
}

impl Error {
    /// The error under every added context: the variant that says what happened.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { cause, .. } => cause.root(),
            other => other,
        }
    }

    /// The `ballast` command's exit code for this error (README, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self.root() {
            Error::Config(_) => 3,
            Error::ArtifactUnreadable(_) | Error::DigestMismatch(_) | Error::ForeignProgram(_) => 4,
            Error::NotAttached(_) => 5,
            Error::AlreadyAttached(_) => 6,
            Error::LockHeld(_) => 7,
            Error::PreflightFailed(_) => 8,
            Error::KernelRefused { .. } => 9,
            Error::Io { .. } | Error::Other(_) | Error::Context { .. } => 1,
        }
    }

    pub fn other(message: impl fmt::Display) -> Error {
        Error::Other(message.to_string())
    }

    /// This error as the cause of `context`.
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error::Context { context: context.to_string(), cause: Box::new(self) }
    }
}

/// `return Err(Error::Other(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($message:tt)*) => {
        return Err($crate::Error::Other(format!($($message)*)))
    };
}

/// `Error::Other(format!(...))`.
#[macro_export]
macro_rules! other {
    ($($message:tt)*) => {
        $crate::Error::Other(format!($($message)*))
    };
}

/// `anyhow::Context` for the library's errors: wraps the cause, keeps its variant reachable
/// through [`Error::root`].
pub trait Context<T> {
    fn context(self, context: impl fmt::Display) -> Result<T>;
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::Other(context.to_string()))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Other(context().to_string()))
    }
}

/// An OS error without a path of its own; the caller's context names what it was about.
impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Error {
        Error::Io { what: "I/O".to_owned(), source }
    }
}

/// aya's errors are the kernel refusing (or aya failing to prepare) a bpf operation.
macro_rules! kernel_refused {
    ($($error:ty => $what:literal),* $(,)?) => {
        $(impl From<$error> for Error {
            fn from(error: $error) -> Error {
                Error::KernelRefused { what: $what.to_owned(), detail: error_chain(&error) }
            }
        })*
    };
}

kernel_refused! {
    aya::EbpfError => "loading the BPF object",
    aya::maps::MapError => "a BPF map operation",
    aya::programs::ProgramError => "a BPF program operation",
    aya::pin::PinError => "a bpffs pin",
    aya::programs::links::LinkError => "a BPF link operation",
}

/// Errors of conversions and parsers; the caller's context says what was converted.
macro_rules! described {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for Error {
            fn from(error: $error) -> Error {
                Error::Other(error_chain(&error))
            }
        })*
    };
}

described! {
    serde_json::Error,
    std::num::TryFromIntError,
    std::ffi::NulError,
    std::str::Utf8Error,
    std::string::FromUtf8Error,
    std::num::ParseIntError,
    std::net::AddrParseError,
}

/// `error: cause: cause...`, as one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !text.contains(&next_text) {
            text.push_str(": ");
            text.push_str(&next_text);
        }
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_root_variant_and_prints_the_whole_chain() {
        let failed: Result<()> = Err(Error::LockHeld("eth0 is locked".to_owned()));
        let err = failed.context("swapping").context("ballast swap").unwrap_err();
        assert!(matches!(err.root(), Error::LockHeld(_)));
        assert_eq!(err.exit_code(), 7);
        assert_eq!(err.to_string(), "ballast swap: swapping: eth0 is locked");
    }

    #[test]
    fn a_missing_option_is_an_error_naming_what_was_missing() {
        let err = None::<u8>.context("no digest in .rodata").unwrap_err();
        assert_eq!(err.to_string(), "no digest in .rodata");
        assert_eq!(err.exit_code(), 1);
    }
}
