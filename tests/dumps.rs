//! Hangs and on-demand dumps: `--timeout` (with `--repeat`, `--exit`,
//! `--flamegraph`), `rfh-trace dump PID` and `--on-signal`, on real
//! processes that keep running.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use common::*;
use serde_json::Value;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer", "-pthread"];

fn main_thread(r: &Value) -> &Value {
    let pid = &r["process"]["pid"];
    r["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| &t["tid"] == pid)
        .expect("main thread")
}

/// Starts a test program and waits for its "ready" line.
fn start_ready(b: &Built) -> Child {
    let mut child = Command::new(&b.exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn still_running(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
        && std::fs::read_to_string(format!("/proc/{}/stat", child.id())).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('T'))
        })
}

fn dump(pid: u32) -> (std::process::Output, Vec<Value>) {
    let out = Command::new(rfh_trace())
        .args(["dump", &pid.to_string(), "--format", "json"])
        .output()
        .unwrap();
    // Dumps go to stdout, as eu-stack's and py-spy's do.
    let reports: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    reports.iter().for_each(validate);
    (out, reports)
}

#[test]
fn timeout_shows_an_abba_deadlock_and_exit_gives_124() {
    require_root();
    let b = build("deadlock.c", OMIT_FP);
    let run = trace(&["--timeout", "1s", "--exit"], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(124), "{}", run.stderr);
    let r = only_report(&run);
    assert_eq!(r["kind"], "timeout");
    assert!(r["signal"].is_null());
    for (name, func) in [("ab", "transfer_a_to_b"), ("ba", "transfer_b_to_a")] {
        let t = thread_named(r, name);
        let funcs = functions(t);
        assert!(
            funcs
                .iter()
                .any(|f| f.contains("pthread_mutex_lock") || f.contains("lll_lock")),
            "{funcs:?}"
        );
        assert_order(t, &[func, "start_thread"]);
        assert_line(t, func, &b.source, line_of(&b.source, func));
    }
    let main = main_thread(r);
    let funcs = functions(main);
    assert!(
        funcs
            .iter()
            .any(|f| f.contains("pthread_join") || f.contains("clockjoin")),
        "{funcs:?}"
    );
    assert_order(main, &["main"]);
}

#[test]
fn timeout_catches_a_busy_loop_with_a_profile_and_flamegraph() {
    require_root();
    let b = build("busy.c", OMIT_FP);
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("busy.svg");
    let run = trace(
        &[
            "--timeout",
            "1s",
            "--exit",
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
        &[b.exe.to_str().unwrap()],
    );
    assert_eq!(run.status.code(), Some(124), "{}", run.stderr);
    let r = only_report(&run);
    let t = main_thread(r);
    assert_eq!(
        functions(t)[0],
        "spin_forever",
        "a running thread is caught where it runs"
    );
    assert_order(t, &["spin_forever", "main"]);
    let p = &r["profile"];
    assert!(p["samples"].as_u64().unwrap() >= 10, "{p:#}");
    let top = p["top"][0]["frames"].as_array().unwrap();
    assert!(
        top[0].as_str().unwrap().starts_with("spin_forever"),
        "{p:#}"
    );
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("spin_forever"));
}

#[test]
fn timeout_repeat_writes_several_reports() {
    require_root();
    let b = build("sleeper.c", OMIT_FP);
    let script = format!("{} & sleep 1.3; kill $!", b.exe.display());
    let run = trace(&["--timeout", "300ms", "--repeat"], &["sh", "-c", &script]);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(run.reports.len() >= 3, "{} reports", run.reports.len());
    assert!(run.reports.iter().all(|r| r["kind"] == "timeout"));
}

#[test]
fn dump_a_hundred_blocked_threads_without_stopping_them() {
    require_root();
    let b = build("hundred.c", OMIT_FP);
    let mut child = start_ready(&b);
    let (out, reports) = dump(child.id());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r["kind"], "on_demand");
    assert_eq!(r["threads"].as_array().unwrap().len(), 101);
    for i in 0..100 {
        let t = thread_named(r, &format!("worker-{i:02}"));
        let funcs = functions(t);
        let depth = funcs.iter().filter(|f| *f == "depth_call").count();
        assert_eq!(depth, i + 1, "worker-{i:02}: {funcs:?}");
        assert_order(t, &["block_here", "depth_call", "start_thread", "clone3"]);
        assert!(t["truncated"] != true, "worker-{i:02} is complete");
    }
    assert!(
        still_running(&mut child),
        "the process keeps running, not stopped"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn dump_a_busy_process() {
    require_root();
    let b = build("busy.c", OMIT_FP);
    let mut child = Command::new(&b.exe).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (_, reports) = dump(child.id());
    let t = main_thread(&reports[0]);
    assert_eq!(functions(t)[0], "spin_forever");
    assert_line(t, "spin_forever", &b.source, line_of(&b.source, "spin"));
    assert!(still_running(&mut child));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn on_signal_reports_and_the_process_lives_on() {
    require_root();
    let b = build("reload.c", OMIT_FP);
    let mut child = start_ready(&b);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let mut tracer = spawn_ready(
        Command::new(rfh_trace())
            .args(["--format", "json", "--on-signal", "SIGUSR1", "--output"])
            .arg(&out)
            .args(["--pid", &child.id().to_string()]),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "reloaded 1");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(still_running(&mut child));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    assert_eq!(tracer.wait().unwrap().code(), Some(0));
    let reports = read_reports(&out);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let r = &reports[0];
    assert_eq!(r["kind"], "signal");
    assert_eq!(r["signal"]["name"], "SIGUSR1");
    assert_eq!(r["signal"]["sender_pid"], std::process::id());
    let t = current_thread(r);
    assert_order(t, &["wait_for_work", "main"]);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn dump_errors() {
    let out = Command::new(rfh_trace())
        .args(["dump", "999999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such process"));
    let out = Command::new(rfh_trace())
        .args(["dump", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel thread"));
}
