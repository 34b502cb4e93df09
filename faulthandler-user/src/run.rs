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
    output,
    procs::Tracker,
    ready,
    report::Kind,
    signals,
    sink::{self, Out},
    spawn,
    watch::{STOP, Watcher, stop_requested},
    workers::{Job, WorkerOptions, Workers},
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
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error("no such process: {0}; check the pid with `ps -p {0}`")]
    NoSuchPid(i64),
    #[error("pid {0} is a kernel thread, which has no user stack to report; pick a user process")]
    KernelThread(i64),
    #[error("--ready-fd {0} is not an open file descriptor")]
    ReadyFd(i32, #[source] std::io::Error),
    #[error("cannot start the worker thread")]
    Workers(#[source] std::io::Error),
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
pub(crate) fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
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

/// The process `pid` names, checked: it exists and is not a kernel
/// thread. A thread id stands for its process (the kernel's signals and
/// rfh-trace's reports are per process); the user is told.
fn check_pid(pid: i64) -> Result<u32, RunError> {
    let Ok(p) = u32::try_from(pid) else {
        return Err(RunError::NoSuchPid(pid));
    };
    if p == 0 {
        return Err(RunError::NoSuchPid(pid));
    }
    let tgid = crate::procs::tgid_of(p).ok_or(RunError::NoSuchPid(pid))?;
    if tgid != p {
        crate::diag!("{p} is a thread of process {tgid}: using process {tgid}");
    }
    let p = tgid;
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

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Runs rfh-trace; returns the process exit status.
pub fn run(cli: Cli) -> Result<i32, RunError> {
    crate::cli::check(&cli)?;
    match &cli.cmd {
        Some(Cmd::Dump { pid }) => return dump(&cli, *pid),
        Some(Cmd::Agent(args)) => return Ok(crate::agent::run((**args).clone())?),
        None => {}
    }
    let has_command = !cli.command.is_empty();
    if has_command && (cli.all || !cli.pids.is_empty()) {
        return Err(RunError::BothModes);
    }
    if !has_command && !cli.all && cli.pids.is_empty() {
        return Err(RunError::NothingToWatch);
    }
    // Validate everything the user typed before touching the kernel.
    if let Some(fd) = cli.ready_fd {
        ready::claim(fd).map_err(|e| RunError::ReadyFd(fd, e))?;
    }
    let mask = signals::mask(&cli.signals, &signals::DEFAULT_FATAL)?;
    let on_signal = signals::mask(&cli.on_signal, &[])?;
    let pids = cli
        .pids
        .iter()
        .map(|&p| check_pid(p))
        .collect::<Result<Vec<_>, _>>()?;
    let dumps = cli.timeout.is_some() || on_signal != 0;
    let masks = Masks {
        signals: mask,
        on_signal,
    };
    let mut w = watcher(&cli, masks, true, dumps, &pids, Out::Stderr)?;
    if cli.timeout.is_some() {
        w.capture.start_profiling(PROFILE_HZ)?;
        w.keep_profiles();
    }
    // SAFETY: the handlers only store to an atomic, which is
    // async-signal-safe.
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
    ready::notify(cli.ready_fd);
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

/// Which signals are reported when they kill, and which ask for a dump
/// when survived.
struct Masks {
    signals: u64,
    on_signal: u64,
}

/// Raises the open-file limit to its hard maximum: the tracker holds one
/// descriptor per mapped file it may need later, and under `--all` that is
/// many; running out would cost symbols silently.
pub(crate) fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out- and in-pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Checks, the sink, kernel offsets, the loaded programs and the workers.
/// `warm`: processes whose mappings, unwind tables and debug info are
/// read while the programs load, so their first report is fast.
fn watcher(
    cli: &Cli,
    masks: Masks,
    watch: bool,
    dumps: bool,
    warm: &[u32],
    default_out: Out,
) -> Result<Watcher, RunError> {
    // Privileges first: a refused run must not leave an empty file behind.
    if !privileged() {
        return Err(RunError::NotPrivileged);
    }
    // Checked (and created, as the invoking user) now rather than at the
    // first dump; it is rewritten through the same opener then.
    if let Some(path) = &cli.flamegraph {
        output::open_for(path, "--flamegraph")?;
    }
    let out = match &cli.output {
        Some(path) => Out::File(output::open(path)?),
        None => default_out,
    };
    raise_nofile();
    // Three things overlap: parsing kernel BTF for our offsets, loading
    // and verifying the programs, and warming the pipeline here.
    let offsets = std::thread::spawn(move || {
        let b = btf::Btf::from_sys_fs()?;
        // `dump` attaches no tracepoint: an older kernel may still dump.
        if watch {
            btf::check_tracepoints(&b)?;
        }
        btf::kernel_offsets(&b)
    });
    let opts = CaptureOptions {
        all: cli.all,
        follow: !cli.no_follow,
        signal_mask: masks.signals,
        on_signal_mask: masks.on_signal,
        stack_size: cli.stack_size,
        max_threads: cli.max_threads,
        watch,
        dumps,
        cgroup: None,
    };
    let loading = std::thread::spawn(move || {
        Capture::start(&opts, || {
            offsets
                .join()
                .unwrap_or_else(|_| Err(btf::BtfError::Malformed("the BTF parser panicked".into())))
        })
    });
    let mut tracker = Tracker::default();
    let mut warm_modules = Vec::new();
    for &pid in warm {
        if tracker.refresh(pid).is_ok() {
            warm_modules.push(tracker.modules_for(pid, &[]));
        }
    }
    let to_terminal = match &out {
        Out::Stderr => std::io::stderr().is_terminal(),
        Out::Stdout => std::io::stdout().is_terminal(),
        Out::File(_) => false,
    };
    let format = match cli.format {
        Format::Json => sink::Format::Json,
        Format::Text => sink::Format::Text {
            color: to_terminal && std::env::var_os("NO_COLOR").is_none(),
        },
    };
    let workers = Workers::start(
        vec![sink::new(format, out)],
        WorkerOptions {
            max_frames: cli.max_frames,
            stack: cli.stack,
            flamegraph: cli.flamegraph.clone(),
            warm: warm_modules,
        },
    )
    .map_err(RunError::Workers)?;
    let capture = loading.join().map_err(|_| RunError::Panicked)??;
    let mut w = Watcher::new(capture, tracker, workers, masks.on_signal);
    w.set_stack_mode(cli.stack);
    w.sync_python();
    Ok(w)
}

/// `rfh-trace dump PID`: the dump goes to stdout, as eu-stack's and
/// py-spy's do, so it can be piped to a pager.
fn dump(cli: &Cli, pid: i64) -> Result<i32, RunError> {
    let pid = check_pid(pid)?;
    // A running agent has everything loaded and warm: ask it first.
    let json = cli.format == Format::Json;
    if let Some(report) = crate::agent::ask_dump(&crate::agent::client_path(), pid, json)? {
        let mut out = match &cli.output {
            Some(path) => Out::File(output::open(path)?),
            None => Out::Stdout,
        };
        // A closed stdout (`| head`) is not an error worth a status.
        let _ = out.write_record(&report);
        return Ok(0);
    }
    let masks = Masks {
        signals: 0,
        on_signal: 0,
    };
    let mut w = watcher(cli, masks, false, true, &[pid], Out::Stdout)?;
    let job = w.dump_job(pid, Kind::OnDemand)?;
    w.workers.submit_wait(Job::Report(Box::new(job)));
    finish(&mut w);
    Ok(0)
}

/// Drains the workers and says what was lost, if anything.
fn finish(w: &mut Watcher) {
    if let Some(summary) = w.finish() {
        crate::diag!("{summary}");
    }
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
                // SAFETY: a valid out-pointer; waits for our own child.
                if unsafe { libc::waitpid(*child, &mut status, flags) } == *child {
                    break Some(status);
                }
                // Ctrl-C reaches the command too (same process group);
                // keep watching until it has actually exited.
                STOP.store(false, Ordering::Relaxed);
            }
            Mode::Pids(alive) => {
                // SAFETY: kill(2) with signal 0 only checks the pid exists.
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
        // Like timeout(1), the whole tree of COMMAND: the shell a script
        // runs in is rarely the process that hangs.
        let targets = match &mode {
            Mode::Command(child) => crate::procs::tree(*child as u32),
            Mode::Pids(alive) => alive.clone(),
            Mode::All => w.tracker.pids(),
        };
        for pid in &targets {
            match w.dump_job(*pid, Kind::Timeout) {
                Ok(job) => w.workers.submit_wait(Job::Report(Box::new(job))),
                Err(e) => crate::diag!("cannot dump pid {pid}: {e}"),
            }
        }
        if t.exit {
            // The tree again: what forked while it was being dumped too.
            let targets = match &mode {
                Mode::Command(child) => crate::procs::tree(*child as u32),
                _ => targets,
            };
            for &pid in targets.iter().filter(|&&p| p > 1) {
                // SAFETY: kill(2) with a pid and a signal number; the
                // checks made at start-up keep pid 1 and kernel threads
                // out of `targets`.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            timed_out = true;
            timer = None;
        } else if t.repeat {
            t.next += t.every;
        } else {
            // The one timeout dump is out: nothing more to profile for.
            w.capture.stop_profiling()?;
            w.stop_profiles();
            timer = None;
        }
    };
    // The crash and exit events were written before the process was
    // reaped; drain them.
    w.poll(Duration::from_millis(10))?;
    finish(w);
    Ok(match status {
        _ if timed_out => TIMED_OUT,
        None => 0,
        Some(s) if libc::WIFEXITED(s) => libc::WEXITSTATUS(s),
        Some(s) if libc::WIFSIGNALED(s) => 128 + libc::WTERMSIG(s),
        Some(_) => 1,
    })
}
