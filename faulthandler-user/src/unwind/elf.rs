//! The module files' side of unwinding: which ELF a mapping holds, where
//! it is loaded, and the unwind sections and CFI coverage it contributes.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use framehop::ExplicitModuleSectionInfo;
use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _};
use object::{Endianness, ReadCache};

use super::cfi::{self, Coverage};
use crate::modules::{self, Module};
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
    /// What the CFI handed to framehop covers; framehop silently falls
    /// back to frame pointers outside it.
    cfi: Coverage,
    /// Approximate memory held, for the cache budget.
    pub(super) bytes: u64,
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
        self.range.contains(&addr) && cfi::contains(&self.file.cfi.fdes, svma)
    }

    /// Whether the CFI marks the code at return address `ra` as a signal
    /// trampoline. glibc starts the FDE one byte before `__restore_rt` so
    /// that `ra - 1` finds it; `ra` itself is checked too for CFI that
    /// does not.
    pub(super) fn cfi_trampoline(&self, ra: u64) -> bool {
        let t = &self.file.cfi.trampolines;
        let svma = ra.wrapping_sub(self.bias);
        self.range.contains(&ra)
            && (cfi::contains(t, svma) || cfi::contains(t, svma.wrapping_sub(1)))
    }
}

pub(super) fn identity(m: &Module) -> Option<Identity> {
    if let Some(id) = &m.build_id {
        return Some(Identity::BuildId(id.clone()));
    }
    procs::file_stamp(&m.open_path).map(Identity::Stat)
}

/// `mov $15, %rax; syscall` (rt_sigreturn): the whole of glibc's and
/// musl's `__restore_rt`, the `sa_restorer` a handler returns to.
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// Whether the file holds rt_sigreturn code at `offset`.
pub(super) fn is_sigreturn(path: &Path, offset: u64) -> bool {
    let mut code = [0u8; SIGRETURN.len()];
    let read = File::open(path).and_then(|f| f.read_exact_at(&mut code, offset));
    read.is_ok() && code == SIGRETURN
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
    // ReadCache pulls in the headers and the few sections asked for, never
    // the (possibly huge) debug info or symbol tables.
    let data = ReadCache::new(File::open(path).ok()?);
    let data = &data;
    let header = FileHeader64::<Endianness>::parse(data).ok()?;
    let e = header.endian().ok()?;
    if header.e_machine(e) != elf::EM_X86_64 {
        return None;
    }
    // CFI from a file replaced since the process mapped it would be wrong.
    // `build_id` came from procs::build_id, which reads it the same way.
    if build_id.is_some() && modules::elf_build_id(header, e, data).as_deref() != build_id {
        return None;
    }
    let loads: Vec<Load> = (header.program_headers(e, data).ok()?.iter())
        .filter(|p| p.p_type(e) == elf::PT_LOAD)
        .map(|p| Load {
            vaddr: p.p_vaddr(e),
            offset: p.p_offset(e),
            filesz: p.p_filesz(e),
            exec: p.p_flags(e) & elf::PF_X != 0,
        })
        .collect();
    let base_svma = loads.iter().map(|l| l.vaddr).min()?;
    let table = header.sections(e, data).ok()?;
    let section = |name: &str| table.section_by_name(e, name.as_bytes()).map(|(_, s)| s);
    let range = |name: &str| {
        let s = section(name)?;
        Some(s.sh_addr(e)..s.sh_addr(e).saturating_add(s.sh_size(e)))
    };
    let contents = |name: &str| {
        let s = section(name).filter(|s| s.sh_flags(e) & COMPRESSED == 0)?;
        let d = s.data(e, data).ok().filter(|d| !d.is_empty());
        d.map(Data::from)
    };
    let (text_svma, got_svma) = (range(".text"), range(".got"));
    let start = |r: &Option<Range<u64>>| r.as_ref().map_or(0, |r| r.start);
    let bases = cfi::Bases {
        text: start(&text_svma),
        got: start(&got_svma),
    };
    let (eh_frame_svma, eh_frame) = (range(".eh_frame"), contents(".eh_frame"));
    let debug_frame = contents(".debug_frame");
    let eh_cfi = match (&eh_frame, &eh_frame_svma) {
        (Some(d), Some(r)) => cfi::eh_frame(d, r.start, bases),
        _ => Coverage::default(),
    };
    let debug_cfi = debug_frame
        .as_deref()
        .map_or_else(Coverage::default, cfi::debug_frame);
    let mut sections = ExplicitModuleSectionInfo {
        base_svma,
        text_svma,
        got_svma,
        ..Default::default()
    };
    // framehop reads .debug_frame only when there is no .eh_frame, yet
    // `-fno-asynchronous-unwind-tables -g` leaves just crt stubs in .eh_frame.
    let cfi = if debug_cfi.span() > eh_cfi.span() {
        sections.debug_frame = debug_frame;
        debug_cfi
    } else {
        sections.eh_frame_hdr_svma = range(".eh_frame_hdr");
        sections.eh_frame_hdr = contents(".eh_frame_hdr");
        sections.eh_frame_svma = eh_frame_svma;
        sections.eh_frame = eh_frame;
        eh_cfi
    };
    let len = |d: &Option<Data>| d.as_ref().map_or(0, |d| d.len() as u64);
    let bytes = [
        &sections.eh_frame,
        &sections.eh_frame_hdr,
        &sections.debug_frame,
    ]
    .into_iter()
    .fold(cfi.heap_bytes(), |n, d| n.saturating_add(len(d)));
    Some(ElfInfo {
        loads,
        base_svma,
        sections,
        cfi,
        bytes,
    })
}

/// Sections whose data is compressed (`SHF_COMPRESSED`) are skipped:
/// framehop wants the raw bytes.
const COMPRESSED: u64 = elf::SHF_COMPRESSED as u64;

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
        let id = procs::build_id(File::open(exe).expect("open exe"));
        let id = id.expect("test binaries have a build-id");
        let info = load_elf(exe, Some(&id)).expect("own build-id accepted");
        assert!(!info.loads.is_empty() && !info.cfi.fdes.is_empty());
        assert!(info.bytes > 0);
        let mut other = id.clone();
        other[0] ^= 0xff;
        assert!(load_elf(exe, Some(&other)).is_none(), "replaced file");
        assert!(load_elf(exe, None).is_some());
    }

    #[test]
    fn unwind_sigreturn_code_where_cfi_says_signal_frame() {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let libc = maps.lines().find_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            path.contains("/libc.so")
                .then(|| Path::new(path).to_path_buf())
        });
        let libc = libc.expect("the test binary maps libc");
        let info = load_elf(&libc, None).expect("libc parses");
        let tramp = info.cfi.trampolines.first();
        let &(start, _) = tramp.expect("glibc marks __restore_rt with an `S` CIE");
        let offset = |svma: u64| {
            let l = info
                .loads
                .iter()
                .find(|l| l.vaddr <= svma && svma < l.vaddr + l.filesz);
            svma - l.expect("in a segment").vaddr + l.expect("in a segment").offset
        };
        // glibc's FDE starts at the nop before `__restore_rt`.
        assert!(is_sigreturn(&libc, offset(start + 1)));
        assert!(!is_sigreturn(&libc, offset(start)));
        assert!(!is_sigreturn(Path::new("/nonexistent"), 0));
    }
}
