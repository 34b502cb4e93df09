//! Unwinds of real captures: programs compiled here dump their own
//! registers, maps and stack, no root needed.

use super::*;
use crate::procs::parse_maps_line;
use object::{Object as _, ObjectSymbol as _, SymbolKind};
use std::path::{Path, PathBuf};
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
    let module = |l| parse_maps_line(l).map(|m| m.module(m.path.into(), None));
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
        let addrs = u.addrs();
        let names = addrs.iter().enumerate().map(name);
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
    let parses = unwinder.cache.parses;
    assert!(parses >= 2, "exe and libc at least");
    assert_eq!(unwinder.unwind(&c.regs, &stack, &c.modules, 64), u);
    assert_eq!(unwinder.cache.parses, parses, "second unwind re-parsed");
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
    assert_eq!(u.addrs(), [c.regs.ip], "{u:?}");
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
