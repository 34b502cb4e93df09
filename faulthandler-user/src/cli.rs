//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Crash reports for any process, from the outside: eBPF captures the
/// user stacks of fatal signals; rfh-trace unwinds and symbolizes them.
#[derive(Debug, Parser)]
#[command(name = "rfh-trace", version, about)]
pub struct Cli {
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
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,

    /// Append reports to this file (created 0600) instead of stderr.
    #[arg(long, short, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Bytes of user stack copied at the signal, at most 65536.
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

    /// Command to run under watch; rfh-trace exits with its status.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
