//! Shared helpers for the integration tests: build real programs at test
//! time, run them under the real rfh-trace binary, and check its reports.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use serde_json::Value;

pub fn rfh_trace() -> &'static str {
    env!("CARGO_BIN_EXE_rfh-trace")
}

pub fn programs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/programs")
}

/// Integration tests load real eBPF programs: that needs root. CI runs
/// them as root, so not being root is a failure, not a skip.
pub fn require_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "integration tests need root: run `cargo xtask test` (it uses sudo)"
    );
}

pub struct Built {
    pub dir: tempfile::TempDir,
    pub exe: PathBuf,
    pub source: PathBuf,
}

/// Compiles tests/programs/`name` with the compiler its extension asks
/// for, into a fresh temp dir readable by any user.
pub fn build(name: &str, flags: &[&str]) -> Built {
    let source = programs_dir()
        .join(name)
        .canonicalize()
        .expect("test program source");
    let dir = tempfile::Builder::new()
        .prefix("rfh-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let stem = Path::new(name).file_stem().unwrap().to_str().unwrap();
    let exe = dir.path().join(stem);
    let mut cmd = match Path::new(name).extension().and_then(|e| e.to_str()) {
        Some("c") => Command::new("cc"),
        Some("cpp") => Command::new("c++"),
        Some("rs") => {
            let mut c = Command::new("rustc");
            c.args(["--edition", "2021"]);
            c
        }
        other => panic!("unknown source kind {other:?}"),
    };
    cmd.args(flags).arg(&source).arg("-o").arg(&exe);
    let out = cmd.output().expect("run compiler");
    assert!(
        out.status.success(),
        "compiling {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Built { dir, exe, source }
}

/// The 1-based line of the source that carries `MARK:<tag>`.
pub fn line_of(source: &Path, tag: &str) -> u32 {
    let text = std::fs::read_to_string(source).unwrap();
    let needle = format!("MARK:{tag}");
    let idx = text
        .lines()
        .position(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no {needle}"));
    idx as u32 + 1
}

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub reports: Vec<Value>,
}

/// Runs `rfh-trace --format json --output FILE <extra> -- <command>`.
pub fn trace(extra: &[&str], command: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("reports.jsonl");
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(rfh_trace())
        .args(["--format", "json", "--output"])
        .arg(&out_path)
        .args(extra)
        .arg("--")
        .args(command)
        .output()
        .expect("run rfh-trace");
    let reports = read_reports(&out_path);
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        reports,
    }
}

fn schema() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/report.schema.json");
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::validator_for(&schema).expect("valid schema")
    })
}

pub fn validate(report: &Value) {
    let errors: Vec<String> = schema()
        .iter_errors(report)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "report violates report.schema.json: {errors:?}\n{report:#}"
    );
}

pub fn only_report(run: &Run) -> &Value {
    assert_eq!(
        run.reports.len(),
        1,
        "expected exactly one report; stderr:\n{}\nreports: {:#?}",
        run.stderr,
        run.reports
    );
    &run.reports[0]
}

pub fn current_thread(report: &Value) -> &Value {
    let t = &report["threads"][0];
    assert_eq!(t["current"], true);
    t
}

/// A function name without its C++ parameter list, glibc's internal
/// `__GI_` alias prefix or GCC's `.cold` split suffix:
/// `app::render(app::Widget const&, int)` is `app::render`, `__GI_abort`
/// is `abort`, `main.cold` is `main`.
pub fn base_name(f: &str) -> &str {
    let f = f.strip_prefix("__GI_").unwrap_or(f);
    let f = f.strip_suffix(".cold").unwrap_or(f);
    match f.find('(') {
        Some(i) if i > 0 => &f[..i],
        _ => f,
    }
}

fn matches(func: &str, want: &str) -> bool {
    let b = base_name(func);
    b == want || b.ends_with(&format!("::{want}"))
}

/// Function names of a thread's frames, innermost first, as `base_name`.
pub fn functions(thread: &Value) -> Vec<String> {
    thread["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| base_name(f["function"].as_str().unwrap_or("??")).to_string())
        .collect()
}

/// Asserts that `want` appear in this order (not necessarily adjacent)
/// among the frames, innermost first; returns their indices.
pub fn assert_order(thread: &Value, want: &[&str]) -> Vec<usize> {
    let funcs = functions(thread);
    let mut idx = Vec::new();
    let mut from = 0;
    for w in want {
        let Some(i) = funcs[from..].iter().position(|f| matches(f, w)) else {
            panic!("frame {w:?} missing or out of order in {funcs:?} (wanted {want:?})");
        };
        idx.push(from + i);
        from += i + 1;
    }
    idx
}

/// The first frame whose function is `func`.
pub fn frame<'a>(thread: &'a Value, func: &str) -> &'a Value {
    thread["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"].as_str().is_some_and(|n| matches(n, func)))
        .unwrap_or_else(|| panic!("no frame for {func} in {:?}", functions(thread)))
}

/// Asserts the frame for `func` points at `file`:`line`.
pub fn assert_line(thread: &Value, func: &str, source: &Path, line: u32) {
    let f = frame(thread, func);
    let file = f["file"]
        .as_str()
        .unwrap_or_else(|| panic!("no file for {func}: {f}"));
    let name = source.file_name().unwrap().to_str().unwrap();
    assert!(file.ends_with(name), "{func} is in {file}, expected {name}");
    assert_eq!(f["line"], line, "{func} line: {f}");
}

pub fn signal_status(sig: i32) -> i32 {
    128 + sig
}

/// IDs of the BPF programs a process holds open, from its fdinfo (this
/// Debian bpftool cannot show owning pids). A process that is ready holds
/// them all.
pub fn prog_ids_of(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A `--ready-fd` pipe: rfh-trace writes `READY=1` to it once its probes
/// are attached and the watch is in place.
pub struct Ready {
    read: std::fs::File,
    write: std::os::fd::OwnedFd,
}

/// Adds `--ready-fd N` to `cmd` (put it before `--` and any COMMAND) and
/// returns the pipe to wait on after spawning.
pub fn ready_fd(cmd: &mut Command) -> Ready {
    use std::os::{
        fd::{AsRawFd, FromRawFd},
        unix::process::CommandExt,
    };
    let mut fds = [0i32; 2];
    // SAFETY: a valid two-int array for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let w = write.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec: the
    // write end is made inheritable in the child alone.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(w, libc::F_GETFD);
            libc::fcntl(w, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    cmd.args(["--ready-fd", &w.to_string()]);
    Ready { read, write }
}

impl Ready {
    /// Waits (up to 20 s) for rfh-trace to say it is attached.
    pub fn wait(self) {
        use std::io::Read;
        let Ready { mut read, write } = self;
        // Our copy of the write end must go, or EOF never comes if
        // rfh-trace dies before it is ready.
        drop(write);
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&read),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        assert!(n == 1, "rfh-trace never said it was ready");
        // Exactly the message: a COMMAND rfh-trace runs may hold the
        // pipe open for as long as it lives.
        let mut buf = [0u8; 8];
        let got = read.read_exact(&mut buf);
        assert!(
            got.is_ok() && &buf == b"READY=1\n",
            "rfh-trace exited before it was ready"
        );
    }
}

/// Spawns `cmd` (an rfh-trace command line without `--`) with
/// `--ready-fd` and waits until it is attached.
pub fn spawn_ready(cmd: &mut Command) -> std::process::Child {
    let ready = ready_fd(cmd);
    let child = cmd.spawn().expect("spawn rfh-trace");
    ready.wait();
    child
}

/// The thread of a report with this name.
pub fn thread_named<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no thread named {name} among {} threads",
                r["threads"].as_array().map_or(0, |a| a.len())
            )
        })
}

/// The JSON reports in a `--format json --output` file, each validated
/// against the schema; none when the file was never written.
pub fn read_reports(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let reports: Vec<Value> = text
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("report is not JSON ({e}): {l}"))
        })
        .collect();
    reports.iter().for_each(validate);
    reports
}
