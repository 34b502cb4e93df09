//! Report stage: the report model (the JSON contract in
//! report.schema.json) and its text and JSON renderings.

use std::fmt::Write as _;

use serde::Serialize;

pub const SCHEMA: &str = "rfh-trace.report.v1";

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Frame {
    /// Absolute instruction address, hex.
    pub address: String,
    pub module: Option<String>,
    pub module_offset: Option<String>,
    pub build_id: Option<String>,
    pub function: Option<String>,
    pub function_offset: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub inlined: bool,
    pub language: Option<&'static str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Thread {
    pub tid: u32,
    pub ns_tid: Option<u32>,
    pub name: String,
    pub current: bool,
    pub truncated: bool,
    pub unwind: Option<&'static str>,
    pub error: Option<String>,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Process {
    pub pid: u32,
    pub ns_pid: Option<u32>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    pub uid: Option<u32>,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Signal {
    pub number: i32,
    pub name: String,
    pub description: Option<&'static str>,
    pub code: i32,
    pub code_name: Option<&'static str>,
    pub code_description: Option<&'static str>,
    pub address: Option<String>,
    pub sender_pid: Option<i32>,
    pub handled: bool,
    /// The fault address sits just below the stack pointer.
    pub stack_overflow: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub kind: &'static str,
    pub time: String,
    pub host: String,
    pub process: Process,
    pub signal: Option<Signal>,
    /// The kernel's OOM killer ended the process.
    pub oom_kill: bool,
    pub threads: Vec<Thread>,
    /// Threads not captured because of `--max-threads`.
    pub threads_omitted: u32,
    /// Timeout reports: where the CPU time went since the watch began or
    /// the previous dump (see profile.rs for the shape).
    pub profile: Option<serde_json::Value>,
    #[serde(skip)]
    pub profile_text: Option<String>,
    pub lost_events: u64,
}

pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl Report {
    pub fn to_json(&self) -> String {
        let mut s =
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        s.push('\n');
        s
    }

    /// faulthandler-style text: a header naming the signal and process,
    /// then each thread's frames, most recent call first.
    pub fn to_text(&self, color: bool) -> String {
        let (bold, dim, reset) = if color {
            ("\x1b[1m", "\x1b[2m", "\x1b[0m")
        } else {
            ("", "", "")
        };
        let mut out = String::new();
        let p = &self.process;
        match &self.signal {
            Some(sig) => {
                let what = if self.kind == "crash" {
                    "Fatal signal"
                } else {
                    "Stack dump on signal"
                };
                let _ = write!(out, "{bold}{what} {}", sig.name);
                if let Some(d) = sig.description {
                    let _ = write!(out, " ({d})");
                }
                let _ = write!(out, "{reset}");
                let _ = write!(
                    out,
                    ", code {}",
                    sig.code_name
                        .map(str::to_string)
                        .unwrap_or(sig.code.to_string())
                );
                if let Some(d) = sig.code_description {
                    let _ = write!(out, " ({d})");
                }
                if let Some(a) = &sig.address {
                    let _ = write!(out, ", address {a}");
                }
                if let Some(s) = sig.sender_pid {
                    let _ = write!(out, ", sent by pid {s}");
                }
                if sig.handled && self.kind == "crash" {
                    out.push_str(", after the process's own handler ran");
                }
                out.push('\n');
                if sig.stack_overflow {
                    out.push_str("Stack overflow likely: the fault address is just below the stack pointer\n");
                }
                if self.oom_kill {
                    out.push_str("Killed by the kernel's OOM killer\n");
                }
            }
            None => {
                let why = if self.kind == "timeout" {
                    "timeout"
                } else {
                    "on demand"
                };
                let _ = writeln!(out, "{bold}Stack dump ({why}){reset}");
            }
        }
        let _ = write!(out, "Process {} \"{}\"", p.pid, p.comm);
        if let Some(ns) = p.ns_pid {
            let _ = write!(out, " (pid {ns} in its namespace)");
        }
        if let Some(exe) = &p.exe {
            let _ = write!(out, " {exe}");
        }
        let _ = writeln!(out, " on {} at {}", self.host, self.time);
        if self.lost_events > 0 {
            let _ = writeln!(
                out,
                "warning: {} events were lost before this report",
                self.lost_events
            );
        }
        if let Some(p) = &self.profile_text {
            out.push_str(p);
        }
        if self.threads_omitted > 0 {
            let _ = writeln!(
                out,
                "{} more threads not captured (--max-threads)",
                self.threads_omitted
            );
        }
        for t in &self.threads {
            out.push('\n');
            let which = if t.current {
                "Current thread"
            } else {
                "Thread"
            };
            let _ = write!(out, "{which} {} \"{}\"", t.tid, t.name);
            if let Some(ns) = t.ns_tid {
                let _ = write!(out, " (tid {ns} in its namespace)");
            }
            let _ = writeln!(out, " (most recent call first):");
            for f in &t.frames {
                out.push_str("  ");
                if f.inlined {
                    let _ = write!(out, "{:>18}", "(inlined)");
                } else {
                    let _ = write!(out, "{:>18}", f.address);
                }
                match &f.function {
                    Some(func) => {
                        let _ = write!(out, " in {bold}{func}{reset}");
                        if let (Some(off), false) = (&f.function_offset, f.inlined) {
                            let _ = write!(out, "+{off}");
                        }
                    }
                    None => out.push_str(" in ??"),
                }
                if let Some(file) = &f.file {
                    let _ = write!(out, " at {file}");
                    if let Some(line) = f.line {
                        let _ = write!(out, ":{line}");
                    }
                }
                if let Some(m) = &f.module {
                    let _ = write!(out, " {dim}({m}){reset}");
                }
                out.push('\n');
            }
            if t.truncated {
                out.push_str("  ...\n");
            }
            if let Some(e) = &t.error {
                let _ = writeln!(out, "  <{e}>");
            }
            if let Some(u) = t.unwind {
                let _ = writeln!(out, "  {dim}[unwound with {u}]{reset}");
            }
        }
        out
    }
}

/// RFC 3339 UTC with microseconds, from nanoseconds since the epoch.
pub fn rfc3339(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
