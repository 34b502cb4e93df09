//! Hostile input and footguns, on the real binary as root: names and paths
//! that would forge report lines, output paths that reach kernel
//! interfaces, other users' files and planted symlinks, a bad sudo
//! environment, unprivileged runs, arguments that would kill the machine,
//! and a closed stderr.

#[path = "common/mod.rs"]
mod common;

use std::{
    os::{
        fd::FromRawFd,
        unix::fs::{MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;

const NOBODY: u32 = 65534;

/// `rfh-trace` with no sudo identity inherited from whoever runs the tests
/// (`cargo xtask test` runs them through `sudo -E`).
fn rfh() -> Command {
    let mut c = Command::new(rfh_trace());
    c.env_remove("SUDO_UID").env_remove("SUDO_GID");
    c
}

/// As [`rfh`], acting for `nobody` as if started with sudo by that user.
fn rfh_for_nobody() -> Command {
    let mut c = Command::new(rfh_trace());
    c.env("SUDO_UID", NOBODY.to_string())
        .env("SUDO_GID", NOBODY.to_string());
    c
}

/// Runs `cmd`, SIGKILLing it if it has not finished within `limit`: for
/// arguments that, if accepted, would go on to kill processes.
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rfh-trace");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "rfh-trace was still running after {limit:?} (killed): it accepted the arguments; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Asserts a refusal: status 2, one line on stderr containing `hint`.
fn assert_refused(out: &Output, hint: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains(hint), "{stderr:?} should mention {hint:?}");
}

/// A directory any user may write to (not sticky), owned by root.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("rfh-hostile-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Bytes a text report must never carry raw: C0 controls but newline,
/// DEL, C1 controls and the bidi overrides/isolates, as UTF-8.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// Needs the lead's text renderer to pass every string through
/// `escape::escape`; fails until that lands.
#[test]
fn hostile_thread_names_are_escaped_in_text_reports() {
    require_root();
    let b = build("hostile_name.c", &["-g", "-O1", "-pthread"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.txt");
    let status = rfh()
        .arg("--output")
        .arg(&out)
        .arg("--")
        .arg(&b.exe)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(signal_status(libc::SIGSEGV)));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("crash_here"), "no crash report:\n{text}");
    // The names are shown, escaped, so the test sees them at all.
    assert!(text.contains("\"x\\nFatal signal\""), "{text}");
    assert!(text.contains("\\x1b]0;pwn\\x07\\u{202e}ab"), "{text}");
    assert_eq!(raw_controls(&text), Vec::<char>::new(), "{text}");
    let headers = text
        .lines()
        .filter(|l| l.starts_with("Fatal signal"))
        .count();
    assert_eq!(headers, 1, "a forged report line:\n{text}");
}

/// Needs the lead's text renderer to escape paths; fails until that lands.
#[test]
fn crafted_binary_path_cannot_add_a_passwd_line() {
    require_root();
    let b = build("chain.c", &["-g", "-O2"]);
    // Slashes cannot be in one file name, so the line spans directories.
    let crafted = b.dir.path().join("x\nroot::0:0::/root:/bin/sh\n");
    std::fs::create_dir_all(&crafted).unwrap();
    let exe = crafted.join("crash");
    std::fs::copy(&b.exe, &exe).unwrap();
    // A root-owned file in the shape of /etc/passwd, as --output.
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let status = rfh()
        .arg("--output")
        .arg(&passwd)
        .arg("--")
        .arg(&exe)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(signal_status(libc::SIGSEGV)));
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(text.contains("level3"), "no crash report:\n{text}");
    assert!(
        text.contains("x\\nroot::0:0::/root:/bin/sh\\n/crash"),
        "{text}"
    );
    let forged: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("root::0:0:"))
        .collect();
    assert!(
        forged.is_empty(),
        "forged passwd lines {forged:?} in:\n{text}"
    );
    assert_eq!(raw_controls(&text), Vec::<char>::new(), "{text}");
}

#[test]
fn kernel_interfaces_are_refused_as_output() {
    require_root();
    let marker_dir = shared_dir();
    let marker = marker_dir.path().join("ran");
    let before = std::fs::read("/proc/sys/kernel/domainname").unwrap();
    // A sysfs attribute that exists and that root can open, if any; and
    // in any case a new name in a sysfs directory.
    let mut targets = vec![
        (
            "--output",
            PathBuf::from("/proc/sys/kernel/domainname"),
            "procfs",
        ),
        ("--output", PathBuf::from("/proc/self/fd/2"), "procfs"),
        (
            "--output",
            PathBuf::from("/sys/kernel/rfh-trace-test"),
            "sysfs",
        ),
        (
            "--flamegraph",
            PathBuf::from("/proc/sys/kernel/domainname"),
            "procfs",
        ),
    ];
    if let Some(attr) = [
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/kernel/profiling",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    {
        targets.push(("--output", attr, "sysfs"));
    } else {
        println!("no harmless sysfs attribute to try; only a new name under /sys is tried");
    }
    for (flag, path, fs) in targets {
        let out = output_within(
            rfh()
                .args(["--timeout", "30s", flag])
                .arg(&path)
                .args(["--", "touch"])
                .arg(&marker),
            Duration::from_secs(5),
        );
        assert_refused(&out, &format!("it is on {fs}"));
        assert!(!marker.exists(), "{flag} {path:?}: COMMAND ran");
    }
    assert_eq!(
        std::fs::read("/proc/sys/kernel/domainname").unwrap(),
        before
    );
    assert!(!Path::new("/sys/kernel/rfh-trace-test").exists());
}

#[test]
fn under_sudo_output_is_opened_as_the_invoking_user() {
    require_root();
    let b = build("chain.c", &["-g", "-O2"]);
    // Root-only: nobody can create files here.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    for flag in ["--output", "--flamegraph"] {
        let path = private.path().join("new.txt");
        let out = rfh_for_nobody()
            .args(["--timeout", "30s", flag])
            .arg(&path)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_refused(&out, "Permission denied");
        assert!(
            !path.exists(),
            "{flag} created a file in a root-only directory"
        );
    }
    // A root-only file in a directory nobody can write to: not appended to.
    let shared = shared_dir();
    let root_file = shared.path().join("root-only");
    std::fs::write(&root_file, "secret\n").unwrap();
    std::fs::set_permissions(&root_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = rfh_for_nobody()
        .arg("--output")
        .arg(&root_file)
        .arg("--")
        .arg(&b.exe)
        .output()
        .unwrap();
    assert_refused(&out, "Permission denied");
    assert_eq!(std::fs::read_to_string(&root_file).unwrap(), "secret\n");

    // A file it creates belongs to nobody, 0600, and holds the report.
    let report = shared.path().join("crash.txt");
    let status = rfh_for_nobody()
        .arg("--output")
        .arg(&report)
        .arg("--")
        .arg(&b.exe)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(signal_status(libc::SIGSEGV)));
    let md = std::fs::metadata(&report).unwrap();
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&report).unwrap().contains("level3"));
}

#[test]
fn under_sudo_the_flamegraph_belongs_to_the_invoking_user() {
    require_root();
    let b = build("busy.c", &["-g", "-O1"]);
    let shared = shared_dir();
    let svg = shared.path().join("cpu.svg");
    let out = rfh_for_nobody()
        .args(["--timeout", "1s", "--exit", "--output"])
        .arg(shared.path().join("dump.txt"))
        .arg("--flamegraph")
        .arg(&svg)
        .arg("--")
        .arg(&b.exe)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::metadata(&svg).unwrap();
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("spin_forever"),
        "no samples in the flame graph"
    );
    assert!(text.trim_end().ends_with("</svg>"));
}

#[test]
fn planted_symlinks_and_files_in_sticky_directories_are_refused() {
    require_root();
    let b = build("chain.c", &["-g", "-O2"]);
    let base = tempfile::tempdir().unwrap();
    let sticky = base.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let private = base.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let victim = base.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();

    let plant = |name: &str, target: &Path, owner: u32| {
        let link = sticky.join(name);
        std::os::unix::fs::symlink(target, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(owner), Some(owner)).unwrap();
        link
    };
    let run = |output: &Path| {
        rfh()
            .arg("--output")
            .arg(output)
            .arg("--")
            .arg(&b.exe)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // Another user's link as a directory on the way: not followed.
    let dir_link = plant("dir", &private, NOBODY);
    let out = run(&dir_link.join("report.txt"));
    assert_refused(
        &out,
        "owned by uid 65534 in a sticky world-writable directory",
    );
    assert!(!private.join("report.txt").exists());
    // ... nor as the file itself.
    let file_link = plant("file", &victim, NOBODY);
    assert_refused(&run(&file_link), "symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");

    // Another user's regular file there: not appended to.
    let foreign = sticky.join("foreign.txt");
    std::fs::write(&foreign, "theirs\n").unwrap();
    std::os::unix::fs::chown(&foreign, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused(&run(&foreign), "belongs to uid 65534");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "theirs\n");

    // The directory owner's own link is followed (the rule, not a ban).
    let root_link = plant("mine", &private, 0);
    let out = run(&root_link.join("ok.txt"));
    assert_eq!(
        out.status.code(),
        Some(signal_status(libc::SIGSEGV)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(private.join("ok.txt"))
            .unwrap()
            .contains("level3")
    );
}

#[test]
fn bad_sudo_environment_is_an_error_and_command_never_runs() {
    require_root();
    let dir = shared_dir();
    let marker = dir.path().join("ran");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("SUDO_UID", "65534")],
            "SUDO_UID is set but SUDO_GID is not",
        ),
        (
            &[("SUDO_GID", "65534")],
            "SUDO_GID is set but SUDO_UID is not",
        ),
        (
            &[("SUDO_UID", "nobody"), ("SUDO_GID", "65534")],
            "SUDO_UID=\"nobody\"",
        ),
        (
            &[("SUDO_UID", "65534"), ("SUDO_GID", "-1")],
            "SUDO_GID=\"-1\"",
        ),
        (
            &[("SUDO_UID", "4294967295"), ("SUDO_GID", "1")],
            "is not a user or group id",
        ),
        (
            &[("SUDO_UID", ""), ("SUDO_GID", "")],
            "is not a user or group id",
        ),
        (
            &[("SUDO_UID", "0"), ("SUDO_GID", "65534")],
            "SUDO_UID is 0 but SUDO_GID is 65534",
        ),
    ];
    for (env, hint) in cases {
        let out = rfh()
            .envs(env.iter().copied())
            .args(["--", "touch"])
            .arg(&marker)
            .output()
            .unwrap();
        assert_refused(&out, hint);
        assert!(!marker.exists(), "{env:?}: COMMAND ran");
    }
}

#[test]
fn unprivileged_run_leaves_no_output_file() {
    require_root();
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = bin_dir.path().join("rfh-trace");
    std::fs::copy(rfh_trace(), &exe).unwrap();
    let shared = shared_dir();
    let report = shared.path().join("report.txt");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .arg("--output")
        .arg(&report)
        .args(["--", "true"])
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    assert_refused(&out, "needs root");
    assert!(!report.exists(), "a refused run left {report:?} behind");
}

#[test]
fn huge_timeout_is_a_clean_error() {
    require_root();
    let dir = shared_dir();
    let marker = dir.path().join("ran");
    for d in [
        "18446744073709551615s",
        "18446744073709551615",
        "9999999999h",
        "8761h",
    ] {
        let out = output_within(
            rfh().args(["--timeout", d, "--", "touch"]).arg(&marker),
            Duration::from_secs(5),
        );
        assert_refused(&out, "too long, at most 8760h");
        assert!(!marker.exists(), "--timeout {d}: COMMAND ran");
    }
}

#[test]
fn exit_never_kills_everything_or_init() {
    require_root();
    // --timeout 30s: if these were accepted, the guard kills rfh-trace
    // long before the timer could fire.
    let out = output_within(
        rfh().args(["--all", "--timeout", "30s", "--exit"]),
        Duration::from_secs(5),
    );
    assert_refused(&out, "'--all' cannot be used with '--exit'");
    let out = output_within(
        rfh().args(["--pid", "1", "--timeout", "30s", "--exit"]),
        Duration::from_secs(5),
    );
    assert_refused(&out, "refusing --exit with --pid 1");
}

#[test]
fn missing_argument_is_named() {
    let out = rfh().arg("dump").output().unwrap();
    assert_refused(&out, "required arguments were not provided: <PID>");
    let out = rfh().arg("--timeout").output().unwrap();
    assert_refused(&out, "--timeout <DURATION>");
}

/// A pipe whose read end is already closed, as stderr of a child: every
/// write to it fails with EPIPE.
fn broken_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors owned by nothing else.
    unsafe {
        libc::close(fds[0]);
        Stdio::from(std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    }
}

/// May fail until the lead's report sinks land (a failed report write
/// must not panic); rfh-trace's own messages already go through `diag!`.
#[test]
fn closed_stderr_neither_panics_nor_loses_the_status() {
    require_root();
    let b = build("chain.c", &["-g", "-O2"]);
    let mut child = rfh()
        .arg("--")
        .arg(&b.exe)
        .stdout(Stdio::null())
        .stderr(broken_pipe())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "rfh-trace hangs with a closed stderr"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(status.code(), Some(101), "rfh-trace panicked");
    assert_eq!(status.code(), Some(signal_status(libc::SIGSEGV)));

    // The error path and help too.
    let status = rfh()
        .args(["--pid", "999999999"])
        .stderr(broken_pipe())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let status = rfh().arg("--help").stdout(broken_pipe()).status().unwrap();
    assert_eq!(status.code(), Some(0));
}
