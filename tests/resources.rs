//! Bounded resources: a churn of unique binaries, each deleted after it
//! crashed, leaves rfh-trace's descriptors and memory near where they were.

#[path = "common/mod.rs"]
mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// rfh-trace's descriptors: all, and those on deleted files in `dir`
/// (other deleted files are other processes' business under --all).
fn fds(pid: u32, dir: &std::path::Path) -> (usize, usize) {
    let mut total = 0;
    let mut deleted = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        total += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| {
            let t = t.to_string_lossy();
            t.starts_with(&*dir.to_string_lossy()) && t.ends_with(" (deleted)")
        }) {
            deleted += 1;
        }
    }
    (total, deleted)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn wait_reports(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text
            .lines()
            .filter(|l| l.contains("\"kind\":\"crash\""))
            .count()
            >= n
        {
            return read_reports(path);
        }
        assert!(
            Instant::now() < deadline,
            "only some of {n} reports arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn churn_of_deleted_binaries_releases_files() {
    require_root();
    const CHURN: usize = 150;
    let b = build("chain.c", &["-g", "-O2", "-fomit-frame-pointer"]);
    let late = build("late.c", &["-g", "-O2"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let mut tracer = spawn_ready(
        Command::new(rfh_trace())
            .args(["--all", "--format", "json", "--output"])
            .arg(&out)
            .stderr(Stdio::null()),
    );
    let pid = tracer.id();
    let run = |i: usize, prog: &std::path::Path| {
        let exe = dir.path().join(format!("crasher-{i}"));
        std::fs::copy(prog, &exe).unwrap();
        // Unique contents too, so no two are the same file to any cache.
        let mut bytes = std::fs::read(&exe).unwrap();
        bytes.extend_from_slice(format!("churn {i}").as_bytes());
        std::fs::write(&exe, bytes).unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let _ = Command::new(&exe).status();
        std::fs::remove_file(&exe).unwrap();
    };
    let run_one = |i: usize| run(i, &b.exe);
    // A first crash warms what every report needs (libc and its debug info).
    run_one(0);
    wait_reports(&out, 1);
    std::thread::sleep(Duration::from_millis(300));
    let (base_fds, _) = fds(pid, dir.path());
    let base_rss = rss_kib(pid);
    for i in 1..=CHURN {
        run_one(i);
    }
    wait_reports(&out, CHURN + 1);
    // Deleted files are looked for every 2 s, then the caches let go.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut now_fds, mut deleted) = fds(pid, dir.path());
    while deleted > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        (now_fds, deleted) = fds(pid, dir.path());
    }
    let now_rss = rss_kib(pid);
    // Symbols did not suffer: one more unique, deleted binary is named.
    // (It lives 100 ms: one that crashes at once, and whose file is then
    // deleted, may die before rfh-trace could open it; see
    // docs/limitations.md.)
    run(CHURN + 1, &late.exe);
    let reports = wait_reports(&out, CHURN + 2);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = tracer.wait();
    assert_eq!(deleted, 0, "descriptors still open on deleted files");
    // Under --all, other processes' new (not deleted) files may be cached
    // meanwhile: a small allowance, far below the churn's 150.
    assert!(
        now_fds <= base_fds + 32,
        "descriptors grew from {base_fds} to {now_fds}"
    );
    assert!(
        now_rss <= base_rss + 24 * 1024,
        "RSS grew from {base_rss} KiB to {now_rss} KiB"
    );
    let last = reports.iter().rev().find(|r| r["kind"] == "crash").unwrap();
    assert_order(current_thread(last), &["crash_late", "main"]);
}
