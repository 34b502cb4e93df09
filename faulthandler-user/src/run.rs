//! Start-up checks, the three watch modes (`-- COMMAND`, `--pid`,
//! `--all`) with their timeout dumps, and `rfh-trace dump`.

use std::{
    io::IsTerminal,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::{
    btf,
    capture::{Capture, CaptureError, CaptureOptions},
    cli::{Cli, Cmd, Format},
    output::{self, Sink},
    pipeline::Pipeline,
    procs::Tracker,
    signals, spawn,
    watch::{STOP, WatchOptions, Watcher, stop_requested},
};

#[derive(Debug, Error)]
pub enum RunError {
    #[error(
        "rfh-trace needs root (or CAP_SYS_ADMIN, or CAP_BPF, CAP_PERFMON and CAP_CHECKPOINT_RESTORE): run it with sudo (for example `sudo rfh-trace -- ./app`)"
    )]
    NotPrivileged,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Signal(#[from] signals::SignalError),
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error(transparent)]
    Cli(#[from] crate::cli::CliError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("no such process: {0}; check the pid with `ps -p {0}`")]
    NoSuchPid(i64),
    #[error("pid {0} is a kernel thread, which has no user stack to report; pick a user process")]
    KernelThread(i64),
    #[error("the program loader thread panicked")]
    Panicked,
    #[error("nothing to watch: give `-- COMMAND`, `--pid PID` or `--all` (see --help)")]
    NothingToWatch,
    #[error("give either `-- COMMAND` or `--pid`/`--all`, not both")]
    BothModes,
    #[error("cannot start {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Root, or in CapEff CAP_SYS_ADMIN (21), or all of CAP_PERFMON (38) and
/// CAP_BPF (39) for the probes and CAP_CHECKPOINT_RESTORE (40) for
/// /proc/PID/map_files.
fn privileged() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1 << bit) != 0;
    has(21) || (has(38) && has(39) && has(40))
}

fn check_pid(pid: i64) -> Result<u32, RunError> {
    let Ok(p) = u32::try_from(pid) else {
        return Err(RunError::NoSuchPid(pid));
    };
    if p == 0 {
        return Err(RunError::NoSuchPid(pid));
    }
    let stat =
        std::fs::read_to_string(format!("/proc/{p}/stat")).map_err(|_| RunError::NoSuchPid(pid))?;
    // Field 9 (flags) after the parenthesised comm; PF_KTHREAD = 0x00200000.
    let flags: u64 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse().ok())
        .unwrap_or(0);
    if flags & 0x0020_0000 != 0 {
        return Err(RunError::KernelThread(pid));
    }
    Ok(p)
}

fn signal_mask(names: &[String]) -> Result<u64, RunError> {
    let sigs: Vec<i32> = if names.is_empty() {
        signals::DEFAULT_FATAL.to_vec()
    } else {
        names
            .iter()
            .map(|n| signals::parse(n))
            .collect::<Result<_, _>>()?
    };
    Ok(sigs.iter().fold(0u64, |m, &s| m | (1u64 << s)))
}

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Runs rfh-trace; returns the process exit status.
pub fn run(cli: Cli) -> Result<i32, RunError> {
    crate::cli::check(&cli)?;
    if let Some(Cmd::Dump { pid }) = cli.cmd {
        return dump(&cli, pid);
    }
    let has_command = !cli.command.is_empty();
    if has_command && (cli.all || !cli.pids.is_empty()) {
        return Err(RunError::BothModes);
    }
    if !has_command && !cli.all && cli.pids.is_empty() {
        return Err(RunError::NothingToWatch);
    }
    // Validate everything the user typed before touching the kernel.
    let mask = signal_mask(&cli.signals)?;
    let on_signal = cli
        .on_signal
        .iter()
        .map(|n| signals::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    let on_signal = on_signal.iter().fold(0u64, |m, &s| m | (1u64 << s));
    let pids = cli
        .pids
        .iter()
        .map(|&p| check_pid(p))
        .collect::<Result<Vec<_>, _>>()?;
    let dumps = cli.timeout.is_some() || on_signal != 0;
    let mut w = watcher(&cli, mask | on_signal, true, dumps, &pids)?;
    w.on_signal = on_signal;
    if cli.timeout.is_some() {
        w.capture.start_profiling(PROFILE_HZ)?;
        w.keep_profiles(cli.flamegraph.clone());
    }
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let mode = if has_command {
        Mode::Command(spawn::spawn(&mut w, &cli.command)?)
    } else if cli.all {
        w.tracker.refresh_all();
        Mode::All
    } else {
        for &p in &pids {
            w.capture.watch(p)?;
            // Threads and mappings as of now; exec/mmap events keep it fresh.
            let _ = w.tracker.refresh(p);
        }
        Mode::Pids(pids)
    };
    let timer = cli.timeout.map(|every| Timer {
        every,
        repeat: cli.repeat,
        exit: cli.exit,
        next: Instant::now() + every,
    });
    watch_loop(&mut w, mode, timer)
}

/// CPU sampling rate for `--timeout` profiles: low enough to cost the
/// watched process well under 1%, odd so it does not beat with timers.
const PROFILE_HZ: u64 = 49;

/// Checks, the output sink, kernel offsets and the loaded programs.
/// `warm`: processes whose mappings, unwind tables and debug info are
/// read while the programs load, so their first report is fast.
fn watcher(
    cli: &Cli,
    signal_mask: u64,
    watch: bool,
    dumps: bool,
    warm: &[u32],
) -> Result<Watcher, RunError> {
    // Privileges first: a refused run must not leave an empty file behind.
    if !privileged() {
        return Err(RunError::NotPrivileged);
    }
    let sink = match &cli.output {
        Some(path) => Sink::File(output::open(path)?),
        None => Sink::Stderr,
    };
    // Checked (and created, as the invoking user) now rather than at the
    // first dump; it is rewritten through the same opener then.
    if let Some(path) = &cli.flamegraph {
        output::open_for(path, "--flamegraph")?;
    }
    // Three things overlap: parsing kernel BTF for our offsets, loading
    // and verifying the programs, and warming the pipeline here.
    let offsets = std::thread::spawn(|| btf::kernel_offsets(&btf::Btf::from_sys_fs()?));
    let opts = CaptureOptions {
        all: cli.all,
        follow: !cli.no_follow,
        signal_mask,
        stack_size: cli.stack_size,
        max_threads: cli.max_threads,
        watch,
        dumps,
    };
    let loading = std::thread::spawn(move || {
        Capture::start(&opts, || {
            offsets
                .join()
                .unwrap_or_else(|_| Err(btf::BtfError::Malformed("the BTF parser panicked".into())))
        })
    });
    let mut tracker = Tracker::default();
    let mut pipeline = Pipeline::new(cli.max_frames);
    for &pid in warm {
        if tracker.refresh(pid).is_ok() {
            pipeline.warm(&tracker.modules_for(pid, &[]));
        }
    }
    let capture = loading.join().map_err(|_| RunError::Panicked)??;
    let color = cli.output.is_none()
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none();
    let opts = WatchOptions {
        json: cli.format == Format::Json,
        color,
    };
    Ok(Watcher::new(capture, tracker, pipeline, sink, opts))
}

/// `rfh-trace dump PID`.
fn dump(cli: &Cli, pid: i64) -> Result<i32, RunError> {
    let pid = check_pid(pid)?;
    let mut w = watcher(cli, 0, false, true, &[pid])?;
    let report = w.dump_report(pid, "on_demand")?;
    w.emit(&report);
    Ok(0)
}

enum Mode {
    Command(libc::pid_t),
    Pids(Vec<u32>),
    All,
}

struct Timer {
    every: Duration,
    repeat: bool,
    exit: bool,
    next: Instant,
}

/// timeout(1)'s status for "the time ran out and the command was killed".
const TIMED_OUT: i32 = 124;

fn watch_loop(w: &mut Watcher, mut mode: Mode, mut timer: Option<Timer>) -> Result<i32, RunError> {
    let mut timed_out = false;
    let status = loop {
        w.poll(Duration::from_millis(100))?;
        let exited = w.take_exited();
        match &mut mode {
            Mode::Command(child) => {
                let mut status = 0;
                // Its exit event comes just before it turns zombie: wait for
                // that moment rather than for the next poll timeout.
                let flags = if exited.contains(&(*child as u32)) {
                    0
                } else {
                    libc::WNOHANG
                };
                if unsafe { libc::waitpid(*child, &mut status, flags) } == *child {
                    break Some(status);
                }
                // Ctrl-C reaches the command too (same process group);
                // keep watching until it has actually exited.
                STOP.store(false, Ordering::Relaxed);
            }
            Mode::Pids(alive) => {
                alive.retain(|p| !exited.contains(p) && unsafe { libc::kill(*p as i32, 0) } == 0);
                if alive.is_empty() || stop_requested() {
                    break None;
                }
            }
            Mode::All if stop_requested() => break None,
            Mode::All => {}
        }
        let Some(t) = timer.as_mut().filter(|t| Instant::now() >= t.next) else {
            continue;
        };
        let targets = match &mode {
            Mode::Command(child) => vec![*child as u32],
            Mode::Pids(alive) => alive.clone(),
            Mode::All => w.tracker.pids(),
        };
        for pid in &targets {
            match w.dump_report(*pid, "timeout") {
                Ok(r) => w.emit(&r),
                Err(e) => crate::diag!("cannot dump pid {pid}: {e}"),
            }
        }
        if t.exit {
            for pid in &targets {
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            timed_out = true;
            timer = None;
        } else if t.repeat {
            t.next += t.every;
        } else {
            timer = None;
        }
    };
    // The crash and exit events were written before the process was
    // reaped; drain them.
    w.poll(Duration::from_millis(10))?;
    w.flush();
    Ok(match status {
        _ if timed_out => TIMED_OUT,
        None => 0,
        Some(s) if libc::WIFEXITED(s) => libc::WEXITSTATUS(s),
        Some(s) if libc::WIFSIGNALED(s) => 128 + libc::WTERMSIG(s),
        Some(_) => 1,
    })
}
