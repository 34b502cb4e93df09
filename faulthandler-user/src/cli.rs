//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::spawn::{self, SudoError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Which frames a report shows for a thread that runs Python.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StackMode {
    /// Native frames, each call of the eval loop replaced by the Python
    /// frames it ran.
    #[default]
    Merged,
    /// Only the Python frames, as faulthandler prints them.
    Python,
    /// Only native frames; Python is not read.
    Native,
}

/// Crash reports for any process, from the outside: eBPF captures the
/// user stacks of fatal signals; rfh-trace unwinds and symbolizes them.
#[derive(Debug, Parser)]
#[command(
    name = "rfh-trace",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,

    /// Write a stack dump of every thread of each watched process after
    /// DURATION (like faulthandler.dump_traceback_later), e.g. 30s, 500ms,
    /// 2m; at most a year (8760h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,

    /// With --timeout: dump every DURATION, not just once.
    #[arg(long, requires = "timeout")]
    pub repeat: bool,

    /// With --timeout: SIGKILL the watched processes after the dump and
    /// exit with status 124, as timeout(1) does. Not with --all, nor for
    /// pid 1.
    #[arg(long, requires = "timeout", conflicts_with = "all")]
    pub exit: bool,

    /// With --timeout: write a flame graph of the CPU samples to FILE.svg
    /// (rewritten at each dump; opened as --output is).
    #[arg(long, value_name = "FILE.svg", requires = "timeout")]
    pub flamegraph: Option<PathBuf>,

    /// Report every thread's stack when a watched process receives
    /// SIGNAL (like faulthandler.register); repeatable. The signal's own
    /// effect is untouched.
    #[arg(long = "on-signal", value_name = "SIGNAL")]
    pub on_signal: Vec<String>,

    /// Watch an existing process (host pid) and all its threads; repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<i64>,

    /// Watch every process on the system until Ctrl-C or SIGTERM.
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,

    /// Signals to report, comma-separated names or numbers
    /// [default: SIGSEGV,SIGBUS,SIGFPE,SIGILL,SIGABRT,SIGTRAP,SIGSYS].
    #[arg(long, value_delimiter = ',', value_name = "SIG,...")]
    pub signals: Vec<String>,

    /// Report format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub format: Format,

    /// Append reports to this file instead of stderr: created 0600 (as the
    /// invoking user under sudo), never truncated; not a symlink, device or
    /// kernel file (/proc, /sys).
    #[arg(long, short, value_name = "PATH", global = true)]
    pub output: Option<PathBuf>,

    /// Bytes of user stack copied from SP for each thread, 256 to 32768.
    #[arg(long, default_value_t = faulthandler_common::STACK_DEFAULT, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(256..=faulthandler_common::STACK_MAX as i64))]
    pub stack_size: u32,

    /// Frames shown for threads running Python: native frames with the
    /// Python frames in place of the eval loop's (merged), only the Python
    /// frames, as faulthandler prints them (python), or only native frames.
    #[arg(long, value_enum, default_value = "merged", global = true)]
    pub stack: StackMode,

    /// Most frames unwound per thread.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_frames: usize,

    /// Most threads captured in one crash report; the rest are counted.
    #[arg(long, default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_threads: u32,

    /// Do not watch children forked (and programs exec'd) later.
    #[arg(long)]
    pub no_follow: bool,

    /// Write "READY=1\n" to this file descriptor (then close it) once the
    /// probes are attached and the watch is in place; READY=1 also goes to
    /// $NOTIFY_SOCKET when it is set.
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<i32>,

    /// Command to run under watch; rfh-trace exits with its status.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write every thread's stack of a running process now, without
    /// stopping, signalling or ptrace-attaching it (faulthandler.dump_traceback).
    Dump {
        /// Host pid of the process.
        pid: i64,
    },
    /// Run as a node agent: watch every process (or a cgroup subtree) and
    /// ship crash reports to stdout, a file and/or an OTLP collector, with
    /// metrics, health and a dump socket (see deploy/ and the README).
    Agent(Box<crate::agent::AgentArgs>),
}

/// A clap error message as one line: its first paragraph, lines joined,
/// without the `error: ` prefix, the tips and the usage that follow. For a
/// missing argument the names are on the lines after the first:
/// "the following required arguments were not provided: <PID>".
pub fn one_line(message: &str) -> String {
    let text = message.trim_start();
    let text = text.strip_prefix("error: ").unwrap_or(text);
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// An argument that parses but must not be acted on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Sudo(#[from] SudoError),
    #[error(
        "refusing --exit with --pid {0}: it would SIGKILL init (pid 1) and take the system down with it; drop --exit"
    )]
    KillInit(i64),
    #[error(
        "--output and --flamegraph name the same file, {}: each flame graph would overwrite the reports; give two paths",
        .0.display()
    )]
    SameFile(PathBuf),
}

/// Checks what clap cannot: run first, before anything is created or
/// loaded, so that a refused run leaves nothing behind.
pub fn check(cli: &Cli) -> Result<(), CliError> {
    // A bad SUDO_UID/SUDO_GID must stop us before COMMAND could run as root.
    spawn::invoker()?;
    if let Some(&pid) = cli.pids.iter().find(|&&p| cli.exit && is_init(p)) {
        return Err(CliError::KillInit(pid));
    }
    if let (Some(out), Some(svg)) = (&cli.output, &cli.flamegraph)
        && same_file(out, svg)
    {
        return Err(CliError::SameFile(svg.clone()));
    }
    Ok(())
}

/// The same path, or two paths to one existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    a == b
        || matches!(
            (std::fs::metadata(a), std::fs::metadata(b)),
            (Ok(x), Ok(y)) if (x.dev(), x.ino()) == (y.dev(), y.ino())
        )
}

/// Whether `pid` is init, or one of init's threads (whose kill is init's).
fn is_init(pid: i64) -> bool {
    if pid == 1 {
        return true;
    }
    u32::try_from(pid).is_ok_and(|p| crate::procs::tgid_of(p) == Some(1))
}

/// The longest DURATION accepted: a year. Longer is almost certainly a
/// mistake, and it keeps `Instant::now() + DURATION` (and every repeat)
/// far from overflowing.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Parses `30s`, `1.5s`, `2m`, `500ms`, `1h`, or bare seconds `10`.
///
/// The number is decimal (`1.5`, `.5`), the unit one of `ms`, `s`, `m`, `h`
/// (seconds when absent); the result must be more than zero and at most
/// [`MAX_DURATION`]. Computed exactly (no floating point), to the nanosecond.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let invalid =
        || format!("invalid duration '{s}': use a number with ms, s, m or h, like 30s or 500ms");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_nanos: u128 = match unit {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3600 * 1_000_000_000,
        _ => return Err(invalid()),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(invalid());
    }
    let too_long = || format!("invalid duration '{s}': too long, at most 8760h (a year)");
    let mut nanos: u128 = 0;
    for d in int.bytes() {
        nanos = nanos
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(d - b'0')))
            .ok_or_else(too_long)?;
    }
    nanos = nanos.checked_mul(unit_nanos).ok_or_else(too_long)?;
    // Fraction digits beyond the 18th are below a nanosecond even in hours.
    let (mut f, mut denom) = (0u128, 1u128);
    for d in frac.bytes().take(18) {
        f = f * 10 + u128::from(d - b'0');
        denom *= 10;
    }
    nanos = nanos
        .checked_add(f * unit_nanos / denom)
        .ok_or_else(too_long)?;
    if nanos == 0 {
        return Err(format!("invalid duration '{s}': it must be more than zero"));
    }
    if nanos > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    Ok(std::time::Duration::new(
        secs,
        (nanos % 1_000_000_000) as u32,
    ))
}

#[cfg(test)]
mod clap_tests {
    use clap::{Parser, error::ErrorKind};

    use super::{Cli, one_line};

    fn error(args: &[&str]) -> clap::Error {
        let argv = std::iter::once("rfh-trace").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap_err()
    }

    #[test]
    fn exit_with_all_is_refused() {
        let e = error(&["--all", "--timeout", "1s", "--exit"]);
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(
            one_line(&e.to_string()),
            "the argument '--all' cannot be used with '--exit'"
        );
        // --exit stays fine with a command or pids.
        let argv = ["rfh-trace", "--timeout", "1s", "--exit", "--", "true"];
        assert!(Cli::try_parse_from(argv).is_ok());
    }

    #[test]
    fn checks_beyond_clap() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("rfh-trace").chain(args.iter().copied())).unwrap()
        };
        let cli = parse(&["--pid", "1", "--timeout", "1s", "--exit"]);
        let e = super::check(&cli).unwrap_err();
        assert!(matches!(e, super::CliError::KillInit(1)), "{e:?}");
        // Watching init, or dumping it, is fine.
        assert!(super::check(&parse(&["--pid", "1", "--timeout", "1s"])).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let a = a.to_str().unwrap();
        let same = [
            "--timeout",
            "1s",
            "--output",
            a,
            "--flamegraph",
            a,
            "--",
            "true",
        ];
        let e = super::check(&parse(&same)).unwrap_err();
        assert!(matches!(e, super::CliError::SameFile(_)), "{e:?}");
        std::fs::write(a, "").unwrap();
        let link = dir.path().join("b");
        std::os::unix::fs::symlink(a, &link).unwrap();
        let link = link.to_str().unwrap();
        let aliased = [
            "--timeout",
            "1s",
            "--output",
            a,
            "--flamegraph",
            link,
            "--",
            "true",
        ];
        assert!(super::check(&parse(&aliased)).is_err());
    }

    #[test]
    fn max_threads_is_at_least_one() {
        let e = error(&["--max-threads", "0", "--", "true"]);
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn missing_argument_is_named() {
        let e = error(&["dump"]);
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            one_line(&e.to_string()),
            "the following required arguments were not provided: <PID>"
        );
        let e = error(&["--timeout"]);
        let line = one_line(&e.to_string());
        assert!(line.contains("--timeout <DURATION>"), "{line}");
    }

    #[test]
    fn one_line_drops_tips_and_usage() {
        let e = error(&["--bogus"]);
        let line = one_line(&e.to_string());
        assert_eq!(line, "unexpected argument '--bogus' found");
        let e = error(&["--timeout", "5x", "--", "true"]);
        assert_eq!(
            one_line(&e.to_string()),
            "invalid value '5x' for '--timeout <DURATION>': invalid duration '5x': use a number with ms, s, m or h, like 30s or 500ms"
        );
    }
}

#[cfg(test)]
mod parse_duration_tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.1h"), Ok(Duration::from_secs(360)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert_eq!(parse_duration(" 3s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn exact_fractions() {
        // No floating-point rounding: 1.1s is exactly 1_100_000_000 ns.
        assert_eq!(parse_duration("1.1s"), Ok(Duration::new(1, 100_000_000)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
        // 0.333333333333h = 1199.9999999988s: exact, then truncated to the ns.
        assert_eq!(
            parse_duration("0.333333333333h"),
            Ok(Duration::new(1199, 999_999_998))
        );
        // Beyond nanoseconds is truncated.
        assert_eq!(parse_duration("1.0000000019s"), Ok(Duration::new(1, 1)));
    }

    #[test]
    fn errors() {
        let msg = "invalid duration 'x': use a number with ms, s, m or h, like 30s or 500ms";
        assert_eq!(parse_duration("x"), Err(msg.to_string()));
        for bad in [
            "", "s", "-1s", "+1s", "1.2.3s", "1 s", "10sec", "1d", "1e3", "1S", ".", "ms", "1s5",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid duration '{bad}'")),
                "{bad}: {e}"
            );
        }
        for zero in ["0", "0s", "0.0ms", "0.0000000001s"] {
            let e = parse_duration(zero).unwrap_err();
            assert!(e.contains("more than zero"), "{zero}: {e}");
        }
        assert!(
            parse_duration("99999999999999999999999h")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn capped_at_a_year() {
        assert_eq!(parse_duration("8760h"), Ok(super::MAX_DURATION));
        assert_eq!(parse_duration("525600m"), Ok(super::MAX_DURATION));
        for long in [
            "8760.000000001h",
            "31536000.000000001",
            "31536001s",
            "18446744073709551615s",
            "18446744073709551615",
            "18446744073709551616ms",
            "340282366920938463463374607431768211455h",
        ] {
            let e = parse_duration(long).unwrap_err();
            assert_eq!(
                e,
                format!("invalid duration '{long}': too long, at most 8760h (a year)")
            );
        }
        // Whatever is accepted can be added to now without overflow.
        let max = parse_duration("8760h").unwrap();
        assert!(std::time::Instant::now().checked_add(max).is_some());
    }
}
