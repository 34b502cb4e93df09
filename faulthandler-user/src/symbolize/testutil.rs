//! Test programs and ELF probes shared by the symbolize tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SegmentFlags};

use crate::modules::Module;
use crate::procs::parse_maps_line;
use crate::report::NativeFrame as Frame;

/// A pretend load bias, so test addresses look like a PIE's.
pub const BIAS: u64 = 0x5555_0000_0000;

pub const C_SRC: &str = r#"
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

pub fn compile(dir: &Path, compiler: &str, src_name: &str, src: &str) -> PathBuf {
    compile_with(dir, compiler, src_name, src, &[])
}

pub fn compile_with(
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

pub fn elf<T>(path: &Path, f: impl FnOnce(&object::File) -> T) -> T {
    let data = std::fs::read(path).unwrap();
    f(&object::File::parse(&*data).unwrap())
}

/// The executable PT_LOAD mapped at BIAS, as the loader would for a PIE.
pub fn exec_module(path: &Path) -> Module {
    let is_x = |fl| matches!(fl, SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
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
        hold: None,
    }
}

/// (address, size) of a symbol whose name satisfies `pred`.
pub fn symbol(path: &Path, dynamic: bool, pred: impl Fn(&str) -> bool) -> (u64, u64) {
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

/// Read with `object`, independently of the code under test.
pub fn build_id(path: &Path) -> Vec<u8> {
    elf(path, |obj| obj.build_id().unwrap().unwrap().to_vec())
}

pub fn line_of(src: &str, marker: &str) -> Option<u32> {
    Some(src.lines().position(|l| l.contains(marker))? as u32 + 1)
}

pub fn name(f: &Frame) -> &str {
    f.function.as_deref().unwrap_or("")
}

/// An executable file mapping of this test process.
pub fn self_mapping(pred: impl Fn(&Module) -> bool) -> Option<Module> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(parse_maps_line)
        .map(|m| m.module(PathBuf::from(m.path), None, None))
        .find(pred)
}

/// The libc this test process runs with.
pub fn libc_path() -> PathBuf {
    let is_libc = |m: &Module| {
        m.name
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("libc.so"))
    };
    self_mapping(is_libc).unwrap().open_path
}
