//! Bad input, privileges, output files and clean detach, on the real binary.

#[path = "common/mod.rs"]
mod common;

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// Runs rfh-trace and checks it failed the way bad input must: status 2,
/// one line on stderr that contains `hint`.
fn assert_usage_error(args: &[&str], hint: &str) {
    let out = Command::new(rfh_trace()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(hint),
        "{args:?}: {stderr:?} should mention {hint:?}"
    );
}

#[test]
fn no_such_pid() {
    assert_usage_error(&["--pid", "999999999"], "no such process");
}

#[test]
fn kernel_thread() {
    // kthreadd is pid 2 on every Linux system.
    assert_usage_error(&["--pid", "2"], "kernel thread");
}

#[test]
fn unknown_signal_name() {
    assert_usage_error(
        &["--signals", "SIGSEGV,SIGFOO", "--pid", "1"],
        "unknown signal",
    );
}

#[test]
fn bad_duration() {
    assert_usage_error(&["--timeout", "5x", "--", "true"], "invalid duration");
}

#[test]
fn unwritable_output() {
    assert_usage_error(
        &["--output", "/nonexistent-dir/x.log", "--pid", "1"],
        "--output",
    );
}

#[test]
fn nothing_to_watch() {
    assert_usage_error(&[], "--pid");
}

#[test]
fn not_root() {
    require_root();
    // Run as nobody; the binary must be reachable by that user.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("rfh-trace");
    std::fs::copy(rfh_trace(), &exe).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args(["--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sudo") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
}

#[test]
fn output_file_is_0600_and_never_a_symlink() {
    require_root();
    let b = build("chain.c", &["-g", "-O2"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("crash.log");
    let status = Command::new(rfh_trace())
        .arg("--output")
        .arg(&out)
        .arg("--")
        .arg(&b.exe)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(139));
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&out).unwrap().contains("level3"));

    let target = dir.path().join("victim");
    std::fs::write(&target, "untouched").unwrap();
    let link = dir.path().join("planted");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = Command::new(rfh_trace())
        .arg("--output")
        .arg(&link)
        .arg("--")
        .arg(&b.exe)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
}

fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn detaches_on(sig: i32) {
    require_root();
    let mut target = Command::new("sleep").arg("30").spawn().unwrap();
    let mut tracer = spawn_ready(
        Command::new(rfh_trace())
            .args(["--pid", &target.id().to_string()])
            .stderr(Stdio::piped()),
    );
    let ids = prog_ids_of(tracer.id());
    assert!(ids.len() >= 6, "{ids:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tracer.id() as i32, sig) };
    let status = tracer.wait().unwrap();
    if sig == libc::SIGINT {
        assert_eq!(status.code(), Some(0));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ids.iter().any(|&id| prog_exists(id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = ids.iter().filter(|&&id| prog_exists(id)).collect();
    assert!(
        left.is_empty(),
        "programs still loaded after signal {sig}: {left:?}"
    );
    let _ = target.kill();
    let _ = target.wait();
}

#[test]
fn ctrl_c_detaches() {
    detaches_on(libc::SIGINT);
}

#[test]
fn kill_9_detaches() {
    detaches_on(libc::SIGKILL);
}

#[test]
fn runs_command_as_the_sudo_user() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(rfh_trace())
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .args(["--", "id", "-u"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
    assert_eq!(out.status.code(), Some(0));
}
