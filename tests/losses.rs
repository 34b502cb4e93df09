//! Nothing lost silently: under pressure every report is either written
//! or counted, and a report says what it is missing.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer"];

/// The sum over `loss` records of the causes that each stand for one
/// whole report.
fn reports_lost(records: &[Value]) -> u64 {
    records
        .iter()
        .filter(|r| r["kind"] == "loss")
        .map(|r| {
            ["ring_full", "queue_full"]
                .iter()
                .map(|k| r["lost"][k].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

/// 1000 crashes while rfh-trace is stopped: the ring overflows, and every
/// crash is either reported or counted in a loss record.
#[test]
fn crash_storm_with_rfh_trace_stopped() {
    require_root();
    const CRASHES: u64 = 1000;
    let b = build("immediate.c", OMIT_FP);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let (go, done) = (dir.path().join("go"), dir.path().join("done"));
    // The crashes start once rfh-trace is stopped and all happen before
    // it is continued.
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.01; done; \
         for i in $(seq {CRASHES}); do {exe} 2>/dev/null; done; touch {done}",
        go = go.display(),
        done = done.display(),
        exe = b.exe.display()
    );
    let mut cmd = Command::new(rfh_trace());
    cmd.args(["--format", "json", "--output"]).arg(&out);
    let ready = ready_fd(&mut cmd);
    let tracer = cmd
        .args(["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGSTOP) };
    std::fs::write(&go, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !done.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the crash loop never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGCONT) };
    let o = tracer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let records = read_reports(&out);
    let crashes = records.iter().filter(|r| r["kind"] == "crash").count() as u64;
    let lost = reports_lost(&records);
    assert!(
        lost > 0,
        "the ring should have overflowed: {crashes} reports"
    );
    assert_eq!(
        crashes + lost,
        CRASHES,
        "{crashes} reports + {lost} counted losses; stderr: {stderr}"
    );
    // And the user is told, in one line at exit.
    assert!(stderr.contains("lost during this run:"), "{stderr}");
    assert!(stderr.contains("ring_full"), "{stderr}");
}

/// A crash of a process with 2001 threads: every thread is captured,
/// omitted by the cap or lost, and the three add up, whatever the cap.
#[test]
fn thread_counts_add_up() {
    require_root();
    let b = build("thousand.c", &["-g", "-O2", "-pthread"]);
    for cap in ["256", "1000"] {
        let run = trace(&["--max-threads", cap], &[b.exe.to_str().unwrap(), "2000"]);
        assert_eq!(run.status.code(), Some(signal_status(11)), "{}", run.stderr);
        let crashes: Vec<&Value> = run
            .reports
            .iter()
            .filter(|r| r["kind"] == "crash")
            .collect();
        assert_eq!(crashes.len(), 1, "cap {cap}: {:#?}", run.reports);
        let r = crashes[0];
        assert!(r.get("partial").is_none(), "cap {cap}: {}", r["partial"]);
        let captured = r["threads"].as_array().unwrap().len() as u64;
        let omitted = r["threads_omitted"].as_u64().unwrap();
        let lost = r["threads_lost"].as_u64().unwrap();
        assert_eq!(r["threads_total"], 2001, "cap {cap}");
        assert_eq!(
            captured + omitted + lost,
            2001,
            "cap {cap}: {captured} captured + {omitted} omitted + {lost} lost"
        );
        assert!(captured <= cap.parse().unwrap());
        assert_order(current_thread(r), &["crash_main", "main"]);
    }
}

/// A dump of 2001 threads has all of them, every time: a full ring makes
/// the iterator wait, not drop threads.
#[test]
fn dump_of_2001_threads_is_complete() {
    require_root();
    let b = build("thousand.c", &["-g", "-O2", "-pthread"]);
    let mut child = Command::new(&b.exe)
        .args(["2000", "wait"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    for run in 0..10 {
        let out = Command::new(rfh_trace())
            .args(["dump", &child.id().to_string(), "--format", "json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "run {run}");
        let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON report on stdout");
        validate(&r);
        let threads = r["threads"].as_array().unwrap();
        assert_eq!(threads.len(), 2001, "run {run}");
        assert!(r.get("partial").is_none(), "run {run}: {}", r["partial"]);
        assert_eq!(r["lost_events"], 0, "run {run}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
