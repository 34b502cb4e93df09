//! Python frames merged into native stacks, on every CPython found (see
//! common/python.rs): crashes read in the kernel at signal time, live
//! dumps read after the task iterator, each checked against the frames
//! and lines the scripts mark (`# MARK:tag`) and against the target's own
//! faulthandler.
//!
//! Each test runs its case on every interpreter and prints one line per
//! interpreter (`case | interpreter | ok`), then fails if any failed.
//!
//! Scripts that crash at once sleep first: rfh-trace finds the interpreter
//! in the process's mappings, read after its exec, and a crash within the
//! first milliseconds beats that (its report then says why it has no
//! Python frames).

#[path = "common/mod.rs"]
mod common;
#[path = "common/python.rs"]
mod py;

use std::{
    io::{BufRead, BufReader, Write},
    panic::AssertUnwindSafe,
    process::{Child, Command, Stdio},
};

use common::*;
use py::{Interp, Script};
use serde_json::Value;

/// Runs `f` on every interpreter, then fails if it failed on any.
fn each(case: &str, f: impl Fn(&Interp)) {
    each_where(case, |_| None, f);
}

/// `each`, skipping the interpreters `skip` gives a reason for.
fn each_where(case: &str, skip: impl Fn(&Interp) -> Option<&'static str>, f: impl Fn(&Interp)) {
    require_root();
    let mut failed = Vec::new();
    for i in py::interpreters() {
        if let Some(why) = skip(&i) {
            println!("{case} | {} | skipped: {why}", i.label);
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(&i))) {
            Ok(()) => println!("{case} | {} | ok", i.label),
            Err(_) => {
                println!("{case} | {} | FAILED", i.label);
                failed.push(i.label);
            }
        }
    }
    assert!(failed.is_empty(), "{case} failed on {failed:?}");
}

/// The Python frames of a thread: (function, file, line), innermost first.
fn python_frames(t: &Value) -> Vec<(String, String, u32)> {
    t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["language"] == "python")
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("").to_string(),
                f["file"].as_str().unwrap_or("").to_string(),
                f["line"].as_u64().unwrap_or(0) as u32,
            )
        })
        .collect()
}

/// Asserts the Python frame `func` is in `script` at the line marked `tag`.
fn assert_py_line(t: &Value, func: &str, s: &Script, tag: &str) {
    let frames = python_frames(t);
    let want = line_of(&s.host, tag);
    let found = frames.iter().any(|(f, file, line)| {
        f == func && file.ends_with(s.target.rsplit('/').next().unwrap()) && *line == want
    });
    assert!(found, "no Python frame {func} at line {want}: {frames:?}");
}

fn is_eval(f: &Value) -> bool {
    f["language"] != "python"
        && f["function"]
            .as_str()
            .is_some_and(|n| n.split('.').next() == Some("_PyEval_EvalFrameDefault"))
}

/// Merged: no eval-loop frame is left, and nothing was left unmerged.
fn assert_merged(t: &Value) {
    assert!(
        !t["frames"].as_array().unwrap().iter().any(is_eval),
        "an eval-loop frame was not replaced: {:?}",
        functions(t)
    );
    assert!(t.get("python_error").is_none(), "{}", t["python_error"]);
}

fn run(i: &Interp, extra: &[&str], s: &Script, args: &[&str]) -> Run {
    let mut a = vec![s.target.as_str()];
    a.extend_from_slice(args);
    let argv = i.argv(&a);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    trace(extra, &argv)
}

const CTYPES: &str = r#"import ctypes, time
time.sleep(0.3)

def inner():
    ctypes.string_at(0)  # MARK:inner

def middle():
    inner()  # MARK:middle

def outer():
    middle()  # MARK:outer

outer()  # MARK:module
"#;

#[test]
fn ctypes_crash_shows_python_frames_in_place_of_the_eval_loop() {
    each("ctypes crash", |i| {
        let s = i.script("crash.py", CTYPES);
        let run = run(i, &[], &s, &[]);
        assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
        let r = only_report(&run);
        assert_eq!(r["signal"]["name"], "SIGSEGV");
        let t = current_thread(r);
        let names: Vec<String> = python_frames(t).into_iter().map(|f| f.0).collect();
        assert_eq!(names, ["string_at", "inner", "middle", "outer", "<module>"]);
        for (func, tag) in [
            ("inner", "inner"),
            ("middle", "middle"),
            ("outer", "outer"),
            ("<module>", "module"),
        ] {
            assert_py_line(t, func, &s, tag);
        }
        assert_merged(t);
        // In place: native code on both sides of the Python frames.
        let frames = t["frames"].as_array().unwrap();
        let first = frames
            .iter()
            .position(|f| f["language"] == "python")
            .unwrap();
        let last = frames
            .iter()
            .rposition(|f| f["language"] == "python")
            .unwrap();
        assert!(first > 0 && last + 1 < frames.len(), "{:?}", functions(t));
        assert!(frames[last + 1]["language"] == "native");
        assert!(
            frames
                .iter()
                .any(|f| f["language"] == "python"
                    && f["address"].as_str().is_some_and(|a| a != "0x0")),
            "Python frames carry their instruction's address"
        );
    });
}

#[test]
fn with_faulthandler_one_report_with_faulthandlers_own_frames() {
    each("faulthandler enabled", |i| {
        let s = i.script("crash.py", CTYPES);
        let argv = i.argv(&["-X", "faulthandler", &s.target]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let run = trace(&["--stack", "python"], &argv);
        assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
        let r = only_report(&run);
        let t = current_thread(r);
        let ours: Vec<(String, u32, String)> = python_frames(t)
            .into_iter()
            .map(|(f, file, line)| (file, line, f))
            .collect();
        let theirs = py::faulthandler_frames(&run.stderr);
        assert!(!theirs.is_empty(), "no faulthandler output: {}", run.stderr);
        assert_eq!(ours, theirs, "--stack python shows faulthandler's frames");
        // Only Python frames in this view.
        assert!(
            t["frames"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["language"] == "python")
        );
    });
}

const QSORT: &str = r#"import ctypes, time
time.sleep(0.3)
libc = ctypes.CDLL(None)
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

def compare(a, b):
    ctypes.string_at(0)  # MARK:compare

def sorter():
    arr = (ctypes.c_int * 4)(4, 3, 2, 1)
    libc.qsort(arr, 4, 4, CMP(compare))  # MARK:sorter

sorter()  # MARK:module
"#;

#[test]
fn qsort_callback_has_python_on_both_sides_of_libc() {
    each("qsort callback", |i| {
        let s = i.script("qsort.py", QSORT);
        let run = run(i, &[], &s, &[]);
        assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
        let t = current_thread(only_report(&run));
        assert_py_line(t, "compare", &s, "compare");
        assert_py_line(t, "sorter", &s, "sorter");
        assert_merged(t);
        // Python, libc's qsort (glibc: __qsort_r), Python.
        let frames = t["frames"].as_array().unwrap();
        let at = |pred: &dyn Fn(&Value) -> bool| frames.iter().position(pred).unwrap();
        let py = |name: &'static str| {
            move |f: &Value| f["language"] == "python" && f["function"] == name
        };
        let qsort = at(&|f: &Value| {
            f["language"] == "native" && f["function"].as_str().is_some_and(|n| n.contains("qsort"))
        });
        assert!(
            at(&py("compare")) < qsort && qsort < at(&py("sorter")),
            "{:?}",
            functions(t)
        );
    });
}

const THREADS: &str = r#"import ctypes, queue, threading, time
ev = threading.Event()
q = queue.Queue()

def in_event():
    ev.wait()  # MARK:event

def in_queue():
    q.get()  # MARK:queue

def in_sleep():
    time.sleep(60)  # MARK:sleep

def crasher():
    time.sleep(0.5)
    ctypes.string_at(0)  # MARK:crash

for f in (in_event, in_queue, in_sleep):
    threading.Thread(target=f, name=f.__name__, daemon=True).start()
t = threading.Thread(target=crasher, name="crasher")
t.start()
t.join()  # MARK:join
"#;

/// The thread of a report whose Python frames include `func`.
fn thread_running<'a>(r: &'a Value, func: &str) -> &'a Value {
    r["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| python_frames(t).iter().any(|f| f.0 == func))
        .unwrap_or_else(|| panic!("no thread runs {func}"))
}

#[test]
fn crash_in_a_thread_shows_every_threads_python_stack() {
    each("thread crash", |i| {
        let s = i.script("threads.py", THREADS);
        let run = run(i, &[], &s, &[]);
        assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
        let r = only_report(&run);
        let t = current_thread(r);
        assert_py_line(t, "crasher", &s, "crash");
        assert_merged(t);
        assert_eq!(r["threads"].as_array().unwrap().len(), 5);
        for (func, tag) in [
            ("in_event", "event"),
            ("in_queue", "queue"),
            ("in_sleep", "sleep"),
            ("<module>", "join"),
        ] {
            let t = thread_running(r, func);
            assert_py_line(t, func, &s, tag);
            assert_merged(t);
        }
    });
}

const OTHER_CRASHES: &str = r#"import ctypes, os, sys, time
time.sleep(0.3)

def gén():
    if sys.argv[1] == "abort":
        os.abort()  # MARK:abort
    # strlen(NULL) through CDLL: the GIL is released around the call.
    yield ctypes.CDLL(None).strlen(None)  # MARK:nogil

def 函数():
    for _ in gén():  # MARK:for
        pass

函数()
"#;

#[test]
fn abort_gil_released_generator_and_non_ascii_names() {
    each("abort, GIL released, generator, non-ASCII", |i| {
        let s = i.script("naïve_файл.py", OTHER_CRASHES);
        for (how, sig, tag) in [("abort", 6, "abort"), ("nogil", 11, "nogil")] {
            let run = run(i, &[], &s, &[how]);
            assert_eq!(
                run.status.code(),
                Some(signal_status(sig)),
                "{}",
                run.stderr
            );
            let t = current_thread(only_report(&run));
            assert_py_line(t, "gén", &s, tag);
            assert_py_line(t, "函数", &s, "for");
            assert_merged(t);
        }
    });
}

const DUMP: &str = include_str!("programs/py_dump.py");

/// Starts `s` with stdin and stdout piped and waits for its "ready".
fn start_ready(i: &Interp, s: &Script) -> Child {
    let argv = i.argv(&[&s.target]);
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn finish(mut child: Child) {
    let _ = child.stdin.take().map(|mut s| s.write_all(b"x"));
    let _ = child.wait();
}

#[test]
fn dump_shows_three_threads_and_all_200_frames_of_a_recursion() {
    each("dump, 200 deep", |i| {
        let s = i.script("dump.py", DUMP);
        let child = start_ready(i, &s);
        // chroot(8) execs the interpreter: the same pid.
        let pid = child.id();
        let out = Command::new(rfh_trace())
            .args(["dump", &pid.to_string(), "--format", "json"])
            .output()
            .unwrap();
        finish(child);
        let reports: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        reports.iter().for_each(validate);
        assert_eq!(reports.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
        let r = &reports[0];
        assert_eq!(r["kind"], "on_demand");
        let deep = thread_running(r, "rec");
        let recs = python_frames(deep).iter().filter(|f| f.0 == "rec").count();
        assert_eq!(recs, 200, "all 200 frames of the recursion");
        assert_py_line(deep, "rec", &s, "wait");
        assert_py_line(deep, "rec", &s, "rec");
        assert_merged(deep);
        assert_py_line(thread_running(r, "waiter"), "waiter", &s, "waiter");
        let main = thread_running(r, "<module>");
        assert_py_line(main, "<module>", &s, "main");
        assert_merged(main);
    });
}

const DEADLOCK: &str = include_str!("programs/py_deadlock.py");

#[test]
fn timeout_shows_a_python_lock_deadlock() {
    each("timeout deadlock", |i| {
        let s = i.script("deadlock.py", DEADLOCK);
        let run = run(i, &["--timeout", "2s", "--exit"], &s, &[]);
        assert_eq!(run.status.code(), Some(124), "{}", run.stderr);
        // A loss record may come too: a thread's stack can be unreadable
        // as --exit kills the process under a CPU sample.
        let dumps: Vec<&Value> = run.reports.iter().filter(|r| r["kind"] != "loss").collect();
        assert_eq!(dumps.len(), 1, "{}", run.stderr);
        let r = dumps[0];
        assert_eq!(r["kind"], "timeout");
        for (func, tag) in [("ab", "ab"), ("ba", "ba"), ("<module>", "join")] {
            let t = thread_running(r, func);
            assert_py_line(t, func, &s, tag);
            assert_merged(t);
        }
    });
}

const ON_SIGNAL: &str = include_str!("programs/py_on_signal.py");

#[test]
fn on_signal_with_a_python_handler() {
    each("on-signal SIGUSR1", |i| {
        let s = i.script("onsignal.py", ON_SIGNAL);
        let child = start_ready(i, &s);
        let pid = child.id();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        let mut cmd = Command::new(rfh_trace());
        cmd.args(["--format", "json", "--on-signal", "SIGUSR1", "--pid"])
            .arg(pid.to_string())
            .arg("--output")
            .arg(&out);
        let mut tracer = spawn_ready(&mut cmd);
        // SAFETY: a plain kill of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        std::thread::sleep(std::time::Duration::from_millis(500));
        finish(child);
        let _ = tracer.wait();
        let reports = read_reports(&out);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        assert_eq!(r["kind"], "signal");
        assert_eq!(r["signal"]["name"], "SIGUSR1");
        // Delivered while it slept in wait(): the kernel's copy then.
        let t = current_thread(r);
        assert_py_line(t, "wait", &s, "sleep");
        assert_py_line(t, "<module>", &s, "module");
        assert_merged(t);
    });
}

#[test]
fn python_in_its_own_pid_and_mount_namespace() {
    let chroot_only = |i: &Interp| {
        i.root
            .is_none()
            .then_some("the case runs the interpreter only inside a chroot")
    };
    each_where("own PID+mount namespace", chroot_only, |i| {
        let s = i.script("crash.py", CTYPES);
        let mut argv = vec!["unshare", "--pid", "--fork", "--mount-proc"];
        let inner = i.argv(&[&s.target]);
        argv.extend(inner.iter().map(String::as_str));
        let run = trace(&[], &argv);
        // unshare(1) dies of its child's signal too: its own report.
        let ours: Vec<&Value> = run
            .reports
            .iter()
            .filter(|r| {
                r["process"]["comm"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("python"))
            })
            .collect();
        assert_eq!(ours.len(), 1, "{}", run.stderr);
        let r = ours[0];
        assert_eq!(r["process"]["ns_pid"], 1, "{}", r["process"]);
        let t = current_thread(r);
        assert!(t["ns_tid"].is_u64(), "{t}");
        let names: Vec<String> = python_frames(t).into_iter().map(|f| f.0).collect();
        assert_eq!(names, ["string_at", "inner", "middle", "outer", "<module>"]);
        assert_py_line(t, "inner", &s, "inner");
        assert_merged(t);
    });
}

#[test]
fn unsupported_python_keeps_its_native_stack_and_says_why_once() {
    require_root();
    let Some(i) = py::unsupported() else {
        println!("skip: no pyenv 3.7 installed to stand for an unsupported CPython");
        return;
    };
    let s = i.script("crash.py", CTYPES);
    let run = run(&i, &[], &s, &[]);
    let r = only_report(&run);
    let why = r["python_error"].as_str().unwrap_or_default();
    assert!(why.contains("3.7 is not supported"), "{r:#}");
    let t = current_thread(r);
    assert_order(t, &["string_at", "_PyEval_EvalFrameDefault", "_start"]);
    assert!(python_frames(t).is_empty());
    // Text: the one line.
    let out = Command::new(rfh_trace())
        .arg("--")
        .args(i.argv(&[&s.target]))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        text.matches("Python frames unavailable").count(),
        1,
        "{text}"
    );
}

/// Debian's python3.11 loads `_ctypes` and libffi by dlopen just before
/// the crash: with /proc never read (the knob makes every process look
/// dead before it could be), they come from the mappings the kernel
/// resolved as the thread exited, and the stack still reaches main.
#[test]
fn late_loaded_modules_come_from_the_kernels_mappings() {
    let no_chroot = |i: &Interp| {
        i.root
            .is_some()
            .then_some("the chroot's paths are gone with the process")
    };
    each_where("dlopen'ed modules, /proc unread", no_chroot, |i| {
        let s = i.script("crash.py", &CTYPES.replace("time.sleep(0.3)", ""));
        for _ in 0..3 {
            let argv = i.argv(&[&s.target]);
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("r.jsonl");
            let status = Command::new(rfh_trace())
                .env("RFH_TRACE_TEST_NO_PROC", "1")
                .args(["--format", "json", "--output"])
                .arg(&out)
                .arg("--")
                .args(&argv)
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(signal_status(11)));
            let reports = read_reports(&out);
            assert_eq!(reports.len(), 1);
            let t = current_thread(&reports[0]);
            assert!(t["error"].is_null(), "{}: {:?}", t["error"], functions(t));
            assert_order(t, &["ffi_call", "_PyEval_EvalFrameDefault", "Py_BytesMain"]);
        }
    });
}

/// Without the settling sleep, against userspace's reading of /proc: the
/// stack reaches main, or its report says where and why it stopped.
#[test]
fn an_early_crash_never_loses_its_stack_silently() {
    each("early crash", |i| {
        let s = i.script("crash.py", &CTYPES.replace("time.sleep(0.3)", ""));
        for _ in 0..3 {
            let run = run(i, &[], &s, &[]);
            let t = current_thread(only_report(&run));
            let funcs = functions(t);
            let whole = funcs.iter().any(|f| f == "Py_BytesMain");
            assert!(
                whole || !t["error"].is_null(),
                "stopped silently: {funcs:?}"
            );
            let py = python_frames(t);
            assert!(
                !py.is_empty() || t["python_error"].is_string(),
                "no Python frames and no reason: {t:#}"
            );
        }
    });
}
