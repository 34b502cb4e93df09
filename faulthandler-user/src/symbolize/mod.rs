//! The symbolize stage: unwound addresses to report frames (function,
//! source location, inlined calls), via blazesym.
//!
//! `debuginfo` decides which file blazesym reads for a module and names
//! what blazesym cannot place; `demangle` turns symbol names into the
//! names reports print.

mod budget;
mod debuginfo;
mod demangle;
#[cfg(test)]
mod testutil;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blazesym::symbolize::evict::{self, Evict};
use blazesym::symbolize::{self as bz, CodeInfo, Sym, Symbolized};

use self::budget::Opened;
pub use self::budget::SymbolizerLimits;

use self::debuginfo::{FileInfo, elf_symbols, file_info, lookup_batch, offset_known};
use self::demangle::function_name;
use crate::modules::Module;
use crate::procs::FileStamp;
use crate::report::NativeFrame as Frame;
use crate::unwind::CodeAddr;

const DEFAULT_DEBUG_DIRS: &[&str] = &["/usr/lib/debug", "/lib/debug"];

pub struct Symbolizer {
    /// Reused across reports: it caches parsed ELF/DWARF per file identity
    /// (it stats the path each call and reloads only if the file changed).
    inner: bz::Symbolizer,
    debug_dirs: Vec<PathBuf>,
    /// By file identity rather than path: `open_path` is often a
    /// per-process alias (`/proc/PID/root/...`, `/proc/self/fd/N`), and a
    /// path can be replaced by a package upgrade between reports.
    files: HashMap<FileStamp, FileInfo>,
    /// The files `inner` holds open, within their limits.
    opened: Opened,
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
        Self {
            inner: new_inner(&debug_dirs),
            debug_dirs,
            files: HashMap::new(),
            opened: Opened::new(SymbolizerLimits::default()),
        }
    }

    #[cfg(test)]
    pub fn with_limits(mut self, limits: SymbolizerLimits) -> Self {
        self.opened = Opened::new(limits);
        self
    }

    /// Drops what is cached for the file at `open_path`: descriptor,
    /// mapping and parsed debug info (e.g. a deleted binary that no
    /// tracked process maps any more).
    pub fn forget_file(&mut self, open_path: &Path) {
        let Some(forgotten) = self.opened.forget(open_path) else {
            return;
        };
        for path in forgotten.paths {
            let _ = self.inner.evict(&Evict::Elf(evict::Elf::new(path)));
        }
        self.files.remove(&forgotten.stamp);
    }

    #[cfg(test)]
    /// addrs[0] is the exact instruction pointer of the innermost frame;
    /// addrs[1..] are raw return addresses (looked up at addr-1 so the call
    /// site's line is found, but printed as given).
    /// Returns the frames, innermost first: for each address, its inlined
    /// frames first (inlined: true), then the outer function frame.
    pub fn symbolize(&mut self, addrs: &[u64], modules: &[Module]) -> Vec<Frame> {
        let points: Vec<CodeAddr> = (addrs.iter().enumerate())
            .map(|(i, &a)| match i {
                0 => CodeAddr::exact(a),
                _ => CodeAddr::ret(a),
            })
            .collect();
        let frames = self.symbolize_points(&points, modules);
        frames.into_iter().flatten().collect()
    }

    /// Many stacks of one process at once: each distinct address is
    /// looked up once however many threads share it (a dump of a hundred
    /// threads parked in the same functions is mostly repeats).
    /// For each stack, for each of its addresses, that address's frames
    /// (inlined ones first): callers place markers such as `<signal
    /// handler called>` between addresses.
    pub fn symbolize_stacks(
        &mut self,
        stacks: &[&[CodeAddr]],
        modules: &[Module],
    ) -> Vec<Vec<Vec<Frame>>> {
        let mut index: HashMap<CodeAddr, usize> = HashMap::new();
        let mut points = Vec::new();
        for &p in stacks.iter().flat_map(|s| s.iter()) {
            index.entry(p).or_insert_with(|| {
                points.push(p);
                points.len() - 1
            });
        }
        let frames = self.symbolize_points(&points, modules);
        let frames_of = |p: &CodeAddr| index.get(p).map_or_else(Vec::new, |&i| frames[i].clone());
        (stacks.iter())
            .map(|s| s.iter().map(frames_of).collect())
            .collect()
    }

    /// The frames of each point, in the order given.
    fn symbolize_points(&mut self, points: &[CodeAddr], modules: &[Module]) -> Vec<Vec<Frame>> {
        let addrs: Vec<u64> = points.iter().map(|p| p.addr).collect();
        // A return address may be the first byte past its module (call as
        // the last instruction), so the module is chosen by the lookup address.
        let lookup = |i: usize| points[i].lookup();
        let mut per_addr: Vec<Vec<Frame>> = vec![Vec::new(); addrs.len()];
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in 0..addrs.len() {
            match modules.iter().position(|m| m.contains(lookup(i))) {
                Some(m) => match groups.iter_mut().find(|(gm, _)| *gm == m) {
                    Some((_, idxs)) => idxs.push(i),
                    None => groups.push((m, vec![i])),
                },
                None => per_addr[i].push(Frame {
                    address: addrs[i],
                    ..Frame::default()
                }),
            }
        }

        for (m, idxs) in groups {
            let module = &modules[m];
            let info = file_info(&mut self.files, &self.debug_dirs, &module.open_path);
            self.opened.used(&module.open_path, info.debug_file());
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
                    address: addrs[i],
                    module: Some(module.name.clone()),
                    module_offset: Some(module.file_offset_of(addrs[i])),
                    build_id: build_id.clone(),
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
        if self.opened.over_budget() {
            // blazesym also holds files we never name (the debug links it
            // followed): only a new instance surely lets go of them all.
            self.inner = new_inner(&self.debug_dirs);
            self.files.clear();
            self.opened.clear();
        }
        per_addr
    }
}

fn new_inner(debug_dirs: &[PathBuf]) -> bz::Symbolizer {
    bz::Symbolizer::builder()
        .set_debug_dirs(Some(debug_dirs))
        // On by default; spelled out because the frames depend on them.
        .enable_code_info(true)
        .enable_inlined_fns(true)
        // blazesym would run the C++ demangler on every name, mangled
        // or not, turning a C function `t` into `unsigned short`; we
        // demangle only mangled names ourselves (see `demangle`).
        .enable_demangling(false)
        .build()
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
        outer.function_offset = offset.map(|o| o + delta);
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

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

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
            assert_eq!(last.function_offset, Some(off));
            for f in &frames {
                assert_eq!(f.address, addr);
                assert_eq!(f.module_offset, Some(addr - BIAS));
                assert_eq!(f.build_id, build_id);
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
            assert_eq!(y.address, a + 1);
            assert_eq!((&x.function, x.line), (&y.function, y.line));
        }
        assert_eq!(two.last().unwrap().function_offset, Some(1));

        // Unmapped address, and a module whose file is gone: bare frames.
        let gone = Module {
            open_path: dir.path().join("missing"),
            name: "/missing".into(),
            start: 0x1000,
            end: 0x2000,
            file_offset: 0,
            build_id: Some(vec![0xab, 0x01]),
            hold: None,
        };
        let frames = s.symbolize(&[0x10, 0x1800], &[module, gone]);
        let bare = |address: u64| Frame {
            address,
            ..Frame::default()
        };
        let gone_frame = Frame {
            module: Some("/missing".into()),
            module_offset: Some(0x800),
            build_id: Some("ab01".into()),
            ..bare(0x1800)
        };
        assert_eq!(frames, [bare(0x10), gone_frame]);
    }

    // Here rather than in `demangle`: the assertion names this module's path.
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
        let libc = libc_path();
        let (abort, _) = symbol(&libc, true, |n| n == "abort");
        let frames = Symbolizer::new().symbolize(&[BIAS + abort + 4], &[exec_module(&libc)]);
        let f = frames.last().unwrap();
        assert!(name(f).contains("abort"), "{f:?}");
        assert!(
            f.file.is_some() && f.line.is_some() && f.build_id.is_some(),
            "{f:?}"
        );
    }

    /// Files under `dir` this process holds open or mapped.
    fn held_under(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
        let fds = std::fs::read_dir("/proc/self/fd").unwrap();
        let mut held: std::collections::BTreeSet<PathBuf> = fds
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.starts_with(dir))
            .collect();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped = maps.lines().filter_map(|l| l.split_whitespace().nth(5));
        held.extend(mapped.map(PathBuf::from).filter(|p| p.starts_with(dir)));
        held
    }

    #[test]
    fn forgotten_and_over_budget_files_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let exes: Vec<PathBuf> = (0..4)
            .map(|i| {
                let sub = dir.path().join(i.to_string());
                std::fs::create_dir(&sub).unwrap();
                compile(&sub, "cc", "prog.c", C_SRC)
            })
            .collect();
        let (outer, _) = symbol(&exes[0], false, |n| n == "outer");
        let check = |s: &mut Symbolizer, exe: &PathBuf| {
            let frames = s.symbolize(&[BIAS + outer], &[exec_module(exe)]);
            assert_eq!(name(frames.last().unwrap()), "outer", "{frames:?}");
        };

        let mut s = Symbolizer::new();
        for exe in &exes {
            check(&mut s, exe);
        }
        assert_eq!(held_under(dir.path()).len(), exes.len());
        assert_eq!(s.opened.len(), exes.len());
        for exe in &exes {
            s.forget_file(exe);
        }
        assert!(
            held_under(dir.path()).is_empty(),
            "{:?}",
            held_under(dir.path())
        );
        assert_eq!(s.opened.len(), 0);
        assert!(s.files.is_empty());
        // Forgotten files are read again when asked for.
        check(&mut s, &exes[0]);

        let limits = SymbolizerLimits {
            files: 2,
            bytes: u64::MAX,
        };
        drop(s);
        let mut s = Symbolizer::new().with_limits(limits);
        for exe in &exes {
            check(&mut s, exe);
            assert!(
                held_under(dir.path()).len() <= 2,
                "{:?}",
                held_under(dir.path())
            );
        }
        let size = std::fs::metadata(&exes[0]).unwrap().len();
        drop(s);
        let mut s = Symbolizer::new().with_limits(SymbolizerLimits {
            files: 100,
            bytes: size,
        });
        for exe in &exes {
            check(&mut s, exe);
            assert!(
                held_under(dir.path()).len() <= 1,
                "{:?}",
                held_under(dir.path())
            );
        }
    }
}
