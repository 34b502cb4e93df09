//! Every thread and every fatal path: all-thread reports, stack overflow,
//! OOM kills, kills from other processes, descendants, namespaces and
//! deleted binaries — on real processes.

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer"];

#[test]
fn all_threads_at_a_crash() {
    require_root();
    let b = build(
        "threads.c",
        &["-g", "-O2", "-fomit-frame-pointer", "-pthread"],
    );
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
    let r = only_report(&run);
    let threads = r["threads"].as_array().unwrap();
    assert_eq!(
        threads.len(),
        4,
        "{:#?}",
        threads.iter().map(functions).collect::<Vec<_>>()
    );
    let main = current_thread(r);
    assert_eq!(main["name"], "threads");
    assert_eq!(main["tid"], r["process"]["pid"]);
    assert_order(main, &["crash_main", "main"]);
    assert_line(main, "crash_main", &b.source, line_of(&b.source, "crash"));
    assert!(threads[1..].iter().all(|t| t["current"] == false));
    for (name, func, tag, libc_fn) in [
        (
            "waiter",
            "wait_for_condition",
            "condvar",
            "pthread_cond_wait",
        ),
        ("sleeper", "nap_forever", "sleep", "sleep"),
        ("reader", "read_the_pipe", "read", "read"),
    ] {
        let t = thread_named(r, name);
        let funcs = functions(t);
        assert!(
            funcs.iter().any(|f| f.contains(libc_fn)),
            "{name}: {funcs:?}"
        );
        // Fully unwound through libc, down to the thread's start.
        assert_order(t, &[func, "start_thread", "clone3"]);
        assert_line(t, func, &b.source, line_of(&b.source, tag));
        assert_ne!(t["tid"], r["process"]["pid"]);
    }
}

#[test]
fn thread_cap_counts_the_rest() {
    require_root();
    let b = build("threads.c", &["-g", "-O2", "-pthread"]);
    let run = trace(&["--max-threads", "2"], &[b.exe.to_str().unwrap()]);
    let r = only_report(&run);
    assert_eq!(r["threads"].as_array().unwrap().len(), 2);
    assert_eq!(r["threads_omitted"], 2);
    assert_eq!(current_thread(r)["name"], "threads");
}

/// A thousand threads: the report still comes out, with the default cap
/// of 256 threads and the rest counted.
#[test]
fn a_thousand_threads() {
    require_root();
    let b = build("thousand.c", &["-g", "-O2", "-pthread"]);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
    let r = only_report(&run);
    let threads = r["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 256);
    assert_eq!(r["threads_omitted"], 1001 - 256);
    assert_order(current_thread(r), &["crash_main", "main"]);
    for t in &threads[1..] {
        assert_order(t, &["park", "start_thread"]);
    }
    assert_eq!(r["lost_events"], 0);
}

#[test]
fn stack_overflow() {
    require_root();
    let b = build("overflow.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)));
    let r = only_report(&run);
    assert_eq!(r["signal"]["stack_overflow"], true);
    let t = current_thread(r);
    let funcs = functions(t);
    assert!(
        funcs.len() >= 10 && funcs[..10].iter().all(|f| f == "recurse"),
        "{funcs:?}"
    );
    assert_eq!(t["truncated"], true);
    let text = Command::new(rfh_trace())
        .arg("--")
        .arg(&b.exe)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(stderr.contains("Stack overflow likely"));
    // The kernel side's own account of the unreadable guard page is
    // there with RUST_LOG=debug, and only then.
    assert!(!stderr.contains("reading the user stack at"), "{stderr}");
    let debug = Command::new(rfh_trace())
        .env("RUST_LOG", "debug")
        .arg("--")
        .arg(&b.exe)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&debug.stderr);
    assert!(stderr.contains("reading the user stack at"), "{stderr}");
}

/// A memory cgroup with a small limit, and a process allocating in a
/// named function until the kernel's OOM killer ends it.
#[test]
fn oom_kill() {
    require_root();
    let b = build("oom.c", &["-g", "-O1"]);
    let (dir, procs) =
        if std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            let d = format!("/sys/fs/cgroup/memory/rfh-test-oom-{}", std::process::id());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                format!("{d}/memory.limit_in_bytes"),
                (48u64 << 20).to_string(),
            )
            .unwrap();
            let _ = std::fs::write(
                format!("{d}/memory.memsw.limit_in_bytes"),
                (48u64 << 20).to_string(),
            );
            (d.clone(), format!("{d}/cgroup.procs"))
        } else {
            let d = format!("/sys/fs/cgroup/rfh-test-oom-{}", std::process::id());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(format!("{d}/memory.max"), (48u64 << 20).to_string()).unwrap();
            let _ = std::fs::write(format!("{d}/memory.swap.max"), "0");
            (d.clone(), format!("{d}/cgroup.procs"))
        };
    let script = format!("echo $$ > {procs} && exec {}", b.exe.display());
    let run = trace(&[], &["sh", "-c", &script]);
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(run.status.code(), Some(signal_status(9)), "{}", run.stderr);
    let r = only_report(&run);
    assert_eq!(r["oom_kill"], true);
    assert_eq!(r["signal"]["name"], "SIGKILL");
    let t = current_thread(r);
    assert_order(t, &["hog_memory", "main"]);
}

fn spawn_sleeper() -> (Built, std::process::Child) {
    let b = build("sleeper.c", OMIT_FP);
    let child = Command::new(&b.exe).spawn().unwrap();
    (b, child)
}

/// Runs `rfh-trace --pid` on `target`, sends it `sig` from this process
/// once rfh-trace is attached, and returns the reports.
fn watch_and_signal(target: &mut std::process::Child, extra: &[&str], sig: i32) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let mut tracer = spawn_ready(
        Command::new(rfh_trace())
            .args(["--format", "json", "--output"])
            .arg(&out)
            .args(extra)
            .args(["--pid", &target.id().to_string()])
            .stderr(Stdio::inherit()),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(target.id() as i32, sig) };
    let _ = target.wait();
    let status = tracer.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "rfh-trace ends when its only process has gone"
    );

    read_reports(&out)
}

#[test]
fn kill_9_is_not_a_crash() {
    require_root();
    let (_b, mut child) = spawn_sleeper();
    let reports = watch_and_signal(&mut child, &[], libc::SIGKILL);
    assert!(reports.is_empty(), "{reports:#?}");
}

#[test]
fn kill_9_reported_when_asked() {
    require_root();
    let (_b, mut child) = spawn_sleeper();
    let reports = watch_and_signal(&mut child, &["--signals", "SIGKILL"], libc::SIGKILL);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let r = &reports[0];
    assert_eq!(r["signal"]["name"], "SIGKILL");
    assert_eq!(r["signal"]["code_name"], "SI_USER");
    assert_eq!(r["signal"]["sender_pid"], std::process::id());
    assert_eq!(r["oom_kill"], false);
    assert_order(current_thread(r), &["wait_to_be_killed", "main"]);
}

#[test]
fn segv_from_another_process_is_si_user() {
    require_root();
    let (_b, mut child) = spawn_sleeper();
    let reports = watch_and_signal(&mut child, &[], libc::SIGSEGV);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let r = &reports[0];
    assert_eq!(r["signal"]["name"], "SIGSEGV");
    assert_eq!(r["signal"]["code_name"], "SI_USER");
    assert_eq!(r["signal"]["sender_pid"], std::process::id());
    assert!(
        r["signal"]["address"].is_null(),
        "a sent signal has no fault address"
    );
    assert_order(current_thread(r), &["wait_to_be_killed", "main"]);
}

#[test]
fn descendants_that_fork_and_exec() {
    require_root();
    let forker = build("forker.c", OMIT_FP);
    let crasher = build("chain.c", OMIT_FP);
    let script = format!(
        "{} {}; echo done",
        forker.exe.display(),
        crasher.exe.display()
    );
    let run = trace(&[], &["sh", "-c", &script]);
    assert_eq!(run.status.code(), Some(0));
    let r = only_report(&run);
    assert_eq!(
        r["process"]["exe"],
        crasher.exe.to_str().unwrap(),
        "the report names the exec'd image"
    );
    assert_order(current_thread(r), &["level3", "level2", "level1", "main"]);

    let quiet = trace(&["--no-follow"], &["sh", "-c", &script]);
    assert!(
        quiet.reports.is_empty(),
        "--no-follow watches only the command itself"
    );
}

#[test]
fn pid_namespace() {
    require_root();
    let b = build("chain.c", OMIT_FP);
    let run = trace(
        &[],
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            b.exe.to_str().unwrap(),
        ],
    );
    // unshare passes the child's death on by killing itself with the same
    // signal (SI_USER): a report of its own. The crash is the child's.
    let ours: Vec<&Value> = run
        .reports
        .iter()
        .filter(|r| r["process"]["exe"] == b.exe.to_str().unwrap())
        .collect();
    assert_eq!(ours.len(), 1, "{:#?}", run.reports);
    let r = ours[0];
    assert_eq!(r["process"]["ns_pid"], 1, "{:#}", r["process"]);
    assert_ne!(r["process"]["pid"], 1);
    assert_eq!(current_thread(r)["ns_tid"], 1);
    assert_order(current_thread(r), &["level3", "main"]);
}

#[test]
fn mount_namespace_only_binary() {
    require_root();
    let b = build("late.c", OMIT_FP);
    let mnt = tempfile::tempdir().unwrap();
    let script = format!(
        "mount -t tmpfs rfh-test {m} && cp {exe} {m}/late && exec {m}/late",
        m = mnt.path().display(),
        exe = b.exe.display()
    );
    let run = trace(
        &[],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    );
    let r = only_report(&run);
    let t = current_thread(r);
    assert_order(t, &["crash_late", "main"]);
    assert_line(t, "crash_late", &b.source, line_of(&b.source, "late"));
    // The host sees an empty directory there: symbols came from the process's own mount namespace.
    assert!(!mnt.path().join("late").exists());
}

#[test]
fn deleted_binary() {
    require_root();
    let b = build("late.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap(), "unlink"]);
    assert!(!b.exe.exists(), "the program deleted itself");
    let t = current_thread(only_report(&run));
    assert_order(t, &["crash_late", "main"]);
    assert_line(t, "crash_late", &b.source, line_of(&b.source, "late"));
}

#[test]
fn single_thread_without_stack_error() {
    // A report still comes out when a thread's stack copy is tiny.
    require_root();
    let b = build("chain.c", OMIT_FP);
    let run = trace(&["--stack-size", "256"], &[b.exe.to_str().unwrap()]);
    let t = current_thread(only_report(&run));
    assert_eq!(functions(t)[0], "level3");
}
