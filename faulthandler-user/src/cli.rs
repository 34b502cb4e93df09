//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
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
    /// DURATION (like faulthandler.dump_traceback_later), e.g. 30s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,

    /// With --timeout: dump every DURATION, not just once.
    #[arg(long, requires = "timeout")]
    pub repeat: bool,

    /// With --timeout: SIGKILL the watched processes after the dump and
    /// exit with status 124, as timeout(1) does.
    #[arg(long, requires = "timeout")]
    pub exit: bool,

    /// With --timeout: write a flame graph of the CPU samples to FILE.svg.
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

    /// Append reports to this file (created 0600) instead of stderr.
    #[arg(long, short, value_name = "PATH", global = true)]
    pub output: Option<PathBuf>,

    /// Bytes of user stack copied from SP for each thread, 256 to 32768.
    #[arg(long, default_value_t = faulthandler_common::STACK_DEFAULT, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(256..=faulthandler_common::STACK_MAX as i64))]
    pub stack_size: u32,

    /// Most frames unwound per thread.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_frames: usize,

    /// Most threads captured in one crash report; the rest are counted.
    #[arg(long, default_value_t = 256, value_name = "N")]
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
}

/// Parses `30s`, `1.5s`, `2m`, `500ms`, `1h`, or bare seconds `10`.
///
/// The number is decimal (`1.5`, `.5`), the unit one of `ms`, `s`, `m`, `h`
/// (seconds when absent); the result must be more than zero. Computed
/// exactly (no floating point), to the nanosecond.
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
    let too_long = || format!("invalid duration '{s}': too long");
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
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    Ok(std::time::Duration::new(
        secs,
        (nanos % 1_000_000_000) as u32,
    ))
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
}
