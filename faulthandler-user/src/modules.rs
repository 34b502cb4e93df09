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

use object::elf::{self, FileHeader64, ProgramHeader64};
use object::read::elf::{FileHeader as _, ProgramHeader as _};
use object::{Endianness, ReadRef};

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

/// A note segment larger than this holds no build-id worth reading: the
/// bound keeps a crafted file from making us read gigabytes.
const MAX_NOTES: u64 = 64 * 1024;

/// The GNU build-id in the PT_NOTE segments of a parsed ELF header; shared
/// by `procs::build_id` and the unwinder's check that a file is still the
/// one that was mapped.
pub(crate) fn elf_build_id<'d, R: ReadRef<'d>>(
    header: &FileHeader64<Endianness>,
    endian: Endianness,
    data: R,
) -> Option<Vec<u8>> {
    let phdrs = header.program_headers(endian, data).ok()?;
    let small = |ph: &&ProgramHeader64<Endianness>| ph.p_filesz(endian) <= MAX_NOTES;
    for ph in phdrs.iter().filter(small) {
        let Ok(Some(mut notes)) = ph.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
                return Some(note.desc().to_vec());
            }
        }
    }
    None
}
