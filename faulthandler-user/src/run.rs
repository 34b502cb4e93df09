//! Start-up checks, the three watch modes (`-- COMMAND`, `--pid`, `--all`)
//! and the child process for `-- COMMAND`.

use std::{ffi::CString, io::IsTerminal, sync::atomic::Ordering, time::Duration};

use thiserror::Error;

use crate::{
    btf,
    capture::{Capture, CaptureError, CaptureOptions},
    cli::{Cli, Format},
    output::{self, Sink},
    signals,
    watch::{STOP, WatchOptions, Watcher, stop_requested},
};

#[derive(Debug, Error)]
pub enum RunError {
    #[error(
        "rfh-trace needs root, or CAP_BPF and CAP_PERFMON: run it with sudo (for example `sudo rfh-trace -- ./app`)"
    )]
    NotPrivileged,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Signal(#[from] signals::SignalError),
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("no such process: {0}; check the pid with `ps -p {0}`")]
    NoSuchPid(i64),
    #[error("pid {0} is a kernel thread, which has no user stack to report; pick a user process")]
    KernelThread(i64),
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

/// CAP_PERFMON (38) and CAP_BPF (39), or CAP_SYS_ADMIN (21), in CapEff.
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
    has(21) || (has(38) && has(39))
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
    let has_command = !cli.command.is_empty();
    if has_command && (cli.all || !cli.pids.is_empty()) {
        return Err(RunError::BothModes);
    }
    if !has_command && !cli.all && cli.pids.is_empty() {
        return Err(RunError::NothingToWatch);
    }
    // Validate everything the user typed before touching the kernel.
    let mask = signal_mask(&cli.signals)?;
    let pids = cli
        .pids
        .iter()
        .map(|&p| check_pid(p))
        .collect::<Result<Vec<_>, _>>()?;
    let sink = match &cli.output {
        Some(path) => Sink::File(output::open(path)?),
        None => Sink::Stderr,
    };
    if !privileged() {
        return Err(RunError::NotPrivileged);
    }
    let offsets = btf::kernel_offsets(&btf::Btf::from_sys_fs()?)?;
    let capture = Capture::start(&CaptureOptions {
        all: cli.all,
        follow: !cli.no_follow,
        signal_mask: mask,
        stack_size: cli.stack_size,
        max_threads: cli.max_threads,
        offsets,
    })?;
    let color = cli.output.is_none()
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none();
    let mut w = Watcher::new(
        capture,
        sink,
        WatchOptions {
            json: cli.format == Format::Json,
            color,
            max_frames: cli.max_frames,
        },
    );
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    if has_command {
        return run_command(&mut w, &cli.command);
    }
    for &p in &pids {
        w.capture.watch(p)?;
        // Threads and mappings as of now; exec/mmap events keep it fresh.
        let _ = w.tracker.refresh(p);
    }
    let mut alive = pids;
    while !stop_requested() && (cli.all || !alive.is_empty()) {
        w.poll(Duration::from_millis(200))?;
        let exited = w.take_exited();
        alive.retain(|p| !exited.contains(p) && unsafe { libc::kill(*p as i32, 0) } == 0);
    }
    w.poll(Duration::ZERO)?;
    w.flush();
    Ok(0)
}

/// The user sudo was invoked by, if we are root because of sudo.
fn sudo_ids() -> Option<(libc::uid_t, libc::gid_t)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    Some((uid, gid))
}

fn run_command(w: &mut Watcher, command: &[String]) -> Result<i32, RunError> {
    let spawn_err = |source| RunError::Spawn {
        cmd: command[0].clone(),
        source,
    };
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| spawn_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let ids = sudo_ids();
    // Supplementary groups must be looked up before fork: getgrouplist is
    // not async-signal-safe.
    let groups = ids
        .map(|(uid, gid)| supplementary_groups(uid, gid))
        .unwrap_or_default();
    let not_found =
        CString::new(format!("rfh-trace: {}: command not found\n", command[0])).unwrap_or_default();

    let mut go = [0i32; 2];
    if unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    if child == 0 {
        // Only async-signal-safe calls from here to exec.
        unsafe {
            libc::close(go[1]);
            let mut b = 0u8;
            // Wait until the parent has put us in the watch map, so a
            // crash in the first instruction is still caught.
            libc::read(go[0], (&mut b as *mut u8).cast(), 1);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            if let Some((uid, gid)) = ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(126);
                }
            }
            libc::execvp(argv[0], argv.as_ptr());
            let code = if *libc::__errno_location() == libc::ENOENT {
                127
            } else {
                126
            };
            libc::write(2, not_found.as_ptr().cast(), not_found.as_bytes().len());
            libc::_exit(code);
        }
    }
    unsafe { libc::close(go[0]) };
    let watched = w.capture.watch(child as u32);
    unsafe {
        libc::write(go[1], [1u8].as_ptr().cast(), 1);
        libc::close(go[1]);
    }
    watched?;
    let status = loop {
        w.poll(Duration::from_millis(100))?;
        let mut status = 0;
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            break status;
        }
        // Ctrl-C reaches the command too (same process group); keep
        // watching until it has actually exited.
        STOP.store(false, Ordering::Relaxed);
    };
    // The crash and exit events were written before the process was
    // reaped; drain them.
    w.poll(Duration::from_millis(10))?;
    w.flush();
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    })
}

fn supplementary_groups(uid: libc::uid_t, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return vec![gid];
    }
    let mut n: libc::c_int = 64;
    let mut groups = vec![0 as libc::gid_t; n as usize];
    unsafe {
        if libc::getgrouplist((*pw).pw_name, gid, groups.as_mut_ptr(), &mut n) < 0 {
            groups.resize(n as usize, 0);
            libc::getgrouplist((*pw).pw_name, gid, groups.as_mut_ptr(), &mut n);
        }
    }
    groups.truncate(n.max(0) as usize);
    groups
}
