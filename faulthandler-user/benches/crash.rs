//! `cargo xtask bench`: crash-to-report latency, whole-run wall time
//! against the bare program, and rfh-trace's peak RSS.
//!
//! Latency is measured from outside: the report's `time` is the kernel's
//! signal-delivery timestamp, and this harness stamps each report line as
//! it arrives on rfh-trace's stderr.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

const CRASHES: usize = 25;
const RUNS: usize = 15;

fn rfh_trace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/rfh-trace")
}

fn build_victim(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/programs/qsort_cb.c");
    let exe = dir.join("qsort_cb");
    let ok = Command::new("cc")
        .args(["-g", "-O2", "-fomit-frame-pointer"])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("cc");
    assert!(ok.success());
    exe
}

/// Parses the report's RFC 3339 `time` (UTC, microseconds) to ns since epoch.
fn parse_time(t: &str) -> Option<i128> {
    let (date, rest) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let rest = rest.strip_suffix('Z')?;
    let (hms, frac) = rest.split_once('.')?;
    let mut h = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    let frac_ns: i64 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) as i128) * 1_000_000_000 + frac_ns as i128)
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 0.5)
}

fn latency(victim: &Path) {
    let script = format!(
        "for i in $(seq {CRASHES}); do {} ; sleep 0.05; done; exit 0",
        victim.display()
    );
    let mut child = Command::new(rfh_trace())
        .args(["--format", "json", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rfh-trace");
    let mut lat_ms = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let arrived = now_ns();
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(t) = v["time"].as_str().and_then(parse_time) {
            lat_ms.push((arrived - t) as f64 / 1e6);
        }
    }
    let _ = child.wait();
    assert!(
        lat_ms.len() >= 20,
        "expected >= 20 reports, got {}",
        lat_ms.len()
    );
    let cold = lat_ms[0];
    let mut warm = lat_ms[1..].to_vec();
    warm.sort_by(f64::total_cmp);
    println!(
        "crash-to-report latency over {} crashes of a -fomit-frame-pointer program:",
        lat_ms.len()
    );
    println!("  cold (first report):  {cold:8.2} ms");
    println!(
        "  warm median:          {:8.2} ms   (target <= 20 ms)",
        percentile(&warm, 0.5)
    );
    println!("  warm p99:             {:8.2} ms", percentile(&warm, 0.99));
}

/// Wall time and peak RSS (KiB) of one run, via wait4's rusage.
fn timed(cmd: &mut Command) -> (Duration, i64) {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is plain integers; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; waits for our own child.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let _ = std::process::ExitStatus::from_raw(status);
    (start.elapsed(), ru.ru_maxrss)
}

fn whole_run(victim: &Path) {
    let (mut bare, mut traced, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    // Alternate so drift on the machine hits both sides alike.
    for _ in 0..RUNS {
        bare.push(timed(&mut Command::new(victim)).0.as_secs_f64() * 1e3);
        let (d, kib) = timed(Command::new(rfh_trace()).arg("--").arg(victim));
        traced.push(d.as_secs_f64() * 1e3);
        rss.push(kib as f64 / 1024.0);
    }
    let (b, t) = (median(&mut bare), median(&mut traced));
    println!("whole run, median of {RUNS} alternating runs:");
    println!("  program alone:              {b:8.2} ms");
    println!(
        "  rfh-trace -- program:       {t:8.2} ms   (target <= 300 ms; {:.1}x the bare run)",
        t / b
    );
    rss.sort_by(f64::total_cmp);
    println!(
        "  rfh-trace peak RSS:         {:8.1} MiB (max over runs; target <= 64 MiB)",
        rss[rss.len() - 1]
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench probes harness=false targets with --list
    }
    assert!(rfh_trace().exists(), "build first: cargo build --release");
    let dir = tempfile::tempdir().unwrap();
    let victim = build_victim(dir.path());
    latency(&victim);
    whole_run(&victim);
}
