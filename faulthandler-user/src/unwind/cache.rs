//! The unwinder's cache of parsed module files, bounded by count and by
//! bytes held, least recently used out first; and of the framehop modules
//! built from them for each mapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf::{self, ElfInfo, Identity, Mapped, identity, load_elf};
use crate::modules::Module;

/// A daemon sees many short-lived processes and binaries: bounding beats
/// tracking liveness (which `forget` adds for deleted files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    pub files: usize,
    /// Unwind sections and CFI ranges held, summed over the files.
    pub bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            files: 256,
            bytes: 64 << 20,
        }
    }
}

/// A mapping's framehop module is cheap to rebuild: past this many, all
/// are dropped (each process maps libc at its own address).
const MAX_MAPS: usize = 4096;
/// Per file, the return addresses checked for sigreturn code.
const MAX_CHECKED: usize = 4096;

type FileKey = (PathBuf, Identity);
/// Plus start, end and file offset of the mapping.
type MapKey = (FileKey, u64, u64, u64);

struct FileEntry {
    info: Option<Arc<ElfInfo>>,
    bytes: u64,
    last_use: u64,
    /// File offset of a return address -> whether the code there is
    /// `rt_sigreturn` (for files whose CFI does not say).
    sigreturn: HashMap<u64, bool>,
}

pub(super) struct FileCache {
    limits: CacheLimits,
    files: HashMap<FileKey, FileEntry>,
    maps: HashMap<MapKey, Option<Mapped>>,
    bytes: u64,
    clock: u64,
    /// ELF files parsed so far; lets tests prove the cache works.
    pub(super) parses: usize,
}

impl Default for FileCache {
    fn default() -> Self {
        Self::new(CacheLimits::default())
    }
}

impl FileCache {
    pub(super) fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            files: HashMap::new(),
            maps: HashMap::new(),
            bytes: 0,
            clock: 0,
            parses: 0,
        }
    }

    pub(super) fn start_use(&mut self) {
        self.clock += 1;
        if self.maps.len() > MAX_MAPS {
            self.maps.clear();
        }
    }

    /// Evicts down to the limits once an unwind is done, so one unwind
    /// never evicts a file it still needs.
    pub(super) fn end_use(&mut self) {
        while self.files.len() > self.limits.files || self.bytes > self.limits.bytes {
            let oldest = self.files.iter().min_by_key(|(_, e)| e.last_use);
            let Some(key) = oldest.map(|(k, _)| k.clone()) else {
                break;
            };
            self.remove(|k| *k == key);
        }
    }

    pub(super) fn forget(&mut self, open_path: &Path) {
        self.remove(|k| k.0 == open_path);
    }

    fn remove(&mut self, which: impl Fn(&FileKey) -> bool) {
        let mut freed = 0u64;
        self.files.retain(|k, e| {
            let keep = !which(k);
            freed += if keep { 0 } else { e.bytes };
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
        // A mapping's module holds its file's sections alive.
        self.maps.retain(|k, _| !which(&k.0));
    }

    fn entry(&mut self, m: &Module) -> Option<(FileKey, &mut FileEntry)> {
        let key = (m.open_path.clone(), identity(m)?);
        let (clock, parses, bytes) = (self.clock, &mut self.parses, &mut self.bytes);
        let entry = self.files.entry(key.clone()).or_insert_with(|| {
            *parses += 1;
            let info = load_elf(&m.open_path, m.build_id.as_deref()).map(Arc::new);
            let size = info.as_ref().map_or(0, |i| i.bytes);
            *bytes = bytes.saturating_add(size);
            FileEntry {
                info,
                bytes: size,
                last_use: clock,
                sigreturn: HashMap::new(),
            }
        });
        entry.last_use = clock;
        Some((key, entry))
    }

    /// `m`'s file as framehop wants it; `None` if it cannot be read.
    pub(super) fn mapped(&mut self, m: &Module) -> Option<Mapped> {
        let (fkey, entry) = self.entry(m)?;
        let file = entry.info.clone();
        let key = (fkey, m.start, m.end, m.file_offset);
        if let Some(hit) = self.maps.get(&key) {
            return hit.clone();
        }
        let mapped = file.and_then(|file| Mapped::new(file, m));
        self.maps.insert(key, mapped.clone());
        mapped
    }

    /// Whether the code at return address `ra` in `m` is a sigreturn
    /// trampoline, read once per file and offset.
    pub(super) fn is_sigreturn(&mut self, m: &Module, ra: u64) -> bool {
        let off = m.file_offset_of(ra);
        let Some((_, entry)) = self.entry(m) else {
            return elf::is_sigreturn(&m.open_path, off);
        };
        if entry.sigreturn.len() >= MAX_CHECKED {
            entry.sigreturn.clear();
        }
        *entry
            .sigreturn
            .entry(off)
            .or_insert_with(|| elf::is_sigreturn(&m.open_path, off))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> (usize, u64) {
        (self.files.len(), self.bytes)
    }
}
