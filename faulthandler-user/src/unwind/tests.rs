//! Unwinds of real captures: programs compiled here dump their own
//! registers, maps and stack, no root needed.

use super::*;
use crate::procs::parse_maps_line;
use object::{Object as _, ObjectSymbol as _, SymbolKind};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Dumps its registers, maps and top of stack from wherever it calls
/// capture(), then exits: a crash capture without root. Inside a signal
/// handler it also dumps the registers the signal interrupted.
const CAPTURE: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>
#define NOINLINE __attribute__((noinline, noclone))
int main(int argc, char **argv);
static const char *dir;
static ucontext_t *interrupted;
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
    if (interrupted) {
        greg_t *g = interrupted->uc_mcontext.gregs;
        f = out("interrupted");
        fprintf(f, "%llx %llx %llx", g[REG_RIP], g[REG_RSP], g[REG_RBP]), fclose(f);
    }
    _exit(0);
}
"#;

/// fh_c (or a qsort comparator) captures.
const PROGRAM: &str = r#"
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

/// A SIGSEGV handler captures: after a store to 0x40 ("fault"), a call
/// through a NULL function pointer ("null"), or the store with the
/// handler on a sigaltstack ("altstack") or without SA_SIGINFO ("plain",
/// as reraise.c).
const HANDLER: &str = r#"
NOINLINE int in_handler(int sig) { volatile int x = sig; capture(); return x; }
static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)si;
    interrupted = uc;
    in_handler(sig);
    interrupted = NULL;
}
static void plain_segv(int sig) {
    in_handler(sig);
    interrupted = NULL;
}
NOINLINE int faulty(volatile int *p) {
    *p = 7; /* MARK_FAULT */
    return 1;
}
static int (*volatile null_fn)(int);
NOINLINE int call_null(int x) {
    return null_fn(x) + 1; /* MARK_CALL */
}
int main(int argc, char **argv) {
    struct sigaction sa;
    dir = argv[1];
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    if (!strcmp(argv[2], "altstack")) {
        stack_t ss = { .ss_sp = malloc(1 << 16), .ss_size = 1 << 16 };
        sigaltstack(&ss, NULL);
        sa.sa_flags |= SA_ONSTACK;
    }
    if (!strcmp(argv[2], "plain")) {
        sa.sa_handler = plain_segv;
        sa.sa_flags = 0;
    }
    sigaction(SIGSEGV, &sa, NULL);
    if (!strcmp(argv[2], "null"))
        return call_null(argc) == 12345;
    return faulty((volatile int *)0x40) == 12345;
}
"#;
const OMIT_FP: &[&str] = &["-O2", "-fomit-frame-pointer", "-g"];
const KEEP_FP: &[&str] = &["-O0", "-fno-omit-frame-pointer", "-g"];
const CHAIN: [&str; 4] = ["fh_c", "fh_b", "fh_a", "main"];

struct Capture {
    dir: tempfile::TempDir,
    exe: PathBuf,
    src: PathBuf,
    regs: Regs,
    stack: Vec<u8>,
    modules: Vec<Module>,
    main: u64,
    /// The registers a signal interrupted, when captured in a handler.
    interrupted: Option<Regs>,
}

fn capture(flags: &[&str], mode: &str) -> Capture {
    capture_of(PROGRAM, flags, mode)
}

fn capture_of(program: &str, flags: &[&str], mode: &str) -> Capture {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, exe) = (dir.path().join("t.c"), dir.path().join("t"));
    std::fs::write(&src, format!("{CAPTURE}{program}")).expect("write source");
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
    let interrupted = std::fs::read_to_string(dir.path().join("interrupted")).ok();
    let interrupted = interrupted.map(|s| {
        let r: Vec<u64> = s.split(' ').filter_map(h).collect();
        Regs {
            ip: r[0],
            sp: r[1],
            bp: r[2],
        }
    });
    let module = |l| parse_maps_line(l).map(|m| m.module(m.path.into(), None, None));
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
        src,
        regs,
        stack,
        modules,
        main,
        interrupted,
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
        let name = |a: &CodeAddr| match modules::find(&self.modules, a.lookup()) {
            Some(m) if m.open_path != self.exe => m.name.rsplit('/').next().map(String::from),
            _ => {
                let svma = a.lookup().wrapping_sub(bias);
                let sym = syms.iter().find(|s| s.0 <= svma && svma < s.0 + s.1);
                sym.map(|s| s.2.clone())
            }
        };
        let names = u.frames.iter().map(name);
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

fn handler_capture(mode: &str) -> Capture {
    let c = capture_of(HANDLER, OMIT_FP, mode);
    let siginfo = mode != "plain";
    assert_eq!(c.interrupted.is_some(), siginfo, "interrupted registers");
    c
}

/// The 1-based line of the capture program's source holding `tag`.
fn line_of(c: &Capture, tag: &str) -> Option<u32> {
    let src = std::fs::read_to_string(&c.src).expect("source");
    let i = src.lines().position(|l| l.contains(tag)).expect(tag);
    u32::try_from(i + 1).ok()
}

/// The outer (not inlined) frame symbolized for each code address.
fn symbolized(c: &Capture, u: &Unwound) -> Vec<crate::report::NativeFrame> {
    let mut s = crate::symbolize::Symbolizer::new();
    let frames = s.symbolize_stacks(&[&u.frames], &c.modules);
    let outer = |f: Vec<crate::report::NativeFrame>| f.into_iter().next_back().unwrap_or_default();
    frames.into_iter().flatten().map(outer).collect()
}

const SEGV_MAPERR: i32 = 1;

#[test]
fn unwind_through_signal_handler_frame() {
    let c = handler_capture("fault");
    let u = c.unwind(&c.modules, 64, c.stack.len());
    assert_eq!(
        c.names(&u)[..4],
        ["in_handler", "on_segv", "faulty", "main"],
        "{u:?}"
    );
    let fault = c.interrupted.unwrap();
    assert_eq!(u.frames[2], CodeAddr::exact(fault.ip), "{u:?}");
    let sig = SignalFrame {
        index: 2,
        ip: fault.ip,
        sp: fault.sp,
        info: Some(SigInfo {
            signo: 11,
            code: SEGV_MAPERR,
            addr: 0x40,
        }),
        trap: u.signal_frames[0].trap,
    };
    assert_eq!(sig.trap.cr2, 0x40, "the kernel's record of the page fault");
    assert_eq!(u.signal_frames, [sig], "{u:?}");
    assert!(u.error.is_none() && !u.truncated, "{u:?}");
    // The interrupted instruction is looked up where it is, not a byte
    // before as a return address would be (that byte may be in the
    // previous function, or on the line before).
    let f = &symbolized(&c, &u)[2];
    assert_eq!(f.function.as_deref(), Some("faulty"), "{f:?}");
    assert_eq!(f.line, line_of(&c, "MARK_FAULT"), "{f:?}");
    // Cut just after the signal frame: the signal is still recorded.
    let u = c.unwind(&c.modules, 2, c.stack.len());
    assert_eq!((u.frames.len(), u.truncated), (2, true), "{u:?}");
    assert_eq!(u.signal_frames, [sig], "{u:?}");
}

#[test]
fn unwind_null_call_from_fault_registers_and_through_handler() {
    let c = handler_capture("null");
    let u = c.unwind(&c.modules, 64, c.stack.len());
    let names = c.names(&u);
    assert_eq!(names[..2], ["in_handler", "on_segv"], "{u:?}");
    assert_eq!(u.frames[2], CodeAddr::exact(0), "{u:?}");
    assert_eq!(names[3..5], ["call_null", "main"], "{u:?}");
    assert_eq!(u.signal_frames.len(), 1, "{u:?}");
    assert_eq!(u.signal_frames[0].index, 2, "{u:?}");
    // A jump to 0 faults fetching the instruction: si_addr 0.
    assert_eq!(u.signal_frames[0].info.map(|i| i.addr), Some(0), "{u:?}");

    // As the kernel captures an unhandled fault: the interrupted registers
    // and the stack from their sp, IP 0 and its caller's return address
    // at [sp].
    let regs = c.interrupted.unwrap();
    let from = usize::try_from(regs.sp - c.regs.sp).expect("same stack");
    let stack = StackCopy {
        base: regs.sp,
        bytes: &c.stack[from..],
    };
    let u = Unwinder::new().unwind(&regs, &stack, &c.modules, 64);
    assert_eq!(u.frames[0], CodeAddr::exact(0), "{u:?}");
    assert_eq!(c.names(&u)[1..3], ["call_null", "main"], "{u:?}");
    assert!(u.error.is_none() && u.signal_frames.is_empty(), "{u:?}");
    let frames = symbolized(&c, &u);
    assert_eq!(frames[0].address, 0);
    assert_eq!(frames[1].function.as_deref(), Some("call_null"));
    assert_eq!(frames[1].line, line_of(&c, "MARK_CALL"), "{:?}", frames[1]);
}

#[test]
fn unwind_stops_where_sigaltstack_left_the_stack() {
    let c = handler_capture("altstack");
    let u = c.unwind(&c.modules, 64, c.stack.len());
    assert_eq!(c.names(&u), ["in_handler", "on_segv", "faulty"], "{u:?}");
    assert_eq!(u.frames[2], CodeAddr::exact(c.interrupted.unwrap().ip));
    assert_eq!(u.error, Some(UnwindError::OtherStack), "{u:?}");
    let info = u.signal_frames[0]
        .info
        .expect("an SA_SIGINFO handler's siginfo");
    assert_eq!(info.addr, 0x40, "{u:?}");
}

#[test]
fn unwind_cache_is_bounded_and_forgets_files() {
    let c = capture(OMIT_FP, "chain");
    let stack = StackCopy {
        base: c.regs.sp,
        bytes: &c.stack,
    };
    let unwind = |u: &mut Unwinder| u.unwind(&c.regs, &stack, &c.modules, 64);
    let mut unwinder = Unwinder::new();
    let full = unwind(&mut unwinder);
    let (files, bytes) = unwinder.cache.len();
    assert!(files >= 2 && bytes > 0, "{files} files, {bytes} bytes");
    // Forgetting the executable drops it alone; the next unwind reads it again.
    let parses = unwinder.cache.parses;
    unwinder.forget_file(&c.exe);
    assert_eq!(unwinder.cache.len().0, files - 1);
    assert!(unwinder.cache.len().1 < bytes);
    assert_eq!(unwind(&mut unwinder), full);
    assert_eq!(unwinder.cache.parses, parses + 1);

    for (limits, want) in [((1, u64::MAX), 1), ((100, 1), 0)] {
        let (files, bytes) = limits;
        let mut small = Unwinder::with_limits(CacheLimits { files, bytes });
        assert_eq!(unwind(&mut small), full, "limits never change the result");
        assert_eq!(small.cache.len().0, want, "{limits:?}");
    }
}

/// A handler without SA_SIGINFO, as reraise.c installs: the kernel leaves
/// the frame's siginfo unwritten, but its saved exception still names the
/// fault.
#[test]
fn unwind_plain_handler_frame() {
    let c = handler_capture("plain");
    let u = c.unwind(&c.modules, 64, c.stack.len());
    let names = c.names(&u);
    assert_eq!(names[..2], ["in_handler", "plain_segv"], "{u:?}");
    assert_eq!(names[2..4], ["faulty", "main"], "{u:?}");
    let sig = &u.signal_frames[0];
    assert_eq!((sig.index, sig.info), (2, None), "{u:?}");
    let fault = SigInfo {
        signo: 11,
        code: SEGV_MAPERR,
        addr: 0x40,
    };
    assert_eq!(sig.fault_for(11), Some(fault), "{u:?}");
    let f = &symbolized(&c, &u)[2];
    assert_eq!(f.line, line_of(&c, "MARK_FAULT"), "{f:?}");
}
