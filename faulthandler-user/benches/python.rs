//! `cargo xtask bench` (third part): `rfh-trace dump` of a live Python
//! process (three threads, one 200 calls deep) against `py-spy dump
//! --native` on the same process, alternated, medians.
//!
//! The interpreter: `$RFH_BENCH_PYTHON`, else the newest pyenv 3.12 or
//! 3.11, else /usr/bin/python3.11. py-spy comes from the venv `cargo xtask
//! setup --with-test-tools` makes.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Instant,
};

const ROUNDS: usize = 15;

const SCRIPT: &str = r#"import sys, threading, time
ev = threading.Event()

def rec(n):
    if n == 1:
        ev.wait()
    else:
        rec(n - 1)

def waiter():
    ev.wait()

threading.Thread(target=rec, args=(200,), daemon=True).start()
threading.Thread(target=waiter, daemon=True).start()
time.sleep(0.3)
print("ready", flush=True)
sys.stdin.read(1)
"#;

fn rfh_trace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/rfh-trace")
}

fn installed(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The interpreter to bench with (see the module comment).
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RFH_BENCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let versions = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .map(|p| p.join("versions"));
    for minor in ["3.12", "3.11"] {
        let mut found: Vec<PathBuf> = versions
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{minor}."))
            })
            .map(|e| e.path().join(format!("bin/python{minor}")))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    let system = PathBuf::from("/usr/bin/python3.11");
    system.exists().then_some(system)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn row(label: &str, value: String, note: &str) {
    println!(
        "{}",
        format!("  {label:<34}{value:>10}   {note}").trim_end()
    );
}

/// The Python process; killed and reaped however the bench ends.
struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"x");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(python: &Path, script: &Path) -> Target {
    let mut child = Target(
        Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Python target"),
    );
    let out = child.0.stdout.take().expect("the target's stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read the target's stdout");
    assert_eq!(line.trim(), "ready", "the target did not print ready");
    child
}

fn timed(cmd: &mut Command) -> (Output, f64) {
    let start = Instant::now();
    let out = cmd.output().expect("spawn the dumper");
    (out, start.elapsed().as_secs_f64() * 1e3)
}

/// Python frames named `rec` in the deepest thread of rfh-trace's JSON
/// report, and whether every eval-loop frame was replaced.
fn rfh_depth(stdout: &[u8]) -> (usize, bool) {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report from rfh-trace dump: {text}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("rfh-trace JSON report");
    let threads = v["threads"].as_array().expect("report has threads");
    let mut deepest = 0;
    let mut merged = true;
    for t in threads {
        let frames = t["frames"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let recs = frames
            .iter()
            .filter(|f| f["language"] == "python" && f["function"] == "rec")
            .count();
        deepest = deepest.max(recs);
        merged &= !frames.iter().any(|f| {
            f["language"] == "native"
                && f["function"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("_PyEval_EvalFrameDefault"))
        });
    }
    (deepest, merged)
}

/// `rec` frames in py-spy's text dump (`    rec (dump.py:8)`).
fn pyspy_depth(stdout: &[u8]) -> usize {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("rec ("))
        .count()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench probes harness=false targets with --list
    }
    assert!(rfh_trace().exists(), "build first: cargo build --release");
    assert!(
        installed("py-spy"),
        "py-spy not found: cargo xtask setup --with-test-tools installs it"
    );
    let Some(python) = python() else {
        panic!("no CPython 3.11/3.12 found: set RFH_BENCH_PYTHON");
    };
    let dir = tempfile::tempdir().expect("create temp dir");
    let script = dir.path().join("dump.py");
    std::fs::write(&script, SCRIPT).expect("write the script");
    let target = start(&python, &script);
    let pid = target.0.id().to_string();
    let (mut rfh, mut spy) = (Vec::new(), Vec::new());
    let (mut rfh_min, mut spy_min, mut all_merged) = (usize::MAX, usize::MAX, true);
    for _ in 0..ROUNDS {
        let (out, ms) = timed(Command::new(rfh_trace()).args(["dump", "--format", "json", &pid]));
        assert!(out.status.success(), "rfh-trace dump: {}", out.status);
        let (depth, merged) = rfh_depth(&out.stdout);
        rfh.push(ms);
        rfh_min = rfh_min.min(depth);
        all_merged &= merged;

        let (out, ms) = timed(Command::new("py-spy").args(["dump", "--native", "--pid", &pid]));
        assert!(
            out.status.success(),
            "py-spy dump: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        spy.push(ms);
        spy_min = spy_min.min(pyspy_depth(&out.stdout));
    }
    drop(target);
    let (r, s) = (median(&mut rfh), median(&mut spy));
    println!(
        "dump of a live Python process ({}; 3 threads, one 200 calls deep), median of {ROUNDS} alternating rounds:",
        python.display()
    );
    row(
        "rfh-trace dump --format json:",
        format!("{r:.2} ms"),
        "(loads the BPF programs; merged native + Python, file:line; never stops the target)",
    );
    row(
        "py-spy dump --native:",
        format!("{s:.2} ms"),
        "(pauses the target while it reads)",
    );
    row(
        "rfh-trace / py-spy:",
        format!("{:.2}x", r / s),
        "(target: <= 1)",
    );
    println!(
        "  deepest thread's `rec` frames, worst run: rfh-trace {rfh_min}/200, py-spy {spy_min}/200; \
         every eval-loop frame merged: {all_merged}"
    );
}
