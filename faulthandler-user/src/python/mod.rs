//! Python frames of a CPython 3.8–3.15 process (x86_64), read from the
//! outside without stopping it.
//!
//! The stages, each in its own file:
//! - `discover`: from the process's mapped ELF files, find the interpreter,
//!   `_PyRuntime`, the version and the structure offsets (`PyTarget`);
//! - `layout`: the offsets themselves (`PyLayout`), from CPython's headers
//!   for 3.8–3.12 and (`debug_offsets`) from the target's own
//!   `_Py_DebugOffsets` on 3.13+;
//! - `mem`: the `Memory` trait the walk reads through, and `ProcMem`, a
//!   live reader that never stops the target;
//! - `walk`: interpreters → thread states → frames → code objects, bounded
//!   and checked at every step because live memory is torn under us;
//! - `linetable`: instruction offset → line, for each table format;
//! - `merge`: native frames + Python frames → one stack.

pub(crate) mod attach;
pub(crate) mod debug_offsets;
pub(crate) mod discover;
pub(crate) mod kernel;
pub(crate) mod layout;
pub(crate) mod linetable;
pub(crate) mod mem;
pub(crate) mod merge;
pub(crate) mod regions;
pub(crate) mod walk;

#[cfg(test)]
mod crosscheck_tests;
#[cfg(test)]
mod live_tests;

use std::io;

/// Everything that can go wrong reading Python frames: why a process has
/// no readable interpreter, or why a walk stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PyError {
    #[error("no python interpreter among the process's modules")]
    NotPython,
    #[error("malformed elf file {path}: {what}")]
    Elf { path: String, what: String },
    #[error("{path} has a python runtime but no version could be found")]
    NoVersion { path: String },
    #[error("python {major}.{minor} is not supported (3.8 to 3.15 are)")]
    UnsupportedVersion { major: u32, minor: u32 },
    #[error("python {major}.{minor} is a free-threaded build, which is not supported")]
    FreeThreaded { major: u32, minor: u32 },
    #[error("the _Py_DebugOffsets of {path} are invalid: {what}")]
    DebugOffsets { path: String, what: String },
    #[error("cannot read {len} bytes of the process's memory at {addr:#x}")]
    Read {
        addr: u64,
        len: usize,
        #[source]
        source: Option<io::Error>,
    },
    #[error("{what} at {addr:#x} is not a valid pointer")]
    BadPointer { what: &'static str, addr: u64 },
    #[error("object at {addr:#x} is not a code object")]
    NotCode { addr: u64 },
    #[error("string at {addr:#x} is not a readable compact string")]
    BadString { addr: u64 },
    #[error("bytes object at {addr:#x} has an implausible size {size}")]
    BadBytes { addr: u64, size: i64 },
    #[error("thread state at {addr:#x} does not belong to its interpreter")]
    ForeignThread { addr: u64 },
    #[error("the {what} chain loops back to {addr:#x}")]
    Cycle { what: &'static str, addr: u64 },
    #[error("more than {limit} {what}: stopped there")]
    TooMany { what: &'static str, limit: usize },
    /// An error found earlier for the same file, kept as its message.
    #[error("{0}")]
    Cached(String),
    #[error("the interpreter's layout cannot be read at signal time: {0}")]
    KernelLayout(String),
}

impl PyError {
    /// The error as a report says it: without the addresses, which are
    /// words of the process's memory (a report never shows those).
    pub(crate) fn reason(&self) -> String {
        match self {
            PyError::Read { len, .. } => format!("a read of {len} bytes of its memory failed"),
            PyError::BadPointer { what, .. } => format!("a {what} pointer is not valid"),
            PyError::NotCode { .. } => "a frame's code is not a code object".into(),
            PyError::BadString { .. } => "a name is not a readable compact string".into(),
            PyError::BadBytes { .. } => "a line table has an implausible size".into(),
            PyError::ForeignThread { .. } => {
                "a thread state does not belong to its interpreter".into()
            }
            PyError::Cycle { what, .. } => format!("the {what} chain loops"),
            e => e.to_string(),
        }
    }
}
