//! What the blazesym instance holds open: each file it was asked to read
//! stays opened, mapped and parsed until evicted. Bounded by count and by
//! the files' sizes; a single file can be forgotten (a deleted binary no
//! tracked process maps any more).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::procs::{FileStamp, file_stamp};

/// Limits on the files the symbolizer keeps open and parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolizerLimits {
    pub files: usize,
    /// Sum of the sizes of those files (and of their separate debug files).
    /// They are mapped, not read, but the DWARF parsed from them stays on
    /// the heap: symbolizing 2000 addresses across libc (1.9 MB, 4.2 MB of
    /// debug info) grew RSS by 29 MiB, all released again on eviction.
    pub bytes: u64,
}

impl Default for SymbolizerLimits {
    fn default() -> Self {
        Self {
            files: 256,
            bytes: 128 << 20,
        }
    }
}

struct Entry {
    stamp: FileStamp,
    /// The separate debug file read in its place, if any.
    debug_file: Option<PathBuf>,
    bytes: u64,
}

/// What `forget` released: the paths to evict from blazesym, and the
/// identity of the file whose own cached facts go too.
pub(super) struct Forgotten {
    pub(super) paths: Vec<PathBuf>,
    pub(super) stamp: FileStamp,
}

pub(super) struct Opened {
    limits: SymbolizerLimits,
    /// By the path handed to blazesym.
    entries: HashMap<PathBuf, Entry>,
    bytes: u64,
}

impl Opened {
    pub(super) fn new(limits: SymbolizerLimits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            bytes: 0,
        }
    }

    /// Notes that blazesym reads `path` (or `debug_file` in its stead).
    pub(super) fn used(&mut self, path: &Path, debug_file: Option<&Path>) {
        let Some(stamp) = file_stamp(path) else {
            return;
        };
        if self.entries.get(path).is_some_and(|e| e.stamp == stamp) {
            return;
        }
        let size = |p: &Path| file_stamp(p).map_or(0, |s| s[2].max(0) as u64);
        let bytes = (stamp[2].max(0) as u64).saturating_add(debug_file.map_or(0, size));
        let entry = Entry {
            stamp,
            debug_file: debug_file.map(Path::to_path_buf),
            bytes,
        };
        self.bytes = self.bytes.saturating_add(bytes);
        if let Some(old) = self.entries.insert(path.to_path_buf(), entry) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
    }

    pub(super) fn over_budget(&self) -> bool {
        self.entries.len() > self.limits.files || self.bytes > self.limits.bytes
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub(super) fn forget(&mut self, path: &Path) -> Option<Forgotten> {
        let entry = self.entries.remove(path)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        let mut paths = vec![path.to_path_buf()];
        // A debug file another tracked file still reads stays.
        if let Some(debug) = entry.debug_file {
            let shared = (self.entries.values()).any(|e| e.debug_file.as_ref() == Some(&debug));
            if !shared {
                paths.push(debug);
            }
        }
        Some(Forgotten {
            paths,
            stamp: entry.stamp,
        })
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}
