//! The symbolize stage: unwound addresses to report frames (function,
//! source location, inlined calls), via blazesym.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{self as bz, CodeInfo, Input, Sym, Symbolized};
use object::{Object as _, ObjectSegment as _};

use crate::modules::Module;
use crate::report::Frame;

const DEFAULT_DEBUG_DIRS: &[&str] = &["/usr/lib/debug", "/lib/debug"];

/// What we read once per file ourselves.
#[derive(Default)]
struct FileInfo {
    build_id: Option<Vec<u8>>,
    /// `.build-id/xx/yyyy.debug` under a debug dir, with the file's PT_LOADs
    /// to look up virtual addresses in it. blazesym only tries that path
    /// while following a `.gnu_debuglink`; for a file with neither DWARF
    /// nor a debuglink we symbolize with it ourselves. Its `.symtab` also
    /// holds the local symbols (`foo.cold`) a stripped file lacks.
    build_id_debug: Option<(PathBuf, Loads)>,
    /// The file has DWARF or a `.gnu_debuglink`, which blazesym follows.
    own_debug: bool,
}

/// (p_offset, p_filesz, p_vaddr) of each PT_LOAD.
type Loads = Vec<(u64, u64, u64)>;

static NO_INFO: FileInfo = FileInfo {
    build_id: None,
    build_id_debug: None,
    own_debug: false,
};

/// File identity rather than path: `open_path` is often a per-process alias
/// (`/proc/PID/root/...`, `/proc/self/fd/N`), and a path can be replaced by a
/// package upgrade between reports.
type FileKey = (u64, u64, u64, i64, i64);

pub struct Symbolizer {
    /// Reused across reports: it caches parsed ELF/DWARF per file identity
    /// (it stats the path each call and reloads only if the file changed).
    inner: bz::Symbolizer,
    debug_dirs: Vec<PathBuf>,
    files: HashMap<FileKey, FileInfo>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self::with_debug_dirs(DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from).collect())
    }

    /// Like `new`, searching `debug_dirs` (and their `.build-id/`) for
    /// separate debug files instead of /usr/lib/debug and /lib/debug.
    pub fn with_debug_dirs(debug_dirs: Vec<PathBuf>) -> Self {
        let inner = bz::Symbolizer::builder()
            .set_debug_dirs(Some(&debug_dirs))
            // On by default; spelled out because the frames depend on them.
            .enable_code_info(true)
            .enable_inlined_fns(true)
            // blazesym would run the C++ demangler on every name, mangled
            // or not, turning a C function `t` into `unsigned short`; we
            // demangle only mangled names ourselves (see `demangle`).
            .enable_demangling(false)
            .build();
        Self {
            inner,
            debug_dirs,
            files: HashMap::new(),
        }
    }

    /// addrs[0] is the exact instruction pointer of the innermost frame;
    /// addrs[1..] are raw return addresses (looked up at addr-1 so the call
    /// site's line is found, but printed as given).
    /// Returns the frames, innermost first: for each address, its inlined
    /// frames first (inlined: true), then the outer function frame.
    pub fn symbolize(&mut self, addrs: &[u64], modules: &[Module]) -> Vec<Frame> {
        // A return address may be the first byte past its module (call as
        // the last instruction), so the module is chosen by the lookup address.
        let lookup = |i: usize| addrs[i].saturating_sub(u64::from(i > 0));
        let mut per_addr: Vec<Vec<Frame>> = vec![Vec::new(); addrs.len()];
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in 0..addrs.len() {
            match modules.iter().position(|m| m.contains(lookup(i))) {
                Some(m) => match groups.iter_mut().find(|(gm, _)| *gm == m) {
                    Some((_, idxs)) => idxs.push(i),
                    None => groups.push((m, vec![i])),
                },
                None => per_addr[i].push(Frame {
                    address: hex(addrs[i]),
                    ..Frame::default()
                }),
            }
        }

        for (m, idxs) in groups {
            let module = &modules[m];
            let info = file_info(&mut self.files, &self.debug_dirs, &module.open_path);
            let build_id = module
                .build_id
                .as_deref()
                .or(info.build_id.as_deref())
                .map(hex_bytes);
            let offsets: Vec<u64> = idxs
                .iter()
                .map(|&i| module.file_offset_of(lookup(i)))
                .collect();
            let syms = lookup_batch(&self.inner, module, info, &offsets);
            // Offsets whose function blazesym could not place them in.
            let misplaced: Vec<usize> = (0..syms.len())
                .filter(|&k| matches!(&syms[k], Symbolized::Sym(s) if !offset_known(s)))
                .collect();
            let mut elf_syms: Vec<Option<(String, u64)>> = vec![None; syms.len()];
            if !misplaced.is_empty() {
                let wanted: Vec<u64> = misplaced.iter().map(|&k| offsets[k]).collect();
                let found = elf_symbols(&self.inner, module, info, &wanted);
                for (k, f) in misplaced.into_iter().zip(found) {
                    elf_syms[k] = f;
                }
            }
            for (k, &i) in idxs.iter().enumerate() {
                let base = Frame {
                    address: hex(addrs[i]),
                    module: Some(module.name.clone()),
                    module_offset: Some(hex(module.file_offset_of(addrs[i]))),
                    build_id: build_id.clone(),
                    language: Some("native"),
                    ..Frame::default()
                };
                per_addr[i] = match syms.get(k) {
                    Some(Symbolized::Sym(sym)) => {
                        frames_of(sym, elf_syms[k].take(), base, addrs[i] - lookup(i))
                    }
                    _ => vec![base],
                };
            }
        }
        per_addr.into_iter().flatten().collect()
    }
}

/// One blazesym call for all of a module's offsets. An error for the whole
/// batch (file gone, not ELF) yields no symbols, so every frame stays bare.
fn lookup_batch<'a>(
    inner: &'a bz::Symbolizer,
    module: &Module,
    info: &FileInfo,
    offsets: &[u64],
) -> Vec<Symbolized<'a>> {
    let result = match &info.build_id_debug {
        Some((debug_file, loads)) if !info.own_debug => inner.symbolize(
            &Source::Elf(Elf::new(debug_file)),
            Input::VirtOffset(&virt_offsets(loads, offsets)),
        ),
        _ => inner.symbolize(
            &Source::Elf(Elf::new(&module.open_path)),
            Input::FileOffset(offsets),
        ),
    };
    result.unwrap_or_default()
}

/// Virtual addresses of file offsets, through the file's PT_LOADs.
fn virt_offsets(loads: &Loads, offsets: &[u64]) -> Vec<u64> {
    offsets
        .iter()
        .map(|&off| {
            loads
                .iter()
                .find(|&&(p_off, p_filesz, _)| off >= p_off && off - p_off < p_filesz)
                // No address maps to u64::MAX, so it comes back unknown.
                .map_or(u64::MAX, |&(p_off, _, p_vaddr)| off - p_off + p_vaddr)
        })
        .collect()
}

/// Whether `sym.offset` is a real offset into the function. A function
/// split into parts (`foo` and `foo.cold`) has DWARF address ranges but no
/// single start: blazesym then reports address 0, no size and the
/// looked-up address itself as the offset. A symbol without a size (ELF's
/// best effort for sizeless symbols) is trusted as blazesym trusts it.
fn offset_known(sym: &Sym<'_>) -> bool {
    match sym.size {
        Some(size) => sym.offset < size,
        None => sym.addr != 0,
    }
}

/// For each offset, the ELF symbol that contains it (its name and the
/// offset into it), e.g. `foo.cold` for an address in the cold part of
/// `foo`. Only sized symbols that contain the offset count. The separate
/// debug file's `.symtab` is searched first (a stripped file keeps only
/// `.dynsym`), then the file's own.
fn elf_symbols(
    inner: &bz::Symbolizer,
    module: &Module,
    info: &FileInfo,
    offsets: &[u64],
) -> Vec<Option<(String, u64)>> {
    let containing = |s: &Symbolized<'_>| match s {
        Symbolized::Sym(s) if !s.name.is_empty() && s.size.is_some_and(|n| s.offset < n) => {
            Some((demangle(&s.name), s.offset as u64))
        }
        _ => None,
    };
    let elf_only = |path: &Path| {
        let mut elf = Elf::new(path);
        elf.debug_syms = false;
        Source::Elf(elf)
    };
    let mut found: Vec<Option<(String, u64)>> = vec![None; offsets.len()];
    if let Some((debug_file, loads)) = &info.build_id_debug {
        let virt = virt_offsets(loads, offsets);
        let syms = inner.symbolize(&elf_only(debug_file), Input::VirtOffset(&virt));
        for (f, s) in found.iter_mut().zip(syms.unwrap_or_default()) {
            *f = containing(&s);
        }
    }
    let rest: Vec<usize> = (0..offsets.len()).filter(|&k| found[k].is_none()).collect();
    if !rest.is_empty() {
        let rest_offsets: Vec<u64> = rest.iter().map(|&k| offsets[k]).collect();
        let syms = inner.symbolize(
            &elf_only(&module.open_path),
            Input::FileOffset(&rest_offsets),
        );
        for (k, s) in rest.into_iter().zip(syms.unwrap_or_default()) {
            found[k] = containing(&s);
        }
    }
    found
}

/// `elf_sym` replaces the outer function's name and offset when `sym` could
/// not place the address (see `offset_known`). `delta` is how far the
/// printed address lies past the looked-up one, so function_offset matches
/// the printed address.
fn frames_of(sym: &Sym<'_>, elf_sym: Option<(String, u64)>, base: Frame, delta: u64) -> Vec<Frame> {
    // blazesym lists inlined calls outermost first; reports want innermost
    // first. Each entry's code_info is the location inside that function.
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inl| {
            let mut frame = Frame {
                function: function_name(&inl.name),
                inlined: true,
                ..base.clone()
            };
            set_location(&mut frame, inl.code_info.as_ref());
            frame
        })
        .collect();
    let (function, offset) = match elf_sym {
        Some((name, offset)) => (Some(name), Some(offset)),
        None => (
            function_name(&sym.name),
            offset_known(sym).then_some(sym.offset as u64),
        ),
    };
    let mut outer = base;
    if function.is_some() {
        outer.function_offset = offset.map(|o| hex(o + delta));
    }
    outer.function = function;
    set_location(&mut outer, sym.code_info.as_deref());
    frames.push(outer);
    frames
}

fn set_location(frame: &mut Frame, code_info: Option<&CodeInfo<'_>>) {
    let Some(ci) = code_info else { return };
    frame.file = Some(ci.to_path().to_string_lossy().into_owned());
    // DWARF uses 0 for "no line/column".
    frame.line = ci.line.filter(|&l| l != 0);
    frame.column = ci.column.filter(|&c| c != 0).map(u32::from);
}

/// A function's name for a frame, demangled; None when blazesym has none.
fn function_name(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| demangle(name))
}

/// The demangled form of a mangled C++ (Itanium) or Rust name; any other
/// name verbatim. Only names with a mangling prefix are tried: the C++
/// demangler also accepts bare type manglings, so C functions named `t`,
/// `i` or `c` would become `unsigned short`, `int` and `char`.
/// Output as blazesym's demangling gave it: C++ with cpp_demangle's default
/// options, Rust without the hash (rustc-demangle's alternate format).
fn demangle(name: &str) -> String {
    // `__Z`/`__R`: the extra underscore some platforms prefix to symbols.
    let itanium = name.starts_with("_Z") || name.starts_with("__Z");
    let rust_v0 = name.starts_with("_R") || name.starts_with("__R");
    if rust_v0 {
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            return format!("{d:#}");
        }
    } else if itanium {
        // Legacy Rust names are Itanium names ending in a `17h<hash>E`
        // path element; rustc-demangle shows that hash only when not in
        // the alternate format. Other Itanium names are C++.
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            let short = format!("{d:#}");
            if format!("{d}") != short {
                return short;
            }
        }
        if let Some(d) = cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|sym| sym.demangle().ok())
        {
            return d;
        }
    }
    name.to_owned()
}

fn file_info<'a>(
    files: &'a mut HashMap<FileKey, FileInfo>,
    debug_dirs: &[PathBuf],
    path: &Path,
) -> &'a FileInfo {
    let Ok(md) = std::fs::metadata(path) else {
        return &NO_INFO;
    };
    let key = (md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec());
    files
        .entry(key)
        .or_insert_with(|| read_file_info(path, debug_dirs))
}

fn read_file_info(path: &Path, debug_dirs: &[PathBuf]) -> FileInfo {
    let Ok(file) = File::open(path) else {
        return FileInfo::default();
    };
    // ReadCache reads only the headers and notes we touch, not the whole file.
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return FileInfo::default();
    };
    let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
    let has_dwarf = [".debug_info", ".zdebug_info"]
        .iter()
        .any(|name| obj.section_by_name(name).is_some());
    let has_debuglink = matches!(obj.gnu_debuglink(), Ok(Some(_)));
    let build_id_debug = build_id.as_deref().and_then(|id| {
        let debug_file = find_build_id_file(debug_dirs, id)?;
        let loads = obj
            .segments()
            .map(|seg| {
                let (off, size) = seg.file_range();
                (off, size, seg.address())
            })
            .collect();
        Some((debug_file, loads))
    });
    FileInfo {
        build_id,
        build_id_debug,
        own_debug: has_dwarf || has_debuglink,
    }
}

fn find_build_id_file(debug_dirs: &[PathBuf], id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let rel = format!(".build-id/{first:02x}/{}.debug", hex_bytes(rest));
    debug_dirs
        .iter()
        .map(|dir| dir.join(&rel))
        .find(|p| p.is_file())
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{ObjectSymbol as _, SegmentFlags};
    use std::process::Command;

    /// A pretend load bias, so test addresses look like a PIE's.
    const BIAS: u64 = 0x5555_0000_0000;

    fn compile(dir: &Path, compiler: &str, src_name: &str, src: &str) -> PathBuf {
        compile_with(dir, compiler, src_name, src, &[])
    }

    fn compile_with(
        dir: &Path,
        compiler: &str,
        src_name: &str,
        src: &str,
        flags: &[&str],
    ) -> PathBuf {
        let src_path = dir.join(src_name);
        std::fs::write(&src_path, src).unwrap();
        let out = dir.join(src_name.replace('.', "_"));
        let mut cmd = Command::new(compiler);
        cmd.args(["-g", "-O2", "-Wl,--build-id"])
            .args(flags)
            .arg("-o");
        assert!(cmd.arg(&out).arg(&src_path).status().unwrap().success());
        out
    }

    fn elf<T>(path: &Path, f: impl FnOnce(&object::File) -> T) -> T {
        let data = std::fs::read(path).unwrap();
        f(&object::File::parse(&*data).unwrap())
    }

    /// The executable PT_LOAD mapped at BIAS, as the loader would for a PIE.
    fn exec_module(path: &Path) -> Module {
        let is_x =
            |fl| matches!(fl, SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
        let (vaddr, size, off) = elf(path, |obj| {
            let seg = obj.segments().find(|s| is_x(s.flags())).unwrap();
            (seg.address(), seg.size(), seg.file_range().0)
        });
        Module {
            open_path: path.to_owned(),
            name: path.display().to_string(),
            start: BIAS + (vaddr & !0xfff),
            end: BIAS + vaddr + size,
            file_offset: off & !0xfff,
            build_id: None,
        }
    }

    /// (address, size) of a symbol whose name satisfies `pred`.
    fn symbol(path: &Path, dynamic: bool, pred: impl Fn(&str) -> bool) -> (u64, u64) {
        elf(path, |obj| {
            let mut syms = if dynamic {
                obj.dynamic_symbols()
            } else {
                obj.symbols()
            };
            let sym = syms.find(|s| s.name().is_ok_and(&pred)).unwrap();
            (sym.address(), sym.size())
        })
    }

    fn build_id(path: &Path) -> Vec<u8> {
        elf(path, |obj| obj.build_id().unwrap().unwrap().to_vec())
    }

    fn line_of(src: &str, marker: &str) -> Option<u32> {
        Some(src.lines().position(|l| l.contains(marker))? as u32 + 1)
    }

    fn name(f: &Frame) -> &str {
        f.function.as_deref().unwrap_or("")
    }

    const C_SRC: &str = r#"
static int counter;
static inline __attribute__((always_inline)) int inner(int x) {
    counter += x * 3; /* MARK_INNER */
    return counter;
}
__attribute__((noinline)) int outer(int x) {
    int r = inner(x); /* MARK_CALL */
    return r + 1;
}
int main(int argc, char **argv) { (void)argv; return outer(argc); }
"#;

    #[test]
    fn c_inlined_frames_lines_and_build_id() {
        let dir = tempfile::tempdir().unwrap();
        let exe = compile(dir.path(), "cc", "prog.c", C_SRC);
        let module = exec_module(&exe);
        let modules = std::slice::from_ref(&module);
        let (outer, size) = symbol(&exe, false, |n| n == "outer");
        let build_id = Some(hex_bytes(&build_id(&exe)));
        let mut s = Symbolizer::new();
        let mut saw_inlined = false;
        for off in 0..size {
            let addr = BIAS + outer + off;
            let frames = s.symbolize(&[addr], modules);
            let last = frames.last().unwrap();
            assert_eq!((name(last), last.inlined), ("outer", false), "{frames:?}");
            assert_eq!(last.function_offset, Some(hex(off)));
            for f in &frames {
                assert_eq!(f.address, hex(addr));
                assert_eq!(f.module_offset, Some(hex(addr - BIAS)));
                assert_eq!((&f.build_id, f.language), (&build_id, Some("native")));
                assert!(f.file.as_deref().unwrap().ends_with("/prog.c"), "{f:?}");
            }
            if let [inl, out] = &frames[..] {
                assert_eq!((name(inl), inl.inlined), ("inner", true));
                assert_eq!(inl.line, line_of(C_SRC, "MARK_INNER"));
                assert_eq!(out.line, line_of(C_SRC, "MARK_CALL"));
                saw_inlined = true;
            }
        }
        assert!(saw_inlined, "no address in outer() had inner() inlined");

        // Return addresses are looked up one byte earlier but printed as is.
        let a = BIAS + outer;
        let one = s.symbolize(&[a], modules);
        let two = s.symbolize(&[a, a + 1], modules);
        assert_eq!(two.len(), 2 * one.len());
        for (x, y) in one.iter().zip(&two[one.len()..]) {
            assert_eq!(y.address, hex(a + 1));
            assert_eq!((&x.function, x.line), (&y.function, y.line));
        }
        assert_eq!(two.last().unwrap().function_offset.as_deref(), Some("0x1"));

        // Unmapped address, and a module whose file is gone: bare frames.
        let gone = Module {
            open_path: dir.path().join("missing"),
            name: "/missing".into(),
            start: 0x1000,
            end: 0x2000,
            file_offset: 0,
            build_id: Some(vec![0xab, 0x01]),
        };
        let frames = s.symbolize(&[0x10, 0x1800], &[module, gone]);
        let bare = |address: &str| Frame {
            address: address.into(),
            ..Frame::default()
        };
        let gone_frame = Frame {
            module: Some("/missing".into()),
            module_offset: Some("0x800".into()),
            build_id: Some("ab01".into()),
            language: Some("native"),
            ..bare("0x1800")
        };
        assert_eq!(frames, [bare("0x10"), gone_frame]);
    }

    /// The unlikely branch only calls a cold noreturn function, so GCC moves
    /// it to `foo.cold` in .text.unlikely and gives foo DW_AT_ranges.
    const COLD_SRC: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline, noreturn, cold)) void fail(const char *what, int i, int v) {
    fprintf(stderr, "%s at %d: %d\n", what, i, v);
    abort();
}
int table[64];
__attribute__((noinline)) int foo(int n) {
    int sum = 0;
    for (int i = 0; i < n && i < 64; i++) {
        if (__builtin_expect(table[i] < 0, 0))
            fail("negative entry", i, table[i]); /* MARK_COLD */
        sum += table[i] * 3;
    }
    return sum;
}
int main(int argc, char **argv) { (void)argv; return foo(argc); }
"#;

    #[test]
    fn split_function_offsets_are_within_their_part() {
        let dir = tempfile::tempdir().unwrap();
        let flags = ["-freorder-blocks-and-partition"];
        let exe = compile_with(dir.path(), "cc", "cold.c", COLD_SRC, &flags);
        let has_cold = elf(&exe, |obj| {
            obj.symbols().any(|s| s.name() == Ok("foo.cold"))
        });
        assert!(has_cold, "cc did not split foo into foo and foo.cold");
        let (cold, cold_size) = symbol(&exe, false, |n| n == "foo.cold");
        let (hot, hot_size) = symbol(&exe, false, |n| n == "foo");
        let modules = [exec_module(&exe)];
        let mut s = Symbolizer::new();

        let mut saw_line = false;
        for off in 0..cold_size {
            let frames = s.symbolize(&[BIAS + cold + off], &modules);
            let f = frames.last().unwrap();
            assert!(matches!(name(f), "foo" | "foo.cold"), "{frames:?}");
            let offset = f.function_offset.as_deref().expect("an offset");
            let offset = u64::from_str_radix(offset.trim_start_matches("0x"), 16).unwrap();
            assert!(offset < cold_size, "{offset:#x} >= {cold_size:#x}: {f:?}");
            assert!(f.file.as_deref().unwrap().ends_with("/cold.c"), "{f:?}");
            saw_line |= f.line == line_of(COLD_SRC, "MARK_COLD");
        }
        assert!(saw_line, "no address in foo.cold at the fail() call");

        // The hot part has no DWARF start of its own either.
        for off in 0..hot_size {
            let frames = s.symbolize(&[BIAS + hot + off], &modules);
            let f = frames.last().unwrap();
            assert_eq!(name(f), "foo", "{frames:?}");
            assert_eq!(f.function_offset, Some(hex(off)), "{frames:?}");
        }

        // fail() is the last call in foo.cold: its return address lies
        // past the part, and is looked up one byte earlier.
        let ret = BIAS + cold + cold_size;
        let frames = s.symbolize(&[BIAS + hot, ret], &modules);
        let f = frames.iter().rfind(|f| f.address == hex(ret)).unwrap();
        assert!(matches!(name(f), "foo" | "foo.cold"), "{frames:?}");
        assert_eq!(f.function_offset, Some(hex(cold_size)), "{frames:?}");
    }

    /// `t`, `i`, `c` and `s` are also the Itanium manglings of the types
    /// `unsigned short`, `int`, `char` and `short`. `noclone` keeps GCC from
    /// naming a part `t.constprop.0` and the like.
    const PLAIN_NAMES_SRC: &str = r#"
#include <pthread.h>
static int sink;
static inline __attribute__((always_inline)) int s(int x) {
    sink += x * 5; /* MARK_S */
    return sink;
}
__attribute__((noinline, noclone)) void *t(void *a) { sink += (int)(long)a; return a; }
__attribute__((noinline, noclone)) int i(int x) { return s(x) + 1; }
__attribute__((noinline, noclone)) int c(int x) { sink ^= x; return sink * 3; }
int main(int argc, char **argv) {
    (void)argv;
    pthread_t th;
    if (argc > 5 && pthread_create(&th, 0, t, 0) == 0) pthread_join(th, 0);
    t((void *)(long)argc);
    return i(argc) + c(argc);
}
"#;

    /// Names that are not mangled come back verbatim, from DWARF and from
    /// the symbol table alike, for outer and inlined frames.
    #[test]
    fn plain_c_names_are_not_demangled() {
        let dir = tempfile::tempdir().unwrap();
        let exe = compile_with(dir.path(), "cc", "plain.c", PLAIN_NAMES_SRC, &["-pthread"]);
        let funcs: Vec<(&str, u64, u64)> = ["t", "i", "c", "main"]
            .into_iter()
            .map(|f| {
                let (addr, size) = symbol(&exe, false, |n| n == f);
                (f, addr, size)
            })
            .collect();
        let check = |with_dwarf: bool| {
            let modules = [exec_module(&exe)];
            let mut s = Symbolizer::new();
            let mut saw_inlined = false;
            for &(func, addr, size) in &funcs {
                assert!(size > 0, "{func} has no size");
                for off in 0..size {
                    let frames = s.symbolize(&[BIAS + addr + off], &modules);
                    let (outer, inlined) = frames.split_last().unwrap();
                    assert_eq!((name(outer), outer.inlined), (func, false), "{frames:?}");
                    assert_eq!(outer.function_offset, Some(hex(off)), "{frames:?}");
                    assert_eq!(outer.file.is_some(), with_dwarf, "{frames:?}");
                    for f in inlined {
                        assert_eq!((func, name(f), f.inlined), ("i", "s", true), "{frames:?}");
                        assert_eq!(f.line, line_of(PLAIN_NAMES_SRC, "MARK_S"));
                        saw_inlined = true;
                    }
                }
            }
            assert!(
                !with_dwarf || saw_inlined,
                "no address in i() had s() inlined"
            );
        };
        check(true);
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg(&exe)
            .status();
        assert!(stripped.unwrap().success());
        check(false);
    }

    #[test]
    fn only_mangled_names_are_demangled() {
        for (mangled, want) in [
            (
                "_ZN3app6renderERKNS_6WidgetEi",
                "app::render(app::Widget const&, int)",
            ),
            ("_ZNK3app6Widget4pokeEi", "app::Widget::poke(int) const"),
            (
                "_ZN3app6renderERKNS_6WidgetEi.cold",
                "app::render(app::Widget const&, int) [clone .cold]",
            ),
            (
                "__ZN3app6renderERKNS_6WidgetEi",
                "app::render(app::Widget const&, int)",
            ),
            (
                "_ZN4core9panicking9panic_fmt17h5f1a6fd39197ad62E",
                "core::panicking::panic_fmt",
            ),
            ("_RNvCs15kBYyAo9fc_7mycrate7example", "mycrate::example"),
            // Not mangled, though the C++ demangler would take them as types.
            ("t", "t"),
            ("i", "i"),
            ("c", "c"),
            ("St", "St"),
            ("main", "main"),
            ("_start", "_start"),
            // Mangling prefix but not a valid name: verbatim.
            ("_Zfoo", "_Zfoo"),
            ("_Rfoo", "_Rfoo"),
        ] {
            assert_eq!(demangle(mangled), want, "{mangled}");
        }
    }

    #[test]
    fn cpp_names_are_demangled() {
        let src = r#"
namespace outerns { namespace inner {
__attribute__((noinline)) int compute(int x) { return x * 7 + 1; } // MARK_CPP
} }
int main(int argc, char **) { return outerns::inner::compute(argc); }
"#;
        let dir = tempfile::tempdir().unwrap();
        let exe = compile(dir.path(), "c++", "prog.cpp", src);
        let (addr, _) = symbol(&exe, false, |n| n.contains("compute"));
        let frames = Symbolizer::new().symbolize(&[BIAS + addr], &[exec_module(&exe)]);
        let f = frames.last().unwrap();
        assert!(name(f).starts_with("outerns::inner::compute"), "{f:?}");
        assert!(f.file.as_deref().unwrap().ends_with("/prog.cpp"));
        assert_eq!(f.line, line_of(src, "MARK_CPP"));
    }

    /// Debug info only under <dir>/.build-id/, no .gnu_debuglink.
    #[test]
    fn debug_file_found_by_build_id_alone() {
        let dir = tempfile::tempdir().unwrap();
        let exe = compile(dir.path(), "cc", "prog.c", C_SRC);
        let id = build_id(&exe);
        let debug_dir = dir.path().join("debug");
        let rel = format!(".build-id/{:02x}/{}.debug", id[0], hex_bytes(&id[1..]));
        let target = debug_dir.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success());
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&exe)
            .arg(&target));
        run(Command::new("strip").arg("--strip-debug").arg(&exe));
        let (outer, size) = symbol(&exe, false, |n| n == "outer");
        let modules = [exec_module(&exe)];
        let addrs: Vec<u64> = (0..size).map(|off| BIAS + outer + off).collect();

        let without = Symbolizer::new().symbolize(&addrs[..1], &modules);
        assert_eq!(without.last().unwrap().file, None);
        let frames = Symbolizer::with_debug_dirs(vec![debug_dir]).symbolize(&addrs, &modules);
        assert!(frames.iter().any(|f| f.inlined && name(f) == "inner"));
        let f = frames.last().unwrap();
        assert_eq!(name(f), "outer");
        assert!(f.file.as_deref().unwrap().ends_with("/prog.c"), "{f:?}");
    }

    /// An executable file mapping of this test process.
    fn self_mapping(pred: impl Fn(&Module) -> bool) -> Option<Module> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = f[0].split_once('-')?;
            let path = f
                .get(5)
                .filter(|p| p.starts_with('/') && f[1].contains('x'))?;
            let module = Module {
                open_path: PathBuf::from(path),
                name: path.to_string(),
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                file_offset: u64::from_str_radix(f[2], 16).ok()?,
                build_id: None,
            };
            pred(&module).then_some(module)
        })
    }

    #[inline(never)]
    fn rust_marker() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn rust_names_are_demangled_in_live_process() {
        let addr = rust_marker as fn() -> u64 as usize as u64;
        let module = self_mapping(|m| m.contains(addr)).unwrap();
        let frames = Symbolizer::new().symbolize(&[addr], &[module]);
        let f = frames.last().unwrap();
        assert!(name(f).ends_with("symbolize::tests::rust_marker"), "{f:?}");
    }

    #[test]
    fn libc_frame_has_file_and_line() {
        let is_libc = |m: &Module| {
            m.name
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libc.so"))
        };
        let libc = self_mapping(is_libc).unwrap().open_path;
        let (abort, _) = symbol(&libc, true, |n| n == "abort");
        let frames = Symbolizer::new().symbolize(&[BIAS + abort + 4], &[exec_module(&libc)]);
        let f = frames.last().unwrap();
        assert!(name(f).contains("abort"), "{f:?}");
        assert!(
            f.file.is_some() && f.line.is_some() && f.build_id.is_some(),
            "{f:?}"
        );
    }

    /// Like `__assert_fail_base.cold`: a local symbol only the separate
    /// debug file's .symtab has.
    #[test]
    fn libc_cold_part_is_named_from_debug_symtab() {
        let is_libc = |m: &Module| {
            m.name
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libc.so"))
        };
        let libc = self_mapping(is_libc).unwrap().open_path;
        let id = build_id(&libc);
        let debug_dirs: Vec<PathBuf> = DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from).collect();
        let debug = find_build_id_file(&debug_dirs, &id).expect("libc debug info (libc6-dbg)");
        let cold = elf(&debug, |obj| {
            obj.symbols()
                .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 1)
                .find_map(|s| {
                    Some((
                        s.name().ok()?.strip_suffix(".cold")?.to_owned(),
                        s.address(),
                    ))
                })
        });
        let Some((base, addr)) = cold else {
            eprintln!("no .cold symbol in this libc; nothing to check");
            return;
        };
        let frames = Symbolizer::new().symbolize(&[BIAS + addr + 1], &[exec_module(&libc)]);
        let f = frames.last().unwrap();
        assert_eq!(name(f), format!("{base}.cold"), "{frames:?}");
        assert_eq!(f.function_offset.as_deref(), Some("0x1"), "{frames:?}");
    }
}
