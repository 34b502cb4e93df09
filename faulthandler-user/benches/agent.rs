//! `cargo xtask bench` (agent part): what a resident `rfh-trace agent`
//! costs the rest of the machine, and what it buys `rfh-trace dump`.
//!
//! - a `make -j2` build, an exec loop and a syscall loop, each alone and
//!   with the agent running, alternated, medians and ratios;
//! - the agent's CPU per 1000 execs and its resident memory;
//! - `rfh-trace dump` of a 100-thread and a 1-thread process through the
//!   warm agent, cold (loading its own programs) and `eu-stack -p`.
//!
//! Timings are noisy on a shared machine: read them as indicative.

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const ROUNDS: usize = 5;
const DUMPS: usize = 7;

fn rfh_trace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/rfh-trace")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn row(label: &str, value: String, note: &str) {
    println!("{label:<52} {value:>14}  {note}");
}

fn cc(src: &str, exe: &Path) {
    let c = exe.with_extension("c");
    std::fs::write(&c, src).unwrap();
    let ok = Command::new("cc")
        .args(["-O2", "-g", "-pthread"])
        .arg(&c)
        .arg("-o")
        .arg(exe)
        .status()
        .expect("cc");
    assert!(ok.success());
}

/// A resident agent on a scratch socket and port, ready when returned.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let notify = dir.join("notify");
        let _ = std::fs::remove_file(&notify);
        let listener = UnixDatagram::bind(&notify).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let socket = dir.join("run/agent.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(rfh_trace())
            .args(["agent", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .arg("--socket")
            .arg(&socket)
            .arg("--file")
            .arg(dir.join("reports.jsonl"))
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent");
        let mut buf = [0u8; 16];
        listener.recv(&mut buf).expect("READY=1 from the agent");
        Agent { child, socket }
    }

    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        (t(11) + t(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    fn rss_mib(&self) -> f64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/statm", self.child.id())).unwrap_or_default();
        let pages: f64 = s
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        pages * 4096.0 / (1 << 20) as f64
    }

    fn stop(mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let ok = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run workload");
    assert!(ok.success(), "workload failed: {cmd:?}");
    t.elapsed().as_secs_f64()
}

const SYSCALLS: &str = r#"
#include <unistd.h>
int main(void) { for (long i = 0; i < 20000000; i++) getppid(); return 0; }
"#;

const EXECS: usize = 2000;

/// 40 small translation units and a Makefile.
fn make_project(dir: &Path) -> PathBuf {
    let p = dir.join("proj");
    std::fs::create_dir_all(&p).unwrap();
    let mut objs = Vec::new();
    for i in 0..40 {
        let body: String = (0..60)
            .map(|j| format!("int f{i}_{j}(int x) {{ return x * {j} + {i}; }}\n"))
            .collect();
        std::fs::write(p.join(format!("u{i}.c")), body).unwrap();
        objs.push(format!("u{i}.o"));
    }
    std::fs::write(p.join("main.c"), "int main(void) { return 0; }\n").unwrap();
    let make = format!(
        "OBJS = main.o {}\nall: prog\nprog: $(OBJS)\n\tcc -o $@ $(OBJS)\n%.o: %.c\n\tcc -O2 -c $< -o $@\nclean:\n\trm -f prog *.o\n",
        objs.join(" ")
    );
    std::fs::write(p.join("Makefile"), make).unwrap();
    p
}

fn overhead(dir: &Path) {
    let syscalls = dir.join("syscalls");
    cc(SYSCALLS, &syscalls);
    let proj = make_project(dir);
    let exec_loop = format!("i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done");
    type Workload = (&'static str, Box<dyn Fn() -> f64>);
    let workloads: Vec<Workload> = vec![
        (
            "make -j2 (41 units)",
            Box::new({
                let proj = proj.clone();
                move || {
                    timed(
                        Command::new("make")
                            .arg("-s")
                            .arg("-C")
                            .arg(&proj)
                            .arg("clean"),
                    );
                    timed(Command::new("make").args(["-s", "-j2", "-C"]).arg(&proj))
                }
            }),
        ),
        (
            "exec loop (2000 x /bin/true)",
            Box::new(move || timed(Command::new("sh").arg("-c").arg(&exec_loop))),
        ),
        (
            "syscall loop (20M getppid)",
            Box::new(move || timed(&mut Command::new(&syscalls))),
        ),
    ];
    let mut cpu_per_kexec = Vec::new();
    let mut rss = Vec::new();
    for (name, run) in &workloads {
        let (mut alone, mut with) = (Vec::new(), Vec::new());
        run(); // warm the caches
        for _ in 0..ROUNDS {
            alone.push(run());
            let agent = Agent::start(dir);
            let cpu0 = agent.cpu_seconds();
            with.push(run());
            if name.starts_with("exec") {
                cpu_per_kexec.push((agent.cpu_seconds() - cpu0) / (EXECS as f64 / 1000.0));
            }
            rss.push(agent.rss_mib());
            agent.stop();
        }
        let (a, w) = (median(&mut alone), median(&mut with));
        row(
            &format!("{name}, with agent / alone"),
            format!("{:.3}x", w / a),
            &format!("median of {ROUNDS} alternated: {:.3}s vs {:.3}s", w, a),
        );
    }
    row(
        "agent CPU per 1000 execs",
        format!("{:.1} ms", median(&mut cpu_per_kexec) * 1000.0),
        "user + system, median",
    );
    row(
        "agent RSS after a workload",
        format!("{:.1} MiB", median(&mut rss)),
        &format!(
            "median (max {:.1})",
            rss.iter().copied().fold(0.0, f64::max)
        ),
    );
}

const HUNDRED: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *park(void *a) { (void)a; for (;;) pause(); return 0; }
int main(int argc, char **argv) {
    int n = argc > 1 ? 100 : 0;
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, 0, park, 0);
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
"#;

fn dumps(dir: &Path) {
    let prog = dir.join("parked");
    cc(HUNDRED, &prog);
    let agent = Agent::start(dir);
    for (label, args) in [("100-thread", vec!["100"]), ("1-thread", vec![])] {
        let mut target = Command::new(&prog)
            .args(&args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(target.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = target.id().to_string();
        let dump = |socket: &Path| {
            timed(
                Command::new(rfh_trace())
                    .args(["dump", &pid])
                    .env("RFH_TRACE_SOCKET", socket),
            )
        };
        let mut warm: Vec<f64> = (0..DUMPS).map(|_| dump(&agent.socket)).collect();
        let mut cold: Vec<f64> = (0..3).map(|_| dump(Path::new("/nonexistent"))).collect();
        let mut eu: Vec<f64> = (0..DUMPS)
            .map(|_| timed(Command::new("eu-stack").args(["-p", &pid])))
            .collect();
        let (w, c, e) = (median(&mut warm), median(&mut cold), median(&mut eu));
        row(
            &format!("dump {label}: warm agent / eu-stack -p"),
            format!("{:.2}x", w / e),
            &format!("{:.1} ms vs {:.1} ms", w * 1e3, e * 1e3),
        );
        row(
            &format!("dump {label}: cold (own programs) / eu-stack"),
            format!("{:.2}x", c / e),
            &format!("{:.1} ms; warm is {:.0}x faster", c * 1e3, c / w),
        );
        let _ = target.kill();
        let _ = target.wait();
    }
    agent.stop();
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the agent benchmark needs root");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let quick = std::env::args().any(|a| a == "--quick");
    println!("rfh-trace agent: cost to the machine and dump speed (indicative)");
    dumps(dir.path());
    if !quick {
        overhead(dir.path());
    }
}
