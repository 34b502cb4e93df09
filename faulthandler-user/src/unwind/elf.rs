//! The module files' side of unwinding: which ELF a mapping holds, where
//! it is loaded, and the unwind sections and CFI coverage it contributes.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use framehop::ExplicitModuleSectionInfo;
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{CompressionFormat, Object as _, ObjectSection as _, ReadCache};

use super::cfi::fde_ranges;
use crate::modules::Module;
use crate::procs;

const PAGE: u64 = 4096;

type Data = Arc<[u8]>;

/// A path alone may name a different file by the next crash (upgrades).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum Identity {
    BuildId(Vec<u8>),
    Stat(procs::FileStamp),
}

#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    exec: bool,
}

/// What one ELF file contributes, shared by all its mappings.
pub(super) struct ElfInfo {
    loads: Vec<Load>,
    base_svma: u64,
    sections: ExplicitModuleSectionInfo<Data>,
    /// Sorted `[start, end)` SVMAs covered by the CFI handed to framehop;
    /// framehop silently falls back to frame pointers outside them.
    cfi: Vec<(u64, u64)>,
}

#[derive(Clone)]
pub(super) struct Mapped {
    range: Range<u64>,
    bias: u64,
    file: Arc<ElfInfo>,
    pub(super) fh: framehop::Module<Data>,
}

impl Mapped {
    /// `file` as mapped by `m`; `None` if no PT_LOAD holds the mapping.
    pub(super) fn new(file: Arc<ElfInfo>, m: &Module) -> Option<Self> {
        let bias = load_bias(&file.loads, m.start, m.file_offset)?;
        let base_avma = file.base_svma.wrapping_add(bias);
        let (name, range, sections) = (m.name.clone(), m.start..m.end, file.sections.clone());
        let fh = framehop::Module::new(name, range.clone(), base_avma, sections);
        Some(Mapped {
            range,
            bias,
            file,
            fh,
        })
    }

    pub(super) fn has_cfi_for(&self, addr: u64) -> bool {
        let svma = addr.wrapping_sub(self.bias);
        let cfi = &self.file.cfi;
        let i = cfi.partition_point(|r| r.0 <= svma);
        self.range.contains(&addr) && i > 0 && svma < cfi[i - 1].1
    }
}

pub(super) fn identity(m: &Module) -> Option<Identity> {
    if let Some(id) = &m.build_id {
        return Some(Identity::BuildId(id.clone()));
    }
    procs::file_stamp(&m.open_path).map(Identity::Stat)
}

/// Load bias (AVMA - SVMA) of the mapping of `file_offset` at `start`.
fn load_bias(loads: &[Load], start: u64, file_offset: u64) -> Option<u64> {
    // The kernel maps whole pages, so a mapping may begin up to a page before
    // its segment's first byte; prefer PF_X since modules are code mappings.
    let holds = |l: &&Load| {
        l.offset & !(PAGE - 1) <= file_offset && file_offset < l.offset.saturating_add(l.filesz)
    };
    let mut held = loads.iter().filter(holds);
    let l = held.clone().find(|l| l.exec).or(held.next())?;
    // p_vaddr ≡ p_offset (mod p_align), so SVMA = p_vaddr - p_offset + offset
    // holds for every byte of the mapping, page-rounded head included.
    let svma = l.vaddr.wrapping_sub(l.offset).wrapping_add(file_offset);
    Some(start.wrapping_sub(svma))
}

pub(super) fn load_elf(path: &Path, build_id: Option<&[u8]>) -> Option<ElfInfo> {
    let mut file = File::open(path).ok()?;
    // CFI from a file replaced since the process mapped it would be wrong.
    // `build_id` came from procs::build_id, so read this one the same way.
    if build_id.is_some() && procs::build_id(&mut file).as_deref() != build_id {
        return None;
    }
    // ReadCache pulls in headers and the few sections asked for, never the
    // (possibly huge) debug info; it seeks before every read.
    let cache = ReadCache::new(file);
    let elf = ElfFile64::<object::Endianness, _>::parse(&cache).ok()?;
    if elf.architecture() != object::Architecture::X86_64 {
        return None;
    }
    let e = elf.endian();
    let loads: Vec<Load> = (elf.elf_program_headers().iter())
        .filter(|p| p.p_type(e) == object::elf::PT_LOAD)
        .map(|p| Load {
            vaddr: p.p_vaddr(e),
            offset: p.p_offset(e),
            filesz: p.p_filesz(e),
            exec: p.p_flags(e) & object::elf::PF_X != 0,
        })
        .collect();
    let base_svma = loads.iter().map(|l| l.vaddr).min()?;
    let range = |name: &str| {
        let s = elf.section_by_name(name)?;
        Some(s.address()..s.address().saturating_add(s.size()))
    };
    let data = |name: &str| {
        let s = elf.section_by_name(name)?;
        let plain = s.compressed_file_range().ok()?.format == CompressionFormat::None;
        let d = s.data().ok().filter(|d| plain && !d.is_empty());
        d.map(Data::from)
    };
    let (text_svma, got_svma) = (range(".text"), range(".got"));
    let start = |r: &Option<Range<u64>>| r.as_ref().map_or(0, |r| r.start);
    let bases = (start(&text_svma), start(&got_svma));
    let (eh_frame_svma, eh_frame) = (range(".eh_frame"), data(".eh_frame"));
    let debug_frame = data(".debug_frame");
    let eh_cfi = match (&eh_frame, &eh_frame_svma) {
        (Some(d), Some(r)) => fde_ranges(d, r.start, true, bases),
        _ => Vec::new(),
    };
    let debug_cfi =
        (debug_frame.as_ref()).map_or_else(Vec::new, |d| fde_ranges(d, 0, false, bases));
    let mut sections = ExplicitModuleSectionInfo {
        base_svma,
        text_svma,
        got_svma,
        ..Default::default()
    };
    // framehop reads .debug_frame only when there is no .eh_frame, yet
    // `-fno-asynchronous-unwind-tables -g` leaves just crt stubs in .eh_frame.
    let cfi = if span(&debug_cfi) > span(&eh_cfi) {
        sections.debug_frame = debug_frame;
        debug_cfi
    } else {
        sections.eh_frame_hdr_svma = range(".eh_frame_hdr");
        sections.eh_frame_hdr = data(".eh_frame_hdr");
        sections.eh_frame_svma = eh_frame_svma;
        sections.eh_frame = eh_frame;
        eh_cfi
    };
    let info = ElfInfo {
        loads,
        base_svma,
        sections,
        cfi,
    };
    Some(info)
}

fn span(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().fold(0, |n, r| n.saturating_add(r.1 - r.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwind_load_bias_of_page_rounded_segments() {
        let load = |vaddr, offset, filesz, exec| Load {
            vaddr,
            offset,
            filesz,
            exec,
        };
        let pie = [load(0, 0, 0x5f0, false), load(0x1000, 0x1000, 0x2000, true)];
        assert_eq!(
            load_bias(&pie, 0x5555_5555_6000, 0x1000),
            Some(0x5555_5555_5000)
        );
        // Old single-RX layout: the data segment's mapping starts a page early.
        let old = [
            load(0, 0, 0xd00, true),
            load(0x201dd8, 0x1dd8, 0x300, false),
        ];
        assert_eq!(
            load_bias(&old, 0x7f00_0020_1000, 0x1000),
            Some(0x7f00_0000_0000)
        );
        assert_eq!(load_bias(&old, 0x7f00_0000_0000, 0x9000), None);
    }

    #[test]
    fn unwind_load_elf_checks_build_id() {
        let exe = Path::new("/proc/self/exe");
        let id = procs::build_id(&mut File::open(exe).expect("open exe"));
        let id = id.expect("test binaries have a build-id");
        let info = load_elf(exe, Some(&id)).expect("own build-id accepted");
        assert!(!info.loads.is_empty() && !info.cfi.is_empty());
        let mut other = id.clone();
        other[0] ^= 0xff;
        assert!(load_elf(exe, Some(&other)).is_none(), "replaced file");
        assert!(load_elf(exe, None).is_some());
    }
}
