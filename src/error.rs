//! One error type for the whole crate: every failure a user can cause is either a usage/config
//! error (exit code 2) or a runtime failure (exit code 1), and carries one readable line.

use std::fmt;

/// Whether the user must fix their invocation (2) or something failed while running (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Usage,
    Runtime,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn usage(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Usage, message: message.into() }
    }

    pub fn runtime(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Runtime, message: message.into() }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Runtime => 1,
        }
    }

    /// Prefixes the message with context, keeping the kind.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self { kind: self.kind, message: format!("{what}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a path to an I/O error and classifies it as a runtime failure.
pub fn io_err(path: &std::path::Path, err: std::io::Error) -> Error {
    Error::runtime(format!("{}: {err}", path.display()))
}

/// A config count that must be at least 1 (`key` names it in the error).
pub fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::usage(format!("{key} = 0 is out of range: it must be at least 1")));
    }
    Ok(())
}

/// A config number that must be finite and in `[lo, hi]`.
pub fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(Error::usage(format!("{key} = {v} is out of range: it must be in [{lo}, {hi}]")));
    }
    Ok(())
}

/// Shorthand for early returns with a usage error.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => { return Err($crate::error::Error::usage(format!($($arg)*))) };
}

/// Shorthand for early returns with a runtime error.
#[macro_export]
macro_rules! runtime {
    ($($arg:tt)*) => { return Err($crate::error::Error::runtime(format!($($arg)*))) };
}
