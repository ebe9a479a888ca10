//! CLI errors: one line for humans, an exit code shared by every command (0 ok, 1 other,
//! 2 usage/bad input, 3 not found, 4 conflict/busy, 5 integrity).

use std::io::Write;

use imagefs_store::{ErrorKind, StoreError};

/// Exit code of a store error kind.
pub fn exit_code(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Io => 1,
        ErrorKind::BadInput => 2,
        ErrorKind::NotFound => 3,
        ErrorKind::Conflict | ErrorKind::Busy => 4,
        ErrorKind::Corrupt => 5,
    }
}

/// A failed command: its message and exit code.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CliError {
    /// One line saying what went wrong.
    pub msg: String,
    /// The process exit code.
    pub code: i32,
    /// The result object already said it (JSON mode prints no error object then).
    pub reported: bool,
}

impl CliError {
    /// An error with an explicit exit code.
    pub fn new(code: i32, msg: impl Into<String>) -> CliError {
        CliError {
            msg: msg.into(),
            code,
            reported: false,
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        CliError::new(exit_code(e.kind()), e.to_string())
    }
}

impl From<imagefs_store::IdError> for CliError {
    fn from(e: imagefs_store::IdError) -> CliError {
        CliError::new(2, e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::new(1, format!("output: {e}"))
    }
}

/// Prints `e` as one line on `err` (and, with `json`, as a final object on `out`); returns
/// the exit code.
pub fn report(e: &CliError, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    if json && !e.reported {
        let obj = serde_json::json!({"type": "error", "error": e.msg, "code": e.code});
        let _ = writeln!(out, "{obj}");
    }
    let _ = writeln!(err, "imagefs: error: {}", e.msg);
    e.code
}
