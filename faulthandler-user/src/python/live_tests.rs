//! Discovery and walk against every interpreter found on this machine,
//! running a script that blocks at known depths, read live with `ProcMem`.
//!
//! Interpreters: pyenv's (`$PYENV_ROOT` or ~/.pyenv, 3.8+), the system's
//! `/usr/bin/python3.N`, and Debian sid's 3.13–3.15 in the chroot that
//! `cargo xtask setup --with-test-tools` makes (`RFH_TRACE_PYROOT` or
//! /var/cache/rfh-trace/pyroot-sid; running them needs root for chroot).
//! Each missing one is skipped with a printed reason.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::PyError;
use super::discover::{MappedElf, PyTarget, discover};
use super::mem::ProcMem;
use super::walk::{PyThread, walk};
use crate::procs::Tracker;

// The interpreters found here are the integration tests' too: one
// definition, included in both.
#[path = "../../../tests/common/python.rs"]
mod interps;
pub(crate) use interps::{Interp, interpreters};

impl Interp {
    fn command(&self) -> Command {
        match &self.root {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        }
    }

    /// The interpreter running `script` (a host path; copied into the
    /// chroot's /tmp for a chroot interpreter). `None` (with a printed
    /// reason) when it cannot be set up.
    pub(crate) fn command_with_file(&self, script: &str) -> Option<Command> {
        let target_path = self.place(Path::new(script))?;
        let mut c = self.command();
        c.arg(target_path);
        Some(c)
    }

    /// Where `script` is seen by the target, copying it into the chroot.
    pub(crate) fn place(&self, script: &Path) -> Option<String> {
        let Some(root) = &self.root else {
            return Some(script.to_string_lossy().into_owned());
        };
        let name = script.file_name()?.to_string_lossy().into_owned();
        let inside = format!("/tmp/rfh-trace-test-{}-{name}", std::process::id());
        if let Err(e) = std::fs::copy(script, root.join(inside.trim_start_matches('/'))) {
            println!(
                "skip {}: cannot copy {} into the chroot: {e}",
                self.label,
                script.display()
            );
            return None;
        }
        Some(inside)
    }
}

/// Removes the copies of `script` that `Interp::place` put into chroots.
pub(crate) fn remove_chroot_copies(interps: &[Interp], script: &str) {
    let Some(name) = Path::new(script).file_name() else {
        return;
    };
    let copy = format!(
        "tmp/rfh-trace-test-{}-{}",
        std::process::id(),
        name.to_string_lossy()
    );
    for root in interps.iter().filter_map(|i| i.root.as_ref()) {
        let _ = std::fs::remove_file(root.join(&copy));
    }
}

/// The script every interpreter runs: three threads blocked at known
/// depths. `# L:name` marks the lines the frames must be at.
const SCRIPT: &str = r#"import faulthandler, os, signal, sys, threading

if len(sys.argv) > 1:
    dump = open(sys.argv[1], "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)

def inner(block):
    if block:
        sys.stdout.write("ready\n"); sys.stdout.flush()
        os.read(0, 1)  # L:read

class Blocker:
    def __init__(self, block):
        inner(block)  # L:init

def middle(block):
    Blocker(block)  # L:middle

def outer():
    # Warm up: 3.12+ then calls __init__ through a shim frame.
    for _ in range(100):
        middle(False)
    middle(True)  # L:outer

def rec(n, ev):
    if n == 1:
        ev.wait()  # L:wait
    else:
        rec(n - 1, ev)  # L:rec

def gén(ev):
    yield ev.wait()  # L:yield

def 函数(ev):
    for _ in gén(ev):  # L:for
        pass

ev = threading.Event()
threading.Thread(target=rec, args=(200, ev), name="deep").start()
threading.Thread(target=函数, args=(ev,), name="gen").start()
try:
    outer()  # L:module
finally:
    ev.set()
"#;

fn line_of(mark: &str) -> u32 {
    let tag = format!("# L:{mark}");
    SCRIPT
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no {tag} in the script"))
}

/// A running interpreter, killed on drop.
pub(super) struct Running {
    pub child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn start(py: &Interp, script: &str, args: &[&str]) -> Option<Running> {
    let mut cmd = py.command_with_file(script)?;
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: cannot start: {e}", py.label));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "{}: script did not start", py.label);
    Some(Running { child })
}

/// The interpreter's pid: for a chroot interpreter our child is `chroot`,
/// which execs the interpreter in place (same pid).
pub(super) fn target_of(pid: u32) -> Result<PyTarget, PyError> {
    let mut tracker = Tracker::default();
    // Right after spawn the child may still be inside execve, its new
    // mappings not there yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = tracker.refresh(pid) {
        assert!(Instant::now() < deadline, "read /proc of {pid}: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = tracker.get(pid).expect("tracked");
    discover(info.modules.iter().map(MappedElf::from))
}

/// Writes the script as `dir/name` (tests running at once each use their
/// own name: their chroot copies must not collide).
pub(super) fn script_file(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, SCRIPT).unwrap();
    path.to_string_lossy().into_owned()
}

/// Reads the threads until the three are where the script blocks them
/// (they get there on their own time), at most 10 s; then once more a bit
/// later, when they are surely asleep.
pub(super) fn settled(pid: u32, target: &PyTarget) -> Vec<PyThread> {
    let mem = ProcMem::new(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = walk(&mem, target).expect("walk");
        assert!(w.error.is_none(), "{w:?}");
        let threads = w.threads;
        let at = |name: &str, line: u32| {
            threads.iter().any(|t| {
                t.frames
                    .iter()
                    .any(|f| f.function == name && f.line == Some(line))
            })
        };
        let main_blocked = threads.iter().any(|t| {
            t.frames
                .first()
                .is_some_and(|f| f.function == "inner" && f.line == Some(line_of("read")))
        });
        let ready = main_blocked && at("rec", line_of("wait")) && at("gén", line_of("yield"));
        if ready || Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(200));
            return walk(&mem, target).expect("walk").threads;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn thread_with<'a>(threads: &'a [PyThread], function: &str) -> &'a PyThread {
    threads
        .iter()
        .find(|t| t.frames.iter().any(|f| f.function == function))
        .unwrap_or_else(|| panic!("no thread runs {function}: {threads:#?}"))
}

fn check(py: &Interp, pid: u32, target: &PyTarget, script: &str, threads: &[PyThread]) {
    let label = &py.label;
    assert_eq!(target.version.minor, py.minor, "{label}: version");
    assert_eq!(threads.len(), 3, "{label}: {threads:#?}");
    for t in threads {
        assert!(t.error.is_none(), "{label}: {t:#?}");
    }

    // Main thread: inner → __init__ → middle → outer → <module>.
    let main = thread_with(threads, "inner");
    let got: Vec<_> = main
        .frames
        .iter()
        .map(|f| (f.function.as_str(), f.file.as_str(), f.line))
        .collect();
    let mut want = vec![
        ("inner", script, Some(line_of("read"))),
        ("__init__", script, Some(line_of("init"))),
        ("middle", script, Some(line_of("middle"))),
        ("outer", script, Some(line_of("outer"))),
        ("<module>", script, Some(line_of("module"))),
    ];
    if py.minor >= 13 {
        // The specialized call of __init__ returns through a shim frame
        // running `_Py_InitCleanup`, a code object named "__init__" in file
        // "__init__" without lines. faulthandler, py-spy and pystack all
        // show it too.
        want.insert(2, ("__init__", "__init__", None));
    }
    assert_eq!(got, want, "{label}: main thread");
    if py.minor >= 11 {
        assert_eq!(main.native_tid, Some(pid), "{label}: main thread's tid");
        let quals: Vec<_> = main
            .frames
            .iter()
            .map(|f| f.qualified_name.as_deref())
            .collect();
        let mut want = vec!["inner", "Blocker.__init__", "middle", "outer", "<module>"];
        if py.minor >= 13 {
            want.insert(2, "__init__");
        }
        let want: Vec<_> = want.into_iter().map(Some).collect();
        assert_eq!(quals, want, "{label}");
    } else {
        assert_eq!(main.native_tid, None);
        assert!(main.frames.iter().all(|f| f.qualified_name.is_none()));
    }
    assert!(main.pthread_id.is_some_and(|p| p != 0), "{label}");
    for f in &main.frames {
        assert!(f.instr_addr.is_some(), "{label}: {f:?}");
    }

    // 200-deep recursion: all 200 frames, innermost waiting.
    let deep = thread_with(threads, "rec");
    let recs: Vec<_> = deep.frames.iter().filter(|f| f.function == "rec").collect();
    assert_eq!(recs.len(), 200, "{label}: recursion depth");
    assert_eq!(recs[0].line, Some(line_of("wait")), "{label}");
    assert!(
        recs[1..].iter().all(|f| f.line == Some(line_of("rec"))),
        "{label}"
    );
    // One code object, read once, for all of them.
    assert!(recs.iter().all(|f| f.code_addr == recs[0].code_addr));
    assert!(deep.frames.iter().any(|f| f.file.ends_with("threading.py")));

    // A generator with a latin-1 name called from a UCS-2-named function.
    let gen_thread = thread_with(threads, "gén");
    let names: Vec<_> = gen_thread
        .frames
        .iter()
        .map(|f| f.function.as_str())
        .collect();
    let g = names.iter().position(|n| *n == "gén").unwrap();
    assert_eq!(names.get(g + 1), Some(&"函数"), "{label}: {names:?}");
    assert_eq!(gen_thread.frames[g].line, Some(line_of("yield")));
    assert_eq!(gen_thread.frames[g + 1].line, Some(line_of("for")));

    // Every thread's tid is one of the process's.
    if py.minor >= 11 {
        for t in threads {
            let tid = t.native_tid.unwrap();
            assert!(
                Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
                "{label}: tid {tid}"
            );
        }
    }
    for t in threads {
        assert!(
            t.frames.last().unwrap().is_entry,
            "{label}: oldest frame is an entry"
        );
    }
    super::crosscheck_tests::check_entries_against_native(py, pid, threads);
}

#[test]
fn walks_every_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    // A non-ASCII file name: the filename string is not compact ASCII.
    let script = script_file(dir.path(), "blocked_é.py");
    let mut tested = Vec::new();
    let interps = interpreters();
    for py in &interps {
        let target_script = match py.place(Path::new(&script)) {
            Some(p) => p,
            None => continue,
        };
        let Some(run) = start(py, &script, &[]) else {
            continue;
        };
        let pid = run.child.id();
        let target = target_of(pid).unwrap_or_else(|e| panic!("{}: {e}", py.label));
        let threads = settled(pid, &target);
        // Indicative only: the machine is shared.
        let t0 = Instant::now();
        let found = target_of(pid).is_ok();
        let t1 = Instant::now();
        let frames: usize = walk(&ProcMem::new(pid), &target)
            .map(|w| w.threads.iter().map(|t| t.frames.len()).sum())
            .unwrap_or(0);
        println!(
            "{}: discover {:?} (ok: {found}), walk of {frames} frames {:?}",
            py.label,
            t1 - t0,
            t1.elapsed()
        );
        check(py, pid, &target, &target_script, &threads);
        tested.push(py.label.clone());
        let mut run = run;
        let _ = run.child.stdin.take().map(|mut s| s.write_all(b"x"));
    }
    remove_chroot_copies(&interps, &script);
    println!("walked: {tested:?}");
    assert!(!tested.is_empty(), "no interpreter found to test");
}

#[test]
fn non_python_process_is_not_python() {
    let mut child = Command::new("sleep").arg("5").spawn().unwrap();
    let r = target_of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(r, Err(PyError::NotPython)), "{r:?}");
}

#[test]
fn old_versions_are_refused() {
    // pyenv's 3.6 and 3.7 have a _PyRuntime (3.7) or none (3.6).
    let Some(versions) = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".pyenv/versions"))
        .and_then(|d| std::fs::read_dir(d).ok())
    else {
        println!("skip: no pyenv");
        return;
    };
    let mut tried = 0;
    for e in versions.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("3.7.") {
            continue;
        }
        let program = e.path().join("bin/python3.7");
        let mut child = Command::new(&program)
            .args([
                "-c",
                "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let r = target_of(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            matches!(r, Err(PyError::UnsupportedVersion { major: 3, minor: 7 })),
            "{r:?}"
        );
        tried += 1;
    }
    if tried == 0 {
        println!("skip: no pyenv 3.7");
    }
}
