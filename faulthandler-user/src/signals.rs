//! Linux x86_64 signal numbers, names, descriptions and `si_code` meanings.
//!
//! The tables are written out rather than taken from libc so the report
//! reads the same whatever libc the tool was built against, and so the
//! names cover codes newer than the build host's headers (SEGV_CPERR).

pub const SIGILL: i32 = 4;
pub const SIGTRAP: i32 = 5;
pub const SIGABRT: i32 = 6;
pub const SIGBUS: i32 = 7;
pub const SIGFPE: i32 = 8;
pub const SIGSEGV: i32 = 11;
pub const SIGCHLD: i32 = 17;
pub const SIGPOLL: i32 = 29;
pub const SIGSYS: i32 = 31;
/// glibc's SIGRTMIN: the kernel's 32 and 33 are reserved by NPTL.
pub const SIGRTMIN: i32 = 34;
pub const SIGRTMAX: i32 = 64;

/// Signals whose default action kills the process with a core dump because
/// of the program's own doing; these are watched when the user names none.
pub const DEFAULT_FATAL: [i32; 7] = [SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS];

/// `si_code` of a signal raised by the kernel itself rather than by a fault
/// with an address (x86 uses it for general-protection faults and int3).
pub use faulthandler_common::SI_KERNEL;

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("unknown signal name '{0}': use a name like SIGSEGV or a number 1-64")]
    UnknownName(String),
    #[error("signal number {0} is out of range: use a name like SIGSEGV or a number 1-64")]
    OutOfRange(String),
}

/// (name, description) for 1..=31, indexed by number - 1.
#[rustfmt::skip]
const STANDARD: [(&str, &str); 31] = [
    ("SIGHUP", "Hangup"),
    ("SIGINT", "Interrupt"),
    ("SIGQUIT", "Quit"),
    ("SIGILL", "Illegal instruction"),
    ("SIGTRAP", "Trace/breakpoint trap"),
    ("SIGABRT", "Aborted"),
    ("SIGBUS", "Bus error"),
    ("SIGFPE", "Floating-point exception"),
    ("SIGKILL", "Killed"),
    ("SIGUSR1", "User defined signal 1"),
    ("SIGSEGV", "Segmentation fault"),
    ("SIGUSR2", "User defined signal 2"),
    ("SIGPIPE", "Broken pipe"),
    ("SIGALRM", "Alarm clock"),
    ("SIGTERM", "Terminated"),
    ("SIGSTKFLT", "Stack fault"),
    ("SIGCHLD", "Child exited"),
    ("SIGCONT", "Continued"),
    ("SIGSTOP", "Stopped (signal)"),
    ("SIGTSTP", "Stopped"),
    ("SIGTTIN", "Stopped (tty input)"),
    ("SIGTTOU", "Stopped (tty output)"),
    ("SIGURG", "Urgent I/O condition"),
    ("SIGXCPU", "CPU time limit exceeded"),
    ("SIGXFSZ", "File size limit exceeded"),
    ("SIGVTALRM", "Virtual timer expired"),
    ("SIGPROF", "Profiling timer expired"),
    ("SIGWINCH", "Window changed"),
    ("SIGIO", "I/O possible"),
    ("SIGPWR", "Power failure"),
    ("SIGSYS", "Bad system call"),
];

/// `SIGSEGV` for 11, `SIGRTMIN+n` for real-time signals, `SIG32` for
/// numbers no signal is named for (glibc keeps 32 and 33 to itself).
pub fn name(sig: i32) -> String {
    match sig {
        1..=31 => STANDARD[sig as usize - 1].0.to_owned(),
        SIGRTMIN..=SIGRTMAX => match sig - SIGRTMIN {
            0 => "SIGRTMIN".to_owned(),
            n => format!("SIGRTMIN+{n}"),
        },
        _ => format!("SIG{sig}"),
    }
}

/// What `strsignal` says, with Python faulthandler's "Floating-point
/// exception" spelling.
pub fn description(sig: i32) -> Option<&'static str> {
    match sig {
        1..=31 => Some(STANDARD[sig as usize - 1].1),
        SIGRTMIN..=SIGRTMAX => Some("Real-time signal"),
        _ => None,
    }
}

/// Reads a signal as the user may type it: `SIGSEGV`, `segv`, `11`,
/// `SIGRTMIN+3` or `RTMAX-1`.
pub fn parse(input: &str) -> Result<i32, SignalError> {
    let s = input.trim();
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<i32>() {
            Ok(n @ 1..=SIGRTMAX) => Ok(n),
            _ => Err(SignalError::OutOfRange(s.to_owned())),
        };
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let unknown = || SignalError::UnknownName(input.to_owned());
    if let Some(i) = STANDARD.iter().position(|(n, _)| &n[3..] == bare) {
        return Ok(i as i32 + 1);
    }
    // RTMIN counts up with '+', RTMAX down with '-'; parsing the offset as
    // i64 keeps absurd inputs from overflowing before the range check.
    let rt = |base: i32, rest: &str, sign: char| -> Result<i32, SignalError> {
        let offset = match rest.strip_prefix(sign) {
            _ if rest.is_empty() => 0,
            Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => {
                d.parse::<i64>().map_err(|_| unknown())?
            }
            _ => return Err(unknown()),
        };
        let sig = i64::from(base) + if sign == '+' { offset } else { -offset };
        match i32::try_from(sig) {
            Ok(sig @ SIGRTMIN..=SIGRTMAX) => Ok(sig),
            _ => Err(unknown()),
        }
    };
    match bare {
        "IOT" => Ok(SIGABRT),
        "POLL" => Ok(SIGPOLL),
        "CLD" => Ok(SIGCHLD),
        _ if bare.starts_with("RTMIN") => rt(SIGRTMIN, &bare[5..], '+'),
        _ if bare.starts_with("RTMAX") => rt(SIGRTMAX, &bare[5..], '-'),
        _ => Err(unknown()),
    }
}

/// (signal, code, name, description); signal 0 marks the generic codes that
/// any signal may carry.
#[rustfmt::skip]
const CODES: &[(i32, i32, &str, &str)] = &[
    (0,       0,         "SI_USER",          "sent by kill, sigsend"),
    (0,       SI_KERNEL, "SI_KERNEL",        "sent by the kernel"),
    (0,       -1,        "SI_QUEUE",         "sent by sigqueue"),
    (0,       -2,        "SI_TIMER",         "sent by timer expiration"),
    (0,       -3,        "SI_MESGQ",         "sent by real time mesq state change"),
    (0,       -4,        "SI_ASYNCIO",       "sent by AIO completion"),
    (0,       -5,        "SI_SIGIO",         "sent by queued SIGIO"),
    (0,       -6,        "SI_TKILL",         "sent by tkill"),
    (0,       -7,        "SI_DETHREAD",      "sent by execve killing subsidiary threads"),
    (0,       -60,       "SI_ASYNCNL",       "sent by asynch name lookup completion"),
    (SIGILL,  1,         "ILL_ILLOPC",       "illegal opcode"),
    (SIGILL,  2,         "ILL_ILLOPN",       "illegal operand"),
    (SIGILL,  3,         "ILL_ILLADR",       "illegal addressing mode"),
    (SIGILL,  4,         "ILL_ILLTRP",       "illegal trap"),
    (SIGILL,  5,         "ILL_PRVOPC",       "privileged opcode"),
    (SIGILL,  6,         "ILL_PRVREG",       "privileged register"),
    (SIGILL,  7,         "ILL_COPROC",       "coprocessor error"),
    (SIGILL,  8,         "ILL_BADSTK",       "internal stack error"),
    (SIGILL,  9,         "ILL_BADIADDR",     "unimplemented instruction address"),
    (SIGFPE,  1,         "FPE_INTDIV",       "integer divide by zero"),
    (SIGFPE,  2,         "FPE_INTOVF",       "integer overflow"),
    (SIGFPE,  3,         "FPE_FLTDIV",       "floating-point divide by zero"),
    (SIGFPE,  4,         "FPE_FLTOVF",       "floating-point overflow"),
    (SIGFPE,  5,         "FPE_FLTUND",       "floating-point underflow"),
    (SIGFPE,  6,         "FPE_FLTRES",       "floating-point inexact result"),
    (SIGFPE,  7,         "FPE_FLTINV",       "floating-point invalid operation"),
    (SIGFPE,  8,         "FPE_FLTSUB",       "subscript out of range"),
    (SIGFPE,  14,        "FPE_FLTUNK",       "undiagnosed floating-point exception"),
    (SIGFPE,  15,        "FPE_CONDTRAP",     "trap on condition"),
    (SIGSEGV, 1,         "SEGV_MAPERR",      "address not mapped to object"),
    (SIGSEGV, 2,         "SEGV_ACCERR",      "invalid permissions for mapped object"),
    (SIGSEGV, 3,         "SEGV_BNDERR",      "failed address bound checks"),
    (SIGSEGV, 4,         "SEGV_PKUERR",      "failed protection key checks"),
    (SIGSEGV, 5,         "SEGV_ACCADI",      "ADI not enabled for mapped object"),
    (SIGSEGV, 6,         "SEGV_ADIDERR",     "disrupting MCD error"),
    (SIGSEGV, 7,         "SEGV_ADIPERR",     "precise MCD exception"),
    (SIGSEGV, 8,         "SEGV_MTEAERR",     "asynchronous ARM MTE error"),
    (SIGSEGV, 9,         "SEGV_MTESERR",     "synchronous ARM MTE exception"),
    (SIGSEGV, 10,        "SEGV_CPERR",       "control protection fault"),
    (SIGBUS,  1,         "BUS_ADRALN",       "invalid address alignment"),
    (SIGBUS,  2,         "BUS_ADRERR",       "non-existent physical address"),
    (SIGBUS,  3,         "BUS_OBJERR",       "object specific hardware error"),
    (SIGBUS,  4,         "BUS_MCEERR_AR",    "hardware memory error consumed: action required"),
    (SIGBUS,  5,         "BUS_MCEERR_AO",    "hardware memory error detected: action optional"),
    (SIGTRAP, 1,         "TRAP_BRKPT",       "process breakpoint"),
    (SIGTRAP, 2,         "TRAP_TRACE",       "process trace trap"),
    (SIGTRAP, 3,         "TRAP_BRANCH",      "process taken branch trap"),
    (SIGTRAP, 4,         "TRAP_HWBKPT",      "hardware breakpoint/watchpoint"),
    (SIGTRAP, 5,         "TRAP_UNK",         "undiagnosed trap"),
    (SIGTRAP, 6,         "TRAP_PERF",        "perf event with sigtrap=1"),
    (SIGCHLD, 1,         "CLD_EXITED",       "child has exited"),
    (SIGCHLD, 2,         "CLD_KILLED",       "child was killed"),
    (SIGCHLD, 3,         "CLD_DUMPED",       "child terminated abnormally"),
    (SIGCHLD, 4,         "CLD_TRAPPED",      "traced child has trapped"),
    (SIGCHLD, 5,         "CLD_STOPPED",      "child has stopped"),
    (SIGCHLD, 6,         "CLD_CONTINUED",    "stopped child has continued"),
    (SIGPOLL, 1,         "POLL_IN",          "data input available"),
    (SIGPOLL, 2,         "POLL_OUT",         "output buffers available"),
    (SIGPOLL, 3,         "POLL_MSG",         "input message available"),
    (SIGPOLL, 4,         "POLL_ERR",         "i/o error"),
    (SIGPOLL, 5,         "POLL_PRI",         "high priority input available"),
    (SIGPOLL, 6,         "POLL_HUP",         "device disconnected"),
    (SIGSYS,  1,         "SYS_SECCOMP",      "seccomp triggered"),
    (SIGSYS,  2,         "SYS_USER_DISPATCH", "syscall user dispatch triggered"),
];

fn code_entry(sig: i32, code: i32) -> Option<&'static (i32, i32, &'static str, &'static str)> {
    // Codes <= 0 and SI_KERNEL mean the same for every signal; positive codes
    // are per-signal and overlap (1 is SEGV_MAPERR and also BUS_ADRALN).
    let table_sig = if code <= 0 || code == SI_KERNEL {
        0
    } else {
        sig
    };
    CODES.iter().find(|e| e.0 == table_sig && e.1 == code)
}

/// The `<linux/signal.h>` name of `code` for `sig`, e.g. `SEGV_MAPERR`.
pub fn code_name(sig: i32, code: i32) -> Option<&'static str> {
    code_entry(sig, code).map(|e| e.2)
}

/// A short lowercase explanation of `code` for `sig`.
pub fn code_description(sig: i32, code: i32) -> Option<&'static str> {
    code_entry(sig, code).map(|e| e.3)
}

/// Whether the kernel raised `sig` for a faulting instruction, so `si_addr`
/// holds the faulting address. SI_KERNEL is excluded: x86 sends it for
/// general-protection faults and int3 with `si_addr` left at 0.
pub fn is_fault(sig: i32, code: i32) -> bool {
    matches!(sig, SIGSEGV | SIGBUS | SIGFPE | SIGILL | SIGTRAP) && code > 0 && code < SI_KERNEL
}

/// Whether a process sent the signal (kill, tkill, sigqueue, timers...),
/// so `si_pid`/`si_uid` identify the sender.
pub fn user_sent(code: i32) -> bool {
    code <= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for sig in (1..=31).chain(SIGRTMIN..=SIGRTMAX) {
            let n = name(sig);
            assert_eq!(parse(&n).unwrap(), sig, "{n}");
            assert!(description(sig).is_some());
        }
        assert_eq!(name(11), "SIGSEGV");
        assert_eq!(name(34), "SIGRTMIN");
        assert_eq!(name(64), "SIGRTMIN+30");
        assert_eq!(name(32), "SIG32");
        for missing in [0, 32, 33, 65, -1] {
            assert_eq!(description(missing), None);
        }
    }

    #[test]
    fn names_match_libc() {
        let libc = [
            (libc::SIGHUP, "SIGHUP"),
            (libc::SIGILL, "SIGILL"),
            (libc::SIGTRAP, "SIGTRAP"),
            (libc::SIGABRT, "SIGABRT"),
            (libc::SIGBUS, "SIGBUS"),
            (libc::SIGFPE, "SIGFPE"),
            (libc::SIGUSR1, "SIGUSR1"),
            (libc::SIGSEGV, "SIGSEGV"),
            (libc::SIGSTKFLT, "SIGSTKFLT"),
            (libc::SIGCHLD, "SIGCHLD"),
            (libc::SIGSTOP, "SIGSTOP"),
            (libc::SIGIO, "SIGIO"),
            (libc::SIGPWR, "SIGPWR"),
            (libc::SIGSYS, "SIGSYS"),
        ];
        for (sig, n) in libc {
            assert_eq!(name(sig), n);
        }
        assert_eq!(SIGRTMIN, libc::SIGRTMIN());
        assert_eq!(SIGRTMAX, libc::SIGRTMAX());
    }

    #[test]
    fn descriptions() {
        assert_eq!(description(SIGSEGV), Some("Segmentation fault"));
        assert_eq!(description(SIGBUS), Some("Bus error"));
        assert_eq!(description(SIGFPE), Some("Floating-point exception"));
        assert_eq!(description(SIGILL), Some("Illegal instruction"));
        assert_eq!(description(SIGABRT), Some("Aborted"));
        assert_eq!(description(SIGTRAP), Some("Trace/breakpoint trap"));
        assert_eq!(description(SIGSYS), Some("Bad system call"));
    }

    #[test]
    fn parse_forms() {
        for s in ["SIGSEGV", "sigsegv", "SEGV", "segv", " Segv ", "11"] {
            assert_eq!(parse(s).unwrap(), SIGSEGV, "{s}");
        }
        assert_eq!(parse("iot").unwrap(), SIGABRT);
        assert_eq!(parse("SIGPOLL").unwrap(), 29);
        assert_eq!(parse("rtmin+3").unwrap(), 37);
        assert_eq!(parse("SIGRTMAX").unwrap(), 64);
        assert_eq!(parse("SIGRTMAX-2").unwrap(), 62);
        assert_eq!(parse("64").unwrap(), 64);
        let e = parse("FOO").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown signal name 'FOO': use a name like SIGSEGV or a number 1-64"
        );
        for bad in [
            "",
            "SIG",
            "RTMIN+31",
            "RTMIN-1",
            "RTMAX+1",
            "RTMIN+x",
            "SIGSEGV2",
            "RTMIN+",
            "RTMAX+0",
            "RTMAX-2147483648",
            "RTMIN+2147483647",
            "RTMIN+99999999999999999999",
        ] {
            assert!(
                matches!(parse(bad), Err(SignalError::UnknownName(_))),
                "{bad:?}"
            );
        }
        for bad in ["0", "65", "-1", "99999999999"] {
            assert!(
                matches!(parse(bad), Err(SignalError::OutOfRange(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn codes() {
        assert_eq!(code_name(SIGSEGV, 1), Some("SEGV_MAPERR"));
        assert_eq!(code_name(SIGBUS, 1), Some("BUS_ADRALN"));
        assert_eq!(code_name(SIGSEGV, 10), Some("SEGV_CPERR"));
        assert_eq!(code_name(SIGFPE, 15), Some("FPE_CONDTRAP"));
        assert_eq!(code_name(SIGFPE, 9), None);
        assert_eq!(code_name(SIGSEGV, 0), Some("SI_USER"));
        assert_eq!(code_name(SIGSEGV, SI_KERNEL), Some("SI_KERNEL"));
        assert_eq!(code_name(SIGABRT, -6), Some("SI_TKILL"));
        assert_eq!(code_name(libc::SIGIO, 1), Some("POLL_IN"));
        assert_eq!(code_name(SIGABRT, 1), None);
        let d = |s, c| code_description(s, c).unwrap();
        assert_eq!(d(SIGSEGV, 1), "address not mapped to object");
        assert_eq!(d(SIGSEGV, 2), "invalid permissions for mapped object");
        assert_eq!(d(SIGFPE, 1), "integer divide by zero");
        assert_eq!(d(SIGILL, 1), "illegal opcode");
        assert_eq!(d(libc::SIGKILL, 0), "sent by kill, sigsend");
        assert_eq!(d(libc::SIGKILL, -6), "sent by tkill");
    }

    #[test]
    fn codes_match_libc() {
        let known = [
            (0, libc::SI_USER, "SI_USER"),
            (0, libc::SI_KERNEL, "SI_KERNEL"),
            (0, libc::SI_QUEUE, "SI_QUEUE"),
            (0, libc::SI_TIMER, "SI_TIMER"),
            (0, libc::SI_MESGQ, "SI_MESGQ"),
            (0, libc::SI_ASYNCIO, "SI_ASYNCIO"),
            (0, libc::SI_SIGIO, "SI_SIGIO"),
            (0, libc::SI_TKILL, "SI_TKILL"),
            (0, libc::SI_DETHREAD, "SI_DETHREAD"),
            (0, libc::SI_ASYNCNL, "SI_ASYNCNL"),
            (SIGBUS, libc::BUS_ADRALN, "BUS_ADRALN"),
            (SIGBUS, libc::BUS_ADRERR, "BUS_ADRERR"),
            (SIGBUS, libc::BUS_OBJERR, "BUS_OBJERR"),
            (SIGBUS, libc::BUS_MCEERR_AR, "BUS_MCEERR_AR"),
            (SIGBUS, libc::BUS_MCEERR_AO, "BUS_MCEERR_AO"),
            (SIGTRAP, libc::TRAP_BRKPT, "TRAP_BRKPT"),
            (SIGTRAP, libc::TRAP_TRACE, "TRAP_TRACE"),
            (SIGTRAP, libc::TRAP_BRANCH, "TRAP_BRANCH"),
            (SIGTRAP, libc::TRAP_HWBKPT, "TRAP_HWBKPT"),
            (SIGTRAP, libc::TRAP_UNK, "TRAP_UNK"),
            (SIGTRAP, libc::TRAP_PERF, "TRAP_PERF"),
            (SIGCHLD, libc::CLD_EXITED, "CLD_EXITED"),
            (SIGCHLD, libc::CLD_CONTINUED, "CLD_CONTINUED"),
        ];
        for (sig, code, n) in known {
            assert_eq!(code_name(sig, code), Some(n), "{n}");
        }
    }

    #[test]
    fn fault_and_sender_classes() {
        assert!(is_fault(SIGSEGV, 1));
        assert!(is_fault(SIGFPE, 1));
        assert!(is_fault(SIGTRAP, 1));
        assert!(!is_fault(SIGSEGV, 0));
        assert!(!is_fault(SIGSEGV, SI_KERNEL));
        assert!(!is_fault(SIGABRT, 1));
        assert!(!is_fault(SIGSEGV, -6));
        assert!(user_sent(0) && user_sent(-6) && !user_sent(1) && !user_sent(SI_KERNEL));
        assert_eq!(DEFAULT_FATAL, [11, 7, 8, 4, 6, 5, 31]);
    }
}
