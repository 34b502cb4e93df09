//! Unwind stage: a crashing thread's registers plus a copy of the top of its
//! stack become return addresses. Pure apart from reading (and caching) the
//! module files for their DWARF CFI; x86_64 only.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Unwinder as _};
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{CompressionFormat, Object as _, ObjectSection as _, ReadCache};

use crate::modules::{self, Module};

/// User space ends here with 4-level paging, and 5-level paging only hands
/// out higher addresses on explicit request: nothing above is a return address.
const USER_ADDR_LIMIT: u64 = 0x0000_8000_0000_0000;
/// A daemon sees many short-lived processes; bounding beats tracking liveness.
const MAX_CACHED_FILES: usize = 256;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// `bytes[i]` is the memory at `base + i`; `base` was `sp` at capture.
#[derive(Clone, Copy, Debug)]
pub struct StackCopy<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl StackCopy<'_> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let b = self.bytes.get(off..off.checked_add(8)?)?;
        b.try_into().ok().map(u64::from_le_bytes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Dwarf,
    FramePointer,
    Mixed,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Dwarf => "dwarf",
            Method::FramePointer => "frame-pointer",
            Method::Mixed => "mixed",
        }
    }
}

/// `addrs[0]` is the ip, then raw return addresses, outermost last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub addrs: Vec<u64>,
    pub method: Method,
    pub truncated: bool,
    pub error: Option<String>,
}

type Data = Arc<[u8]>;

/// A path alone may name a different file by the next crash (upgrades).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Identity {
    BuildId(Vec<u8>),
    /// dev, inode, size, mtime (s, ns)
    Stat([i64; 5]),
}

#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    exec: bool,
}

/// What one ELF file contributes, shared by all its mappings.
struct ElfInfo {
    loads: Vec<Load>,
    base_svma: u64,
    sections: ExplicitModuleSectionInfo<Data>,
    /// Sorted `[start, end)` SVMAs covered by the CFI handed to framehop;
    /// framehop silently falls back to frame pointers outside them.
    cfi: Vec<(u64, u64)>,
}

#[derive(Clone)]
struct Mapped {
    range: Range<u64>,
    bias: u64,
    file: Arc<ElfInfo>,
    fh: framehop::Module<Data>,
}

impl Mapped {
    fn has_cfi_for(&self, addr: u64) -> bool {
        let svma = addr.wrapping_sub(self.bias);
        let cfi = &self.file.cfi;
        let i = cfi.partition_point(|r| r.0 <= svma);
        self.range.contains(&addr) && i > 0 && svma < cfi[i - 1].1
    }
}

type FileKey = (PathBuf, Identity);
/// Plus start, end and file offset of the mapping.
type MapKey = (FileKey, u64, u64, u64);

/// Caches parsed files and framehop modules across unwinds.
#[derive(Default)]
pub struct Unwinder {
    files: HashMap<FileKey, Option<Arc<ElfInfo>>>,
    maps: HashMap<MapKey, Option<Mapped>>,
    /// ELF files opened so far; lets tests prove the cache works.
    parses: usize,
}

impl Unwinder {
    pub fn new() -> Self {
        Self::default()
    }

    /// `max_frames` counts `addrs[0]`; the ip is always returned.
    pub fn unwind(
        &mut self,
        regs: &Regs,
        stack: &StackCopy,
        modules: &[Module],
        max_frames: usize,
    ) -> Unwound {
        if self.files.len() > MAX_CACHED_FILES {
            self.files.clear();
            self.maps.clear();
        }
        let mapped: Vec<Mapped> = modules.iter().filter_map(|m| self.mapped(m)).collect();
        // Fresh framehop state per call: its rule cache is keyed by a global
        // u16 generation that would wrap in a long-running daemon.
        let mut fh = UnwinderX86_64::new();
        for m in &mapped {
            fh.add_module(m.fh.clone());
        }
        let mut cache = CacheX86_64::new();
        let has_cfi = |addr: u64| mapped.iter().any(|m| m.has_cfi_for(addr));
        let mut read = |addr| stack.read_u64(addr).ok_or(());
        let max_frames = max_frames.max(1);

        let mut fregs = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
        let mut frame = FrameAddress::from_instruction_pointer(regs.ip);
        let mut out = Unwound {
            addrs: vec![regs.ip],
            method: Method::FramePointer,
            truncated: false,
            error: None,
        };
        let mut steps = Vec::new();
        loop {
            let (lookup, sp) = (frame.address_for_lookup(), fregs.sp());
            let ra = match fh.unwind_frame(frame, &mut fregs, &mut cache, &mut read) {
                Ok(Some(ra)) if ra != 0 => ra,
                Ok(_) => break,
                Err(framehop::Error::CouldNotReadStack(a)) => {
                    // Only a read past the copy's top while still in mapped
                    // code means "more stack existed"; anything else is junk.
                    let plausible = modules.is_empty() || modules::find(modules, lookup).is_some();
                    let end = stack.base.saturating_add(stack.bytes.len() as u64);
                    out.truncated = a >= end && plausible;
                    out.error = Some(format!("stack read at {a:#x} outside the captured copy"));
                    break;
                }
                Err(e) => {
                    out.error = Some(e.to_string());
                    break;
                }
            };
            if ra >= USER_ADDR_LIMIT {
                out.error = Some(format!("non-canonical return address {ra:#x}"));
                break;
            }
            if fregs.sp() <= sp {
                out.error = Some(format!("stack pointer did not increase at {ra:#x}"));
                break;
            }
            // Stepping once past the limit tells a cut stack from one that
            // is exactly max_frames deep.
            if out.addrs.len() >= max_frames {
                out.truncated = true;
                break;
            }
            out.addrs.push(ra);
            steps.push(has_cfi(lookup));
            match FrameAddress::from_return_address(ra) {
                Some(next) => frame = next,
                None => break,
            }
        }
        if steps.is_empty() {
            steps.push(has_cfi(regs.ip));
        }
        out.method = match (steps.contains(&true), steps.contains(&false)) {
            (true, false) => Method::Dwarf,
            (false, _) => Method::FramePointer,
            (true, true) => Method::Mixed,
        };
        out
    }

    fn mapped(&mut self, m: &Module) -> Option<Mapped> {
        let fkey = (m.open_path.clone(), identity(m)?);
        let key = (fkey.clone(), m.start, m.end, m.file_offset);
        if let Some(hit) = self.maps.get(&key) {
            return hit.clone();
        }
        let file = self.files.entry(fkey).or_insert_with(|| {
            self.parses += 1;
            load_elf(&m.open_path, m.build_id.as_deref()).map(Arc::new)
        });
        let file = file.clone();
        let mapped = file.and_then(|file| {
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
        });
        self.maps.insert(key, mapped.clone());
        mapped
    }
}

fn identity(m: &Module) -> Option<Identity> {
    if let Some(id) = &m.build_id {
        return Some(Identity::BuildId(id.clone()));
    }
    let md = std::fs::metadata(&m.open_path).ok()?;
    let stat = [
        md.dev() as i64,
        md.ino() as i64,
        md.size() as i64,
        md.mtime(),
        md.mtime_nsec(),
    ];
    Some(Identity::Stat(stat))
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

fn load_elf(path: &Path, build_id: Option<&[u8]>) -> Option<ElfInfo> {
    // ReadCache pulls in headers and the few sections asked for, never the
    // (possibly huge) debug info.
    let cache = ReadCache::new(File::open(path).ok()?);
    let elf = ElfFile64::<object::Endianness, _>::parse(&cache).ok()?;
    if elf.architecture() != object::Architecture::X86_64 {
        return None;
    }
    // CFI from a file replaced since the process mapped it would be wrong.
    if build_id.is_some() && elf.build_id().ok().flatten() != build_id {
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

/// Minimal CFI reader: framehop does not say whether a step used CFI, so
/// coverage comes from the FDE address ranges.
struct Rd<'a> {
    d: &'a [u8],
    pos: usize,
}

impl Rd<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.d.get(self.pos..self.pos.checked_add(N)?)?;
        self.pos += N;
        b.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes().map(u8::from_le_bytes)
    }

    fn word(&mut self, wide: bool) -> Option<u64> {
        match wide {
            true => self.bytes().map(u64::from_le_bytes),
            false => self.bytes().map(u32::from_le_bytes).map(u64::from),
        }
    }

    /// DWARF initial length and whether the record is 64-bit DWARF.
    fn length(&mut self) -> Option<(u64, bool)> {
        match self.word(false)? {
            0xffff_ffff => Some((self.word(true)?, true)),
            len => Some((len, false)),
        }
    }

    fn leb(&mut self, signed: bool) -> Option<u64> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            shift = shift.saturating_add(7);
            if b & 0x80 == 0 {
                let sign: u64 = if signed && b & 0x40 != 0 { !0 } else { 0 };
                return Some(v | sign.checked_shl(shift).unwrap_or(0));
            }
        }
    }

    /// A DW_EH_PE value in format `enc & 0x0f`, sign-extended.
    fn value(&mut self, enc: u8) -> Option<u64> {
        Some(match enc & 0x0f {
            0x00 | 0x04 | 0x0c => self.word(true)?,
            0x01 => self.leb(false)?,
            0x09 => self.leb(true)?,
            0x02 => u16::from_le_bytes(self.bytes()?).into(),
            0x03 => self.word(false)?,
            0x0a => i16::from_le_bytes(self.bytes()?) as u64,
            0x0b => i32::from_le_bytes(self.bytes()?) as u64,
            _ => return None,
        })
    }
}

/// `[start, end)` of every FDE in `.eh_frame` (`eh`, at `svma`) or
/// `.debug_frame`; `bases` are the .text and .got SVMAs.
fn fde_ranges(d: &[u8], svma: u64, eh: bool, bases: (u64, u64)) -> Vec<(u64, u64)> {
    let (mut out, mut cies, mut pos) = (Vec::new(), HashMap::new(), 0);
    while let Some((next, range)) = cfi_record(d, pos, svma, eh, bases, &mut cies) {
        out.extend(range.filter(|r| r.0 < r.1));
        pos = next;
    }
    out.sort_unstable();
    out
}

/// The record at `pos`: where the next one starts, and its range if it is
/// an FDE we can read.
fn cfi_record(
    d: &[u8],
    pos: usize,
    svma: u64,
    eh: bool,
    bases: (u64, u64),
    cies: &mut HashMap<usize, Option<u8>>,
) -> Option<(usize, Option<(u64, u64)>)> {
    let mut r = Rd { d, pos };
    let (len, wide) = r.length()?;
    let next = (r.pos.checked_add(usize::try_from(len).ok()?)).filter(|&n| n <= d.len())?;
    if len == 0 {
        // .eh_frame ends at a zero terminator; .debug_frame may pad with them.
        return (!eh).then_some((next, None));
    }
    let id_pos = r.pos as u64;
    let id = r.word(wide)?;
    let cie_id = if wide { u64::MAX } else { 0xffff_ffff };
    let cie = match eh {
        true if id != 0 => id_pos.checked_sub(id),
        false if id != cie_id => Some(id),
        _ => return Some((next, None)),
    };
    let enc = (cie.and_then(|c| usize::try_from(c).ok()))
        .and_then(|c| *cies.entry(c).or_insert_with(|| cie_encoding(d, c, eh)));
    let range = enc.and_then(|enc| {
        let base = match enc & 0x70 {
            0x00 => 0,
            0x10 => svma.wrapping_add(r.pos as u64),
            0x20 => bases.0,
            0x30 => bases.1,
            _ => return None,
        };
        let start = base.wrapping_add(r.value(enc)?);
        Some((start, start.saturating_add(r.value(enc & 0x0f)?)))
    });
    Some((next, range))
}

/// The pointer encoding of the FDEs that use the CIE at `off`.
fn cie_encoding(d: &[u8], off: usize, eh: bool) -> Option<u8> {
    let mut r = Rd { d, pos: off };
    let wide = r.length()?.1;
    r.word(wide)?;
    let version = r.u8()?;
    let aug = d.get(r.pos..)?.split(|&b| b == 0).next()?;
    r.pos += aug.len() + 1;
    if !eh {
        // .debug_frame holds plain target addresses; v4 states their size.
        let size = if version >= 4 { r.u8()? } else { 8 };
        return match size {
            8 => Some(0x04),
            4 => Some(0x03),
            _ => None,
        };
    }
    let _code_align = r.leb(false)?;
    let _data_align = r.leb(true)?;
    let _ra_register = if version == 1 {
        r.u8().map(u64::from)
    } else {
        r.leb(false)
    }?;
    let Some(rest) = aug.strip_prefix(b"z") else {
        return aug.is_empty().then_some(0);
    };
    r.leb(false)?;
    for &c in rest {
        match c {
            b'R' => return r.u8(),
            b'L' => r.u8().map(|_| ())?,
            b'P' => r.u8().and_then(|enc| r.value(enc)).map(|_| ())?,
            b'S' | b'B' | b'G' => {}
            _ => return None,
        }
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{ObjectSymbol as _, SymbolKind};
    use std::process::Command;

    /// Dumps its own registers, maps and top of stack from inside fh_c (or
    /// a qsort comparator), then exits: a crash capture without root.
    const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define NOINLINE __attribute__((noinline, noclone))
int main(int argc, char **argv);
static const char *dir;
static FILE *out(const char *name) {
    char path[4096];
    return snprintf(path, sizeof path, "%s/%s", dir, name), fopen(path, "w");
}
/* capture() hands dump_state the caller's state as of right after it returns. */
void capture(void);
__asm__(".text\n.globl capture\n.type capture,@function\ncapture:\n"
        " movq (%rsp), %rdi\n leaq 8(%rsp), %rsi\n movq %rbp, %rdx\n jmp dump_state\n");
__attribute__((used)) void dump_state(unsigned long ip, unsigned long sp, unsigned long bp) {
    char line[4096];
    unsigned long lo, hi, len = 0;
    FILE *in = fopen("/proc/self/maps", "r"), *f = out("maps");
    for (; fgets(line, sizeof line, in); fputs(line, f))
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= sp && sp < hi)
            len = hi - sp < 32768 ? hi - sp : 32768;
    fclose(f);
    f = out("stack"), fwrite((void *)sp, 1, len, f), fclose(f);
    f = out("regs"), fprintf(f, "%lx %lx %lx %lx", ip, sp, bp, (unsigned long)&main), fclose(f);
    _exit(0);
}
NOINLINE int fh_c(int x) { volatile char b[40]; b[0] = x; if (x >= 0) capture(); return b[0] + 1; }
NOINLINE int fh_b(int x) { volatile char b[72]; b[1] = x; return fh_c(x + b[1]) + 2; }
NOINLINE int fh_a(int x) { volatile long b[3]; b[2] = x; return fh_b(x + b[2]) * 3; }
static int calls;
NOINLINE int fh_cmp(const void *p, const void *q) {
    if (++calls == 3) capture();
    return *(const int *)p - *(const int *)q;
}
NOINLINE int fh_sorter(int n) {
    int v[16];
    for (int i = 0; i < 16; i++) v[i] = (i * 7 + n) % 16;
    return qsort(v, 16, sizeof v[0], fh_cmp), v[0] + v[15];
}
int main(int argc, char **argv) {
    dir = argv[1];
    return (argv[2][0] == 'q' ? fh_sorter(argc) : fh_a(argc)) == 12345;
}
"#;
    const OMIT_FP: &[&str] = &["-O2", "-fomit-frame-pointer", "-g"];
    const KEEP_FP: &[&str] = &["-O0", "-fno-omit-frame-pointer", "-g"];
    const CHAIN: [&str; 4] = ["fh_c", "fh_b", "fh_a", "main"];

    struct Capture {
        dir: tempfile::TempDir,
        exe: PathBuf,
        regs: Regs,
        stack: Vec<u8>,
        modules: Vec<Module>,
        main: u64,
    }

    fn capture(flags: &[&str], mode: &str) -> Capture {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, exe) = (dir.path().join("t.c"), dir.path().join("t"));
        std::fs::write(&src, PROGRAM).expect("write source");
        let cc = Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status();
        assert!(cc.expect("run cc").success(), "cc failed");
        let run = Command::new(&exe).arg(dir.path()).arg(mode).status();
        assert!(run.expect("run test program").success());
        let read = |n| std::fs::read_to_string(dir.path().join(n)).expect(n);
        let h = |s: &str| u64::from_str_radix(s, 16).ok();
        let r: Vec<u64> = read("regs").split(' ').filter_map(h).collect();
        let module = |l: &str| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[1].contains('x') && f[5].starts_with('/')).then_some(())?;
            let (s, e) = f[0].split_once('-')?;
            let (start, end, file_offset) = (h(s)?, h(e)?, h(f[2])?);
            let (open_path, name, build_id) = (f[5].into(), f[5].into(), None);
            Some(Module {
                open_path,
                name,
                start,
                end,
                file_offset,
                build_id,
            })
        };
        let (regs, main) = (
            Regs {
                ip: r[0],
                sp: r[1],
                bp: r[2],
            },
            r[3],
        );
        let stack = std::fs::read(dir.path().join("stack")).expect("stack");
        let modules = read("maps").lines().filter_map(module).collect();
        let exe = exe.canonicalize().expect("canonical exe");
        Capture {
            dir,
            exe,
            regs,
            stack,
            modules,
            main,
        }
    }

    impl Capture {
        fn unwind(&self, modules: &[Module], max_frames: usize, len: usize) -> Unwound {
            let stack = StackCopy {
                base: self.regs.sp,
                bytes: &self.stack[..len],
            };
            Unwinder::new().unwind(&self.regs, &stack, modules, max_frames)
        }

        /// The modules, those matching `which` reopened from `path`.
        fn moved(&self, path: &Path, which: impl Fn(&Module) -> bool) -> Vec<Module> {
            let mut modules = self.modules.clone();
            for m in modules.iter_mut().filter(|m| which(m)) {
                m.open_path = path.into();
            }
            modules
        }

        /// Function names (symbol table, placed via `main`'s run-time
        /// address) of the executable's frames, `[file]` for other modules.
        fn names(&self, u: &Unwound) -> Vec<String> {
            let data = std::fs::read(&self.exe).expect("read exe");
            let obj = object::File::parse(&*data).expect("parse exe");
            let syms: Vec<_> = (obj.symbols().filter(|s| s.kind() == SymbolKind::Text))
                .map(|s| (s.address(), s.size(), s.name().unwrap_or("?").to_string()))
                .collect();
            let bias = self.main - syms.iter().find(|s| s.2 == "main").expect("main").0;
            let name = |(i, &a): (usize, &u64)| match modules::find(&self.modules, a) {
                Some(m) if m.open_path != self.exe => m.name.rsplit('/').next().map(String::from),
                _ => {
                    let svma = a - bias - u64::from(i > 0);
                    let sym = syms.iter().find(|s| s.0 <= svma && svma < s.0 + s.1);
                    sym.map(|s| s.2.clone())
                }
            };
            let names = u.addrs.iter().enumerate().map(name);
            names.map(Option::unwrap_or_default).collect()
        }
    }

    #[test]
    fn unwind_dwarf_without_frame_pointers_and_cache() {
        let c = capture(OMIT_FP, "chain");
        let mut unwinder = Unwinder::new();
        let stack = StackCopy {
            base: c.regs.sp,
            bytes: &c.stack,
        };
        let u = unwinder.unwind(&c.regs, &stack, &c.modules, 64);
        assert_eq!(c.names(&u)[..4], CHAIN, "{u:?}");
        assert_eq!(
            (u.method, u.method.as_str()),
            (Method::Dwarf, "dwarf"),
            "{u:?}"
        );
        assert!(!u.truncated && u.error.is_none(), "{u:?}");
        let parses = unwinder.parses;
        assert!(parses >= 2, "exe and libc at least");
        assert_eq!(unwinder.unwind(&c.regs, &stack, &c.modules, 64), u);
        assert_eq!(unwinder.parses, parses, "second unwind re-parsed");
    }

    #[test]
    fn unwind_frame_pointers_with_and_without_cfi() {
        let c = capture(KEEP_FP, "chain");
        let u = c.unwind(&c.modules, 64, c.stack.len());
        assert_eq!(c.names(&u)[..4], CHAIN, "{u:?}");
        assert_eq!(u.method, Method::Dwarf, "{u:?}");
        // Not ELF at all: no CFI anywhere, framehop walks rbp.
        let not_elf = c.moved(&c.dir.path().join("t.c"), |_| true);
        let u = c.unwind(&not_elf, 64, c.stack.len());
        assert_eq!(c.names(&u)[..4], CHAIN, "{u:?}");
        assert_eq!(u.method, Method::FramePointer, "{u:?}");
        // Executable unreadable, libc fine: rbp up to main, CFI beyond.
        let moved = c.moved(Path::new("/nonexistent/t"), |m| m.open_path == c.exe);
        let u = c.unwind(&moved, 64, c.stack.len());
        let names = c.names(&u);
        assert!(names[..4] == CHAIN && names[4].starts_with("libc"), "{u:?}");
        assert_eq!(u.method, Method::Mixed, "{u:?}");
    }

    #[test]
    fn unwind_stops_at_copy_end_and_max_frames() {
        let c = capture(OMIT_FP, "chain");
        let u = c.unwind(&c.modules, 64, 16);
        assert_eq!(u.addrs, [c.regs.ip], "{u:?}");
        assert!(u.truncated && u.error.is_some(), "{u:?}");
        let u = c.unwind(&c.modules, 2, c.stack.len());
        assert_eq!(c.names(&u), CHAIN[..2], "{u:?}");
        assert!(u.truncated && u.error.is_none(), "{u:?}");
        // No CFI at all: rbp is junk in -O2 code, but nothing may panic.
        let not_elf = c.moved(&c.dir.path().join("t.c"), |_| true);
        let u = c.unwind(&not_elf, 64, c.stack.len());
        assert_eq!(u.method, Method::FramePointer, "{u:?}");
    }

    #[test]
    fn unwind_qsort_callback_through_libc() {
        let c = capture(OMIT_FP, "qsort");
        let u = c.unwind(&c.modules, 64, c.stack.len());
        let names = c.names(&u);
        let in_libc = |n: &&String| n.starts_with("libc");
        let libc = names[1..].iter().take_while(in_libc).count();
        assert!(names[0] == "fh_cmp" && libc >= 1, "{names:?}");
        assert_eq!(
            names[1 + libc..3 + libc],
            ["fh_sorter", "main"],
            "{names:?}"
        );
        assert_eq!(u.method, Method::Dwarf, "{u:?}");
    }

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
}
