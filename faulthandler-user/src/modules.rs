//! What a process had mapped: the executable file mappings that unwinding
//! and symbolization need, captured while the process was alive.

use std::{fs::File, path::PathBuf, sync::Arc};

/// Keeps a module's file open for as long as a report that needs it is
/// being made: `open_path` is often `/proc/self/fd/N`, and the tracker may
/// close its handle (the process died, the cache was trimmed) meanwhile.
#[derive(Clone, Debug)]
pub struct FileHold(pub Arc<File>);

/// Two holds are the same when they keep the same open file.
impl PartialEq for FileHold {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FileHold {}

/// One executable, file-backed mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Path the loader opens to read the ELF. This may differ from
    /// `name` (e.g. `/proc/PID/root/...` or `/proc/self/fd/N` for a file
    /// held open while the process lived).
    pub open_path: PathBuf,
    /// The path as the process saw it; what reports print.
    pub name: String,
    /// Mapped address range `[start, end)` in the process.
    pub start: u64,
    pub end: u64,
    /// File offset that `start` maps.
    pub file_offset: u64,
    /// GNU build-id, when the file has one.
    pub build_id: Option<Vec<u8>>,
    /// The open file behind `open_path`, when it is one of ours.
    pub hold: Option<FileHold>,
}

impl Module {
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// File offset of `addr`, which must lie in this mapping.
    pub fn file_offset_of(&self, addr: u64) -> u64 {
        addr - self.start + self.file_offset
    }
}

/// Finds the module holding `addr` in a list sorted or unsorted.
pub fn find(modules: &[Module], addr: u64) -> Option<&Module> {
    modules.iter().find(|m| m.contains(addr))
}
