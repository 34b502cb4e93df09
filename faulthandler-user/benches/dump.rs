//! `cargo xtask bench` (second part): `rfh-trace dump` against eu-stack and
//! gdb on a 100-thread process, and the CPU cost of `--timeout` sampling to
//! the process being watched.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Instant,
};

const ROUNDS: usize = 15;
const CPU_ROUNDS: usize = 7;

/// A fixed amount of arithmetic in a named function, then the process's own
/// user and system CPU time (getrusage(RUSAGE_SELF)) on stdout.
const WORKLOAD: &str = r#"
#include <stdio.h>
#include <sys/resource.h>
static volatile unsigned long acc;
__attribute__((noinline)) void crunch(unsigned long n) {
    for (unsigned long i = 0; i < n; i++)
        acc = acc * 6364136223846793005UL + i;
}
int main(void) {
    struct rusage ru;
    crunch(1900000000UL);
    getrusage(RUSAGE_SELF, &ru);
    printf("cpu_us %ld %ld\n", ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec,
           ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec);
    return 0;
}
"#;

fn rfh_trace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/rfh-trace")
}

fn installed(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

fn cc(src: &Path, exe: &Path, extra: &[&str]) {
    let ok = Command::new("cc")
        .args(["-g", "-O2", "-fomit-frame-pointer"])
        .args(extra)
        .arg(src)
        .arg("-o")
        .arg(exe)
        .status()
        .expect("run cc");
    assert!(ok.success(), "cc failed on {}", src.display());
}

/// One aligned result line: label, value, note.
fn row(label: &str, value: String, note: &str) {
    println!(
        "{}",
        format!("  {label:<32}{value:>10}   {note}").trim_end()
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Kills and reaps the target process however the bench ends.
struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_hundred(dir: &Path) -> Target {
    let exe = dir.join("hundred");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/programs/hundred.c");
    cc(&src, &exe, &["-pthread"]);
    let mut child = Target(
        Command::new(&exe)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start hundred"),
    );
    let out = child.0.stdout.take().expect("hundred's stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read hundred's stdout");
    assert_eq!(line.trim(), "ready", "hundred did not print ready");
    child
}

/// Runs a command to completion, capturing its output; returns it and the wall time in ms.
fn timed_output(cmd: &mut Command) -> (Output, f64) {
    let start = Instant::now();
    let out = cmd.output().expect("spawn dumper");
    (out, start.elapsed().as_secs_f64() * 1e3)
}

/// Worker threads in rfh-trace's JSON whose frames include block_here and
/// start_thread, and the number of threads in the report.
fn rfh_complete(json: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(json);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report from rfh-trace dump: {text}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("rfh-trace JSON report");
    let threads = v["threads"].as_array().expect("report has threads");
    let complete = threads
        .iter()
        .filter(|t| t["name"].as_str().is_some_and(|n| n.starts_with("worker-")))
        .filter(|t| {
            let f = t["frames"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let has = |name: &str| f.iter().any(|f| f["function"] == name);
            has("block_here") && has("start_thread")
        })
        .count();
    (complete, threads.len())
}

/// Per-thread blocks of text output (each starting with a line that begins
/// with `header`) that name both block_here and start_thread as a word.
fn text_complete(out: &[u8], header: &str) -> usize {
    let text = String::from_utf8_lossy(out);
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        if line.starts_with(header) {
            blocks.push(Vec::new());
        } else if let Some(b) = blocks.last_mut() {
            b.extend(line.split_whitespace());
        }
    }
    blocks
        .iter()
        .filter(|b| b.contains(&"block_here") && b.contains(&"start_thread"))
        .count()
}

fn dumps(dir: &Path) {
    assert!(
        installed("eu-stack"),
        "eu-stack not found: install elfutils (cargo xtask setup --with-test-tools)"
    );
    let gdb = installed("gdb");
    let target = start_hundred(dir);
    let pid = target.0.id().to_string();
    let (mut rfh, mut eu, mut gd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rfh_min, mut eu_min, mut gdb_min) = (usize::MAX, usize::MAX, usize::MAX);
    let mut rfh_threads = (usize::MAX, 0);
    for _ in 0..ROUNDS {
        let (out, ms) =
            timed_output(Command::new(rfh_trace()).args(["dump", "--format", "json", &pid]));
        assert!(out.status.success(), "rfh-trace dump: {}", out.status);
        let (complete, n) = rfh_complete(&out.stderr);
        rfh.push(ms);
        rfh_min = rfh_min.min(complete);
        rfh_threads = (rfh_threads.0.min(n), rfh_threads.1.max(n));

        let (out, ms) = timed_output(Command::new("eu-stack").args(["-p", &pid]));
        assert!(out.status.success(), "eu-stack: {}", out.status);
        eu.push(ms);
        eu_min = eu_min.min(text_complete(&out.stdout, "TID "));

        if gdb {
            let (out, ms) = timed_output(Command::new("gdb").args([
                "-p",
                &pid,
                "-batch",
                "-ex",
                "thread apply all bt",
            ]));
            assert!(out.status.success(), "gdb: {}", out.status);
            gd.push(ms);
            gdb_min = gdb_min.min(text_complete(&out.stdout, "Thread "));
        }
    }
    drop(target);
    let (r, e) = (median(&mut rfh), median(&mut eu));
    println!(
        "all-thread dump of a live 100-thread process (-O2 -fomit-frame-pointer), median of {ROUNDS} alternating rounds:"
    );
    row(
        "rfh-trace dump --format json:",
        format!("{r:.2} ms"),
        "(includes loading the BPF programs; symbolized with file:line)",
    );
    row(
        "eu-stack -p:",
        format!("{e:.2} ms"),
        "(function names only: no file:line without -i/-s)",
    );
    let g = gdb.then(|| median(&mut gd));
    match g {
        Some(g) => row(
            "gdb -batch thread apply all bt:",
            format!("{g:.2} ms"),
            "(ptrace-attaches and stops the process)",
        ),
        None => row("gdb:", "-".into(), "(not installed, skipped)"),
    }
    row(
        "rfh-trace / eu-stack:",
        format!("{:.2}x", r / e),
        "(target: rfh-trace wall time <= eu-stack's)",
    );
    if let Some(g) = g {
        row("rfh-trace / gdb:", format!("{:.2}x", r / g), "");
    }
    println!(
        "  threads in rfh-trace's report: {}..={} (expected 101)",
        rfh_threads.0, rfh_threads.1
    );
    println!("  complete worker stacks (block_here .. start_thread), worst run of {ROUNDS}:");
    println!("    rfh-trace {rfh_min}/100, eu-stack {eu_min}/100");
    if gdb {
        println!("    gdb       {gdb_min}/100");
    }
}

/// Runs a command with stdout to a file; returns the `cpu_us USER SYS` line
/// it printed (the workload's own CPU time, ms) and the command's own wait4
/// user+sys CPU time (ms, including its reaped children).
fn cpu_run(cmd: &mut Command, out_path: &Path) -> (f64, f64) {
    let out = File::create(out_path).expect("create workload output file");
    let child = cmd
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn workload");
    let mut status = 0;
    // SAFETY: rusage is plain integers; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; waits for our own child.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(
        r,
        child.id() as i32,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "workload run failed: wait status {status:#x}"
    );
    let text = std::fs::read_to_string(out_path).expect("read workload output");
    let us: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("cpu_us "))
        .unwrap_or_else(|| panic!("no cpu_us line in workload output: {text:?}"))
        .split_whitespace()
        .map(|x| x.parse().expect("cpu_us number"))
        .collect();
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ((us[0] + us[1]) / 1e3, tv(ru.ru_utime) + tv(ru.ru_stime))
}

fn sampling(dir: &Path) {
    let src = dir.join("work.c");
    std::fs::write(&src, WORKLOAD).expect("write work.c");
    let exe = dir.join("work");
    cc(&src, &exe, &[]);
    let out = dir.join("work.out");
    let (mut bare, mut traced, mut own) = (Vec::new(), Vec::new(), Vec::new());
    // Alternate so drift on the machine hits both sides alike.
    for _ in 0..CPU_ROUNDS {
        bare.push(cpu_run(&mut Command::new(&exe), &out).0);
        let mut cmd = Command::new(rfh_trace());
        let (work, total) = cpu_run(cmd.args(["--timeout", "60s", "--"]).arg(&exe), &out);
        traced.push(work);
        own.push(total - work);
    }
    let (b, t, o) = (median(&mut bare), median(&mut traced), median(&mut own));
    let spread = |v: &[f64]| format!("{:.1}..{:.1} ms", v[0], v[v.len() - 1]);
    let spread = format!("alone {}, traced {}", spread(&bare), spread(&traced));
    println!(
        "CPU cost of --timeout sampling (49 Hz) to a CPU-bound workload, median of {CPU_ROUNDS} alternating runs:"
    );
    row(
        "workload alone:",
        format!("{b:.1} ms"),
        "(its own user+sys, getrusage(RUSAGE_SELF) at exit)",
    );
    row("under rfh-trace --timeout 60s:", format!("{t:.1} ms"), "");
    row(
        "overhead:",
        format!("{:.2} %", (t - b) / b * 100.0),
        "(target <= 1%)",
    );
    println!("  run-to-run range: {spread}");
    row(
        "rfh-trace's own CPU time:",
        format!("{o:.1} ms"),
        "(wait4 of rfh-trace minus the workload's)",
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench probes harness=false targets with --list
    }
    assert!(rfh_trace().exists(), "build first: cargo build --release");
    let dir = tempfile::tempdir().expect("create temp dir");
    dumps(dir.path());
    println!();
    sampling(dir.path());
}
