//! `cargo xtask bench` (third part): what rfh-trace costs work it was not
//! asked about, and work it watches that is not crashing.
//!
//! Every workload runs bare and under rfh-trace in the same invocation,
//! in pairs run back to back (which goes first alternates); the medians
//! are printed with the median of the pairs' ratios, so slow drift on the
//! machine cancels.
//! Each workload times its own loop in batches and reports its fastest
//! batch. The figures are only as quiet as the machine: on a shared or
//! small host, read them as indicative, and compare ratios within one run.
//!
//! `-- --quick` shrinks every workload to check the harness itself;
//! `-- exec make` runs only the workloads named (syscalls, exec, make,
//! faults).
//! `RFH_TRACE_BIN=/path/to/rfh-trace` measures another build (e.g. the
//! previous commit's) with the same harness.

#[path = "cost/workloads.rs"]
mod workloads;

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use workloads::Workloads;

/// Sizes of the workloads; `--quick` divides them.
struct Sizes {
    rounds: usize,
    syscalls: u64,
    execs: u64,
    make_sources: usize,
    faults: u64,
    crashes: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                syscalls: 200_000,
                execs: 100,
                make_sources: 6,
                faults: 5_000,
                crashes: 3,
            }
        } else {
            Self {
                rounds: 7,
                syscalls: 2_000_000,
                execs: 2_000,
                make_sources: 24,
                faults: 50_000,
                crashes: 9,
            }
        }
    }
}

fn rfh_trace() -> PathBuf {
    std::env::var_os("RFH_TRACE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/rfh-trace"),
        PathBuf::from,
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One aligned result line: label, value, note.
fn row(label: &str, value: String, note: &str) {
    println!(
        "{}",
        format!("  {label:<34}{value:>12}   {note}").trim_end()
    );
}

/// (bare, traced) measures of one workload, each pair run back to back.
type Pairs = Vec<(f64, f64)>;

/// Medians of the bare and traced runs, and the median of each pair's
/// ratio: pairing cancels the drift of a shared machine between rounds.
fn ratio_rows(unit: &str, traced: &[(&str, &Pairs)], target: &str) {
    let mut bare: Vec<f64> = traced
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .collect();
    row("bare:", format!("{:.1} {unit}", median(&mut bare)), "");
    for (label, pairs) in traced {
        let mut t: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        let mut r: Vec<f64> = pairs.iter().map(|p| p.1 / p.0).collect();
        row(
            &format!("{label}:"),
            format!("{:.1} {unit}", median(&mut t)),
            &format!("{:.3}x its bare run ({target})", median(&mut r)),
        );
    }
}

/// rfh-trace's own CPU time while the workload ran: less noisy than the
/// workload's slowdown on a busy machine.
fn cpu_row(label: &str, cpu_ms: &mut [f64], per: Option<(u64, &str)>) {
    let m = median(cpu_ms);
    let note = per.map_or(String::new(), |(n, what)| {
        format!("({:.1} us per {what})", m * 1e3 / n as f64)
    });
    row(label, format!("{m:.1} ms"), &note);
}

/// rfh-trace running in the background, in its own process group; when
/// dropped, the group gets SIGINT (so `-- sleep` ends too) and is waited for.
struct Tracer {
    child: Child,
    /// Peak RSS (VmHWM, KiB) seen while it ran.
    hwm: Arc<AtomicU64>,
    /// Set before the child is reaped, so its pid is never read after.
    reaped: Arc<Mutex<bool>>,
}

impl Tracer {
    /// `rfh-trace ARGS`, its stdout and stderr as `cmd` sets them.
    fn spawn(args: &[&str], cmd: impl FnOnce(&mut Command) -> &mut Command) -> Self {
        let mut c = Command::new(rfh_trace());
        c.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd(&mut c).spawn().expect("start rfh-trace");
        let (hwm, reaped) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(false)));
        let (h, r, pid) = (hwm.clone(), reaped.clone(), child.id());
        std::thread::spawn(move || {
            loop {
                {
                    let reaped = r.lock().unwrap_or_else(|e| e.into_inner());
                    if *reaped {
                        return;
                    }
                    if let Some(kib) = vm_hwm(pid) {
                        h.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { child, hwm, reaped }
    }

    /// Starts `rfh-trace ARGS` and returns once its programs are attached
    /// and it has gone idle (under --all it first reads every process).
    fn attached(args: &[&str]) -> Self {
        let t = Self::spawn(args, |c| c);
        wait_attached(t.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = t.cpu_ns();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = t.cpu_ns();
            if now.saturating_sub(last) < 1_000_000 {
                break;
            }
            last = now;
        }
        t
    }

    /// Waits for rfh-trace to exit by itself.
    fn wait(&mut self) {
        self.stop(false);
    }

    /// Reads the peak RSS a last time, signals the group if asked, and
    /// reaps rfh-trace, all under the lock the sampling thread takes.
    fn stop(&mut self, interrupt: bool) {
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if *reaped {
            return;
        }
        if let Ok(None) = self.child.try_wait() {
            if let Some(kib) = vm_hwm(self.child.id()) {
                self.hwm.fetch_max(kib, Ordering::Relaxed);
            }
            if interrupt {
                // SAFETY: plain kill(2) on the process group of our own
                // child, which is not reaped yet, so the group exists.
                unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
            }
        }
        *reaped = true;
        let _ = self.child.wait();
    }

    /// CPU time rfh-trace's live threads have used, ns.
    fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return 0;
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    fn peak_mib(&self) -> f64 {
        self.hwm.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Peak resident set size of `pid`, KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// BPF programs `pid` holds open, from its fdinfo.
fn programs_of(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("prog_id:")))
        .count()
}

/// Waits until rfh-trace has loaded its programs and the count has held
/// still for a while (attaching follows each load at once).
fn wait_attached(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let n = programs_of(pid);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if n > 0 && since.elapsed() >= Duration::from_millis(300) {
            return;
        }
        assert!(Instant::now() < deadline, "rfh-trace never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a workload to completion; returns the number it printed last
/// (its own measure of itself), or its wall time in ms if it printed none.
fn run(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let out = cmd.stderr(Stdio::null()).output().expect("run workload");
    let wall = start.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "workload failed: {:?}: {}",
        cmd,
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or(wall)
}

/// A workload's measures over the rounds, each traced run paired with a
/// bare run just before it: under `rfh-trace --all`, and while
/// `rfh-trace -- sleep` watches something else; with rfh-trace's own CPU
/// time (ms) during each traced run.
#[derive(Default)]
struct Runs {
    all: Pairs,
    all_cpu: Vec<f64>,
    cmd: Pairs,
}

/// `work` under `--all` and, when `cmd_mode`, under `-- sleep`.
fn unwatched(s: &Sizes, work: &dyn Fn() -> Command, cmd_mode: bool) -> Runs {
    let traced = |args: &[&str]| {
        let t = Tracer::attached(args);
        let before = t.cpu_ns();
        let out = run(&mut work());
        (out, t.cpu_ns().saturating_sub(before) as f64 / 1e6)
    };
    // Which of a pair runs first alternates by round: a run right after
    // another (its writeback, a traced run's teardown) is not favoured.
    let paired = |args: &[&str], round: usize| {
        if round.is_multiple_of(2) {
            let bare = run(&mut work());
            let (t, cpu) = traced(args);
            ((bare, t), cpu)
        } else {
            let (t, cpu) = traced(args);
            ((run(&mut work()), t), cpu)
        }
    };
    let mut r = Runs::default();
    for round in 0..s.rounds {
        let (pair, cpu) = paired(&["--all"], round);
        r.all.push(pair);
        r.all_cpu.push(cpu);
        if cmd_mode {
            r.cmd.push(paired(&["--", "sleep", "1000"], round).0);
        }
    }
    r
}

fn syscall_loop(w: &Workloads, s: &Sizes) {
    let n = s.syscalls.to_string();
    let r = unwatched(s, &|| w.cmd("getppid", &[&n]), true);
    println!(
        "getppid loop in a process nobody watches ({} syscalls), median of {} paired rounds:",
        s.syscalls, s.rounds
    );
    ratio_rows(
        "ns/syscall",
        &[
            ("rfh-trace --all running", &r.all),
            ("rfh-trace -- sleep running", &r.cmd),
        ],
        "target <= 1.02x",
    );
}

fn exec_loop(w: &Workloads, s: &Sizes) {
    let n = s.execs.to_string();
    let mut r = unwatched(s, &|| w.cmd("execloop", &[&n]), false);
    println!(
        "fork + exec of /bin/true ({} times), median of {} paired rounds:",
        s.execs, s.rounds
    );
    ratio_rows(
        "us/exec",
        &[("rfh-trace --all running", &r.all)],
        "target <= 1.05x",
    );
    cpu_row(
        "rfh-trace's own CPU meanwhile:",
        &mut r.all_cpu,
        Some((s.execs, "exec")),
    );
}

fn make_build(w: &Workloads, s: &Sizes) {
    let project = w.c_project(s.make_sources);
    let make = || {
        let mut c = Command::new("make");
        c.args(["-B", "-s", "-j2", "-C"]).arg(&project);
        c
    };
    run(&mut make()); // warm the page cache and the compiler
    let mut r = unwatched(s, &make, false);
    println!(
        "make -B -j2 of a generated {}-file C project, median of {} paired rounds:",
        s.make_sources, s.rounds
    );
    ratio_rows(
        "ms",
        &[("rfh-trace --all running", &r.all)],
        "no target; builds exec a lot",
    );
    cpu_row("rfh-trace's own CPU meanwhile:", &mut r.all_cpu, None);
}

/// Handled SIGSEGVs in a watched process: the process's slowdown,
/// rfh-trace's peak RSS, and how late a crash of another watched process
/// during the storm is reported.
fn handled_faults(w: &Workloads, s: &Sizes) {
    let n = s.faults.to_string();
    let segv = w.path("segv");
    let segv_arg = segv.to_string_lossy();
    let traced = || {
        let mut t = Tracer::spawn(&["--format", "json", "--", &segv_arg, &n], |c| {
            c.stdout(Stdio::piped())
        });
        let mut out = String::new();
        if let Some(o) = t.child.stdout.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut out);
        }
        t.wait();
        (out.trim().parse().unwrap_or(f64::NAN), t.peak_mib())
    };
    let (mut pairs, mut rss) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        let ((fault_ns, mib), bare) = if round.is_multiple_of(2) {
            let bare = run(&mut w.cmd("segv", &[&n]));
            (traced(), bare)
        } else {
            (traced(), run(&mut w.cmd("segv", &[&n])))
        };
        pairs.push((bare, fault_ns));
        rss.push(mib);
    }
    println!(
        "a watched process taking {} handled SIGSEGVs (handler siglongjmps), median of {} paired rounds:",
        s.faults, s.rounds
    );
    ratio_rows(
        "ns/fault",
        &[("rfh-trace -- segv", &pairs)],
        "target <= 1.10x",
    );
    rss.sort_by(f64::total_cmp);
    row(
        "rfh-trace peak RSS:",
        format!("{:.1} MiB", rss[rss.len() - 1]),
        "(VmHWM, max over rounds; target <= 64 MiB)",
    );
    crash_during_storm(w, s, &segv);
}

fn crash_during_storm(w: &Workloads, s: &Sizes, segv: &Path) {
    // Long enough to outlast the crashes even when the faults are cheap.
    let storm = (s.faults * 40).to_string();
    let script = format!(
        "{segv} {storm} >/dev/null & for i in $(seq {n}); do sleep 0.2; {crash}; done; kill $! 2>/dev/null; wait",
        segv = segv.display(),
        n = s.crashes,
        crash = w.path("crash").display(),
    );
    let mut t = Tracer::spawn(&["--format", "json", "--", "sh", "-c", &script], |c| {
        c.stderr(Stdio::piped())
    });
    let crash = w.path("crash");
    let mut lat_ms = Vec::new();
    if let Some(err) = t.child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let arrived = now_ns();
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["process"]["exe"].as_str() != crash.to_str() {
                continue;
            }
            if let Some(at) = v["time"].as_str().and_then(parse_time) {
                lat_ms.push((arrived - at) as f64 / 1e6);
            }
        }
    }
    t.wait();
    println!(
        "crash of another watched process during that storm ({} crashes, one run):",
        s.crashes
    );
    row(
        "reported:",
        format!("{} of {}", lat_ms.len(), s.crashes),
        "(every one expected)",
    );
    if !lat_ms.is_empty() {
        let max = lat_ms.iter().copied().fold(f64::MIN, f64::max);
        row(
            "report latency, median:",
            format!("{:.1} ms", median(&mut lat_ms)),
            "(report time to arrival on stderr; target <= 100 ms)",
        );
        row("report latency, worst:", format!("{max:.1} ms"), "");
    }
    row(
        "rfh-trace peak RSS:",
        format!("{:.1} MiB", t.peak_mib()),
        "(VmHWM; target <= 64 MiB)",
    );
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// A report's RFC 3339 `time` (UTC) as ns since the epoch.
fn parse_time(t: &str) -> Option<i128> {
    let (date, rest) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = rest.strip_suffix('Z')?.split_once('.')?;
    let mut h = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    let frac_ns: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) as i128) * 1_000_000_000 + frac_ns as i128)
}

type Workload = fn(&Workloads, &Sizes);

/// The workloads by name, in the order they run.
const WORKLOADS: [(&str, Workload); 4] = [
    ("syscalls", syscall_loop),
    ("exec", exec_loop),
    ("make", make_build),
    ("faults", handled_faults),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo bench probes harness=false targets with --list
    }
    assert!(rfh_trace().exists(), "build first: cargo build --release");
    let s = Sizes::new(args.iter().any(|a| a == "--quick"));
    // Names given (cargo passes --bench too): run only those workloads.
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let w = Workloads::build();
    println!("rfh-trace: {}", rfh_trace().display());
    for (name, f) in WORKLOADS {
        if only.is_empty() || only.contains(&name) {
            println!();
            f(&w, &s);
        }
    }
}
