//! Footguns and wrong answers: thread ids, signals watched two ways,
//! timeouts that kill, dumps of dying processes, rfh-trace in a container.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use serde_json::Value;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer"];

/// `thousand.c` with `threads` threads, waiting to be dumped.
fn start_threads(b: &Built, threads: &str) -> Child {
    let mut child = Command::new(&b.exe)
        .args([threads, "wait"])
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

/// A thread of the process other than its main thread.
fn some_thread(pid: u32) -> u32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&t| t != pid)
        .expect("a second thread")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_thread_id_stands_for_its_process() {
    require_root();
    let b = build("thousand.c", &["-g", "-O2", "-pthread"]);
    let mut child = start_threads(&b, "3");
    let pid = child.id();
    let tid = some_thread(pid);
    // dump TID dumps the process.
    let out = Command::new(rfh_trace())
        .args(["dump", &tid.to_string(), "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{tid} is a thread of process {pid}")),
        "{stderr}"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["process"]["pid"], pid);
    assert_eq!(r["threads"].as_array().unwrap().len(), 4);
    // --pid TID watches the process.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.jsonl");
    let mut tracer = spawn_ready(
        Command::new(rfh_trace())
            .args(["--format", "json", "--output"])
            .arg(&path)
            .args(["--pid", &tid.to_string()])
            .stderr(Stdio::null()),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSEGV) };
    let _ = child.wait();
    assert_eq!(tracer.wait().unwrap().code(), Some(0));
    let reports = read_reports(&path);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0]["process"]["pid"], pid);
    assert_eq!(reports[0]["signal"]["name"], "SIGSEGV");
}

/// A signal watched with --on-signal that kills the process is a crash,
/// whatever else watches it.
#[test]
fn on_signal_that_kills_is_a_crash() {
    require_root();
    let b = build("sleeper.c", OMIT_FP);
    for (sig, num) in [("SIGQUIT", libc::SIGQUIT), ("SIGUSR1", libc::SIGUSR1)] {
        let mut child = Command::new(&b.exe).spawn().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let mut tracer = spawn_ready(
            Command::new(rfh_trace())
                .args(["--format", "json", "--on-signal", sig, "--output"])
                .arg(&path)
                .args(["--pid", &child.id().to_string()]),
        );
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, num) };
        let _ = child.wait();
        assert_eq!(tracer.wait().unwrap().code(), Some(0));
        let reports = read_reports(&path);
        assert_eq!(reports.len(), 1, "{sig}: {reports:#?}");
        let r = &reports[0];
        assert_eq!(r["kind"], "crash", "{sig}");
        assert_eq!(r["signal"]["name"], sig);
        assert_order(current_thread(r), &["wait_to_be_killed", "main"]);
    }
}

/// `--timeout --exit -- COMMAND` kills COMMAND's whole tree, as timeout(1).
#[test]
fn timeout_exit_kills_the_whole_tree() {
    require_root();
    let b = build("sleeper.c", OMIT_FP);
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!(
        "{exe} & echo $! >> {p}; {exe} & echo $! >> {p}; wait",
        exe = b.exe.display(),
        p = pids.display()
    );
    let run = trace(&["--timeout", "1s", "--exit"], &["sh", "-c", &script]);
    assert_eq!(run.status.code(), Some(124), "{}", run.stderr);
    let timeouts = run
        .reports
        .iter()
        .filter(|r| r["kind"] == "timeout")
        .count();
    assert_eq!(
        timeouts, 3,
        "the shell and its two children: {:#?}",
        run.reports
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let children: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(children.len(), 2);
    while children.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "descendants survived: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A report's RFC 3339 time, in ns since the epoch (UTC, microseconds).
fn report_ns(r: &Value) -> u128 {
    let t = r["time"].as_str().unwrap();
    let out = Command::new("date")
        .args(["-u", "-d", t, "+%s%N"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A process that exits while it is being dumped gets a report that says
/// so, dated when the dump began (not the boot time), and exit 0.
#[test]
fn dump_of_a_process_that_exits_mid_dump() {
    require_root();
    let b = build("thousand.c", &["-g", "-O2", "-pthread"]);
    let mut partial_seen = 0;
    for attempt in 0..8 {
        let mut child = start_threads(&b, "2000");
        let pid = child.id();
        let before = unix_ns();
        let dump = Command::new(rfh_trace())
            .args(["dump", &pid.to_string(), "--format", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + 10 * attempt));
        let _ = child.kill();
        let _ = child.wait();
        let out = dump.wait_with_output().unwrap();
        let after = unix_ns();
        if out.status.code() == Some(2) {
            continue; // gone before rfh-trace even looked: "no such process"
        }
        assert_eq!(out.status.code(), Some(0), "attempt {attempt}");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        validate(&r);
        let t = report_ns(&r);
        assert!(
            before - 1_000_000 <= t && t <= after,
            "attempt {attempt}: time {} not within the dump",
            r["time"]
        );
        let threads = r["threads"].as_array().unwrap().len();
        if threads < 2001 {
            let why = r["partial"].as_str().unwrap_or_else(|| {
                panic!("attempt {attempt}: {threads} threads and no word of it")
            });
            assert!(why.contains("exited during the dump"), "{why}");
            partial_seen += 1;
        }
    }
    assert!(partial_seen > 0, "no attempt caught the process mid-dump");
}

/// rfh-trace inside a PID namespace with its own /proc (a container): the
/// pids it sees are its namespace's, for crashes and dumps alike.
#[test]
fn works_inside_a_pid_namespace() {
    require_root();
    let chain = build("chain.c", OMIT_FP);
    let sleeper = build("sleeper.c", OMIT_FP);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.jsonl");
    let script = format!(
        "{trace} --format json --output {out} -- {chain}; \
         {sleeper} & sleep 0.3; {trace} dump $! --format json --output {out}; kill $!",
        trace = rfh_trace(),
        out = path.display(),
        chain = chain.exe.display(),
        sleeper = sleeper.exe.display()
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports = read_reports(&path);
    assert_eq!(reports.len(), 2, "{stderr}\n{reports:#?}");
    let crash = &reports[0];
    assert_eq!(crash["kind"], "crash");
    assert_order(
        current_thread(crash),
        &["level3", "level2", "level1", "main"],
    );
    let dump = &reports[1];
    assert_eq!(dump["kind"], "on_demand");
    assert_eq!(dump["threads"].as_array().unwrap().len(), 1, "{dump:#}");
    assert_order(&dump["threads"][0], &["wait_to_be_killed", "main"]);
    // Pids are the namespace's: small, and the processes' own view.
    assert!(
        crash["process"]["pid"].as_u64().unwrap() < 100,
        "{}",
        crash["process"]
    );
}

/// A zombie has no stacks to show: the dump says why instead of showing
/// threads without a word.
#[test]
fn dump_of_a_zombie_says_so() {
    require_root();
    let b = build("zombie.c", OMIT_FP);
    let mut parent = Command::new(&b.exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let zombie: u32 = line.trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(zombie) {
        assert!(Instant::now() < deadline, "the child never became a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(rfh_trace())
        .args(["dump", &zombie.to_string(), "--format", "json"])
        .output()
        .unwrap();
    let _ = parent.kill();
    let _ = parent.wait();
    assert_eq!(out.status.code(), Some(0));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    validate(&r);
    let why = r["partial"].as_str().expect("a zombie's dump is partial");
    assert!(why.contains("zombie"), "{why}");
}
