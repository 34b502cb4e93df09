//! Which file blazesym reads for a module, and what to name an address
//! blazesym cannot place: separate debug files found by build-id alone,
//! file offsets turned into their virtual addresses, and ELF symbols for
//! the parts of split functions (`foo.cold`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{self as bz, Input, Sym, Symbolized};
use object::{Object as _, ObjectSegment as _};

use super::demangle::demangle;
use super::hex_bytes;
use crate::modules::Module;
use crate::procs::{self, FileStamp};

/// What we read once per file ourselves.
#[derive(Default)]
pub(super) struct FileInfo {
    pub(super) build_id: Option<Vec<u8>>,
    /// `.build-id/xx/yyyy.debug` under a debug dir, with the file's PT_LOADs
    /// to look up virtual addresses in it. blazesym only tries that path
    /// while following a `.gnu_debuglink`; for a file with neither DWARF
    /// nor a debuglink we symbolize with it ourselves. Its `.symtab` also
    /// holds the local symbols (`foo.cold`) a stripped file lacks.
    build_id_debug: Option<(PathBuf, Loads)>,
    /// The file has DWARF or a `.gnu_debuglink`, which blazesym follows.
    own_debug: bool,
}

impl FileInfo {
    /// The separate debug file found by build-id, which blazesym is
    /// handed besides the file itself.
    pub(super) fn debug_file(&self) -> Option<&Path> {
        self.build_id_debug.as_ref().map(|(p, _)| p.as_path())
    }
}

/// (p_offset, p_filesz, p_vaddr) of each PT_LOAD.
type Loads = Vec<(u64, u64, u64)>;

static NO_INFO: FileInfo = FileInfo {
    build_id: None,
    build_id_debug: None,
    own_debug: false,
};

/// One blazesym call for all of a module's offsets. An error for the whole
/// batch (file gone, not ELF) yields no symbols, so every frame stays bare.
pub(super) fn lookup_batch<'a>(
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
pub(super) fn offset_known(sym: &Sym<'_>) -> bool {
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
pub(super) fn elf_symbols(
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

/// `path` is where the file is opened, `name` where the process had it.
pub(super) fn file_info<'a>(
    files: &'a mut HashMap<FileStamp, FileInfo>,
    debug_dirs: &[PathBuf],
    path: &Path,
    name: &str,
) -> &'a FileInfo {
    let Some(key) = procs::file_stamp(path) else {
        return &NO_INFO;
    };
    files
        .entry(key)
        .or_insert_with(|| read_file_info(path, debug_dirs, name))
}

/// The debug directories of the system tree `name` lies in, when that is
/// not ours: a process in a chroot or container maps
/// `/srv/root/usr/bin/python3` (as we see it), whose debug files are in
/// `/srv/root/usr/lib/debug`.
fn tree_debug_dirs(name: &str) -> Vec<PathBuf> {
    Path::new(name)
        .ancestors()
        .skip(1)
        .filter(|a| a.parent().is_some())
        .map(|a| a.join("usr/lib/debug"))
        .filter(|d| d.join(".build-id").is_dir())
        .take(1)
        .collect()
}

fn read_file_info(path: &Path, debug_dirs: &[PathBuf], name: &str) -> FileInfo {
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
    // Only the file's own tree holds its debug file: blazesym, following
    // the debuglink in our tree, would not find it.
    let mut in_tree = false;
    let build_id_debug = build_id.as_deref().and_then(|id| {
        let debug_file = find_build_id_file(debug_dirs, id).or_else(|| {
            in_tree = true;
            find_build_id_file(&tree_debug_dirs(name), id)
        })?;
        let loads = obj
            .segments()
            .map(|seg| {
                let (off, size) = seg.file_range();
                (off, size, seg.address())
            })
            .collect();
        Some((debug_file, loads))
    });
    let in_tree = in_tree && build_id_debug.is_some();
    FileInfo {
        build_id,
        build_id_debug,
        own_debug: has_dwarf || (has_debuglink && !in_tree),
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use object::ObjectSymbol as _;

    use super::super::testutil::*;
    use super::super::{DEFAULT_DEBUG_DIRS, Symbolizer};
    use super::*;

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
            let offset = f.function_offset.expect("an offset");
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
            assert_eq!(f.function_offset, Some(off), "{frames:?}");
        }

        // fail() is the last call in foo.cold: its return address lies
        // past the part, and is looked up one byte earlier.
        let ret = BIAS + cold + cold_size;
        let frames = s.symbolize(&[BIAS + hot, ret], &modules);
        let f = frames.iter().rfind(|f| f.address == ret).unwrap();
        assert!(matches!(name(f), "foo" | "foo.cold"), "{frames:?}");
        assert_eq!(f.function_offset, Some(cold_size), "{frames:?}");
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

    /// Like `__assert_fail_base.cold`: a local symbol only the separate
    /// debug file's .symtab has.
    #[test]
    fn libc_cold_part_is_named_from_debug_symtab() {
        let libc = libc_path();
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
        assert_eq!(f.function_offset, Some(1), "{frames:?}");
    }
}
