//! faulthandler-style text: a header naming the signal and process, then
//! each thread's frames, most recent call first.
//!
//! Every string that came from the watched process (names, paths, the
//! command line, symbols) goes through `escape`: a thread named
//! "x\nFatal signal" must not write lines or terminal sequences of its own.

use std::{fmt::Write as _, io};

use super::{Out, Sink};
use crate::{
    escape::escape,
    report::{Frame, Kind, LossRecord, NativeFrame, Report, Thread, hex},
};

pub struct TextSink {
    out: Out,
    color: bool,
}

impl TextSink {
    pub fn new(out: Out, color: bool) -> Self {
        Self { out, color }
    }
}

impl Sink for TextSink {
    fn report(&mut self, report: &Report) -> io::Result<()> {
        self.out.write_record(render(report, self.color).as_bytes())
    }

    fn loss(&mut self, loss: &LossRecord) -> io::Result<()> {
        self.out.write_record(render_loss(loss).as_bytes())
    }
}

struct Style {
    bold: &'static str,
    dim: &'static str,
    reset: &'static str,
}

/// One line: `rfh-trace: lost 3 reports (ring_full), ...`.
pub fn render_loss(loss: &LossRecord) -> String {
    let parts: Vec<String> = loss.lost.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!(
        "rfh-trace: lost since the last notice: {}\n",
        parts.join(", ")
    )
}

pub fn render(r: &Report, color: bool) -> String {
    let st = if color {
        Style {
            bold: "\x1b[1m",
            dim: "\x1b[2m",
            reset: "\x1b[0m",
        }
    } else {
        Style {
            bold: "",
            dim: "",
            reset: "",
        }
    };
    let mut out = String::new();
    header(&mut out, r, &st);
    for t in &r.threads {
        out.push('\n');
        thread(&mut out, t, &st);
    }
    out
}

fn header(out: &mut String, r: &Report, st: &Style) {
    let Style { bold, reset, .. } = st;
    match &r.signal {
        Some(sig) => {
            let what = if r.kind == Kind::Crash {
                "Fatal signal"
            } else {
                "Stack dump on signal"
            };
            let _ = write!(out, "{bold}{what} {}", sig.name);
            if let Some(d) = sig.description {
                let _ = write!(out, " ({d})");
            }
            let _ = write!(out, "{reset}, code ");
            match sig.code_name {
                Some(n) => out.push_str(n),
                None => {
                    let _ = write!(out, "{}", sig.code);
                }
            }
            if let Some(d) = sig.code_description {
                let _ = write!(out, " ({d})");
            }
            if let Some(a) = sig.address {
                let _ = write!(out, ", address {}", hex(a));
            }
            if let Some(s) = sig.sender_pid {
                let _ = write!(out, ", sent by pid {s}");
            }
            if sig.handled && r.kind == Kind::Crash {
                out.push_str(", after the process's own handler ran");
            }
            out.push('\n');
            if sig.stack_overflow {
                out.push_str(
                    "Stack overflow likely: the fault address is just below the stack pointer\n",
                );
            }
            if r.oom_kill {
                out.push_str("Killed by the kernel's OOM killer\n");
            }
        }
        None => {
            let why = if r.kind == Kind::Timeout {
                "timeout"
            } else {
                "on demand"
            };
            let _ = writeln!(out, "{bold}Stack dump ({why}){reset}");
        }
    }
    let p = &r.process;
    let _ = write!(out, "Process {} \"{}\"", p.pid, escape(&p.comm));
    if let Some(ns) = p.ns_pid {
        let _ = write!(out, " (pid {ns} in its namespace)");
    }
    if let Some(exe) = &p.exe {
        let _ = write!(out, " {}", escape(exe));
    }
    let _ = writeln!(out, " on {} at {}", escape(&r.host), r.time);
    if let Some(why) = &r.partial {
        let _ = writeln!(out, "warning: this report is partial: {}", escape(why));
    }
    if let Some(why) = &r.python_error {
        let _ = writeln!(out, "Python frames unavailable: {}", escape(why));
    }
    if r.lost_events > 0 {
        let _ = writeln!(
            out,
            "warning: {} events were lost before this report",
            r.lost_events
        );
    }
    if let Some(p) = &r.profile {
        out.push_str(&p.to_text());
    }
    if r.threads_omitted > 0 {
        let _ = writeln!(
            out,
            "{} more threads not captured (--max-threads)",
            r.threads_omitted
        );
    }
    if r.threads_lost > 0 {
        let _ = writeln!(
            out,
            "{} more threads lost (the ring buffer was full)",
            r.threads_lost
        );
    }
}

fn thread(out: &mut String, t: &Thread, st: &Style) {
    let which = if t.current {
        "Current thread"
    } else {
        "Thread"
    };
    let _ = write!(out, "{which} {} \"{}\"", t.tid, escape(&t.name));
    if let Some(py) = &t.python_name {
        let _ = write!(out, " [{}]", escape(py));
    }
    if let Some(ns) = t.ns_tid {
        let _ = write!(out, " (tid {ns} in its namespace)");
    }
    let _ = writeln!(out, " (most recent call first):");
    for f in &t.frames {
        match f {
            Frame::Native(n) => native(out, n, st),
            Frame::Python(p) => {
                // faulthandler's own spelling.
                let _ = write!(out, "  File \"{}\", line ", escape(&p.file));
                match p.line {
                    Some(l) => {
                        let _ = write!(out, "{l}");
                    }
                    None => out.push_str("???"),
                }
                let _ = writeln!(out, " in {}", escape(&p.function));
            }
        }
    }
    if t.truncated {
        out.push_str("  ...\n");
    }
    if let Some(e) = &t.python_error {
        let _ = writeln!(out, "  {}", escape(e));
    }
    if let Some(e) = &t.error {
        let _ = writeln!(out, "  <{}>", escape(e));
    }
    if let Some(u) = t.unwind {
        let _ = writeln!(out, "  {}[unwound with {u}]{}", st.dim, st.reset);
    }
}

fn native(out: &mut String, f: &NativeFrame, st: &Style) {
    let Style { bold, dim, reset } = st;
    if f.signal_frame {
        let _ = writeln!(out, "  {:>18} <signal handler called>", hex(f.address));
        return;
    }
    out.push_str("  ");
    if f.inlined {
        let _ = write!(out, "{:>18}", "(inlined)");
    } else {
        let _ = write!(out, "{:>18}", hex(f.address));
    }
    match &f.function {
        Some(func) => {
            let _ = write!(out, " in {bold}{}{reset}", escape(func));
            if let (Some(off), false) = (f.function_offset, f.inlined) {
                let _ = write!(out, "+{}", hex(off));
            }
        }
        None => out.push_str(" in ??"),
    }
    if let Some(file) = &f.file {
        let _ = write!(out, " at {}", escape(file));
        if let Some(line) = f.line {
            let _ = write!(out, ":{line}");
        }
    }
    if let Some(m) = &f.module {
        let _ = write!(out, " {dim}({}){reset}", escape(m));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Process, PythonFrame, SCHEMA, Signal};

    fn report() -> Report {
        Report {
            schema: SCHEMA,
            kind: Kind::Crash,
            time: "2026-01-01T00:00:00.000000Z".into(),
            host: "h".into(),
            node: None,
            process: Process {
                pid: 7,
                comm: "evil\n\x1b[31mname".into(),
                exe: Some("/tmp/x\nroot::0:0::/root:/bin/sh".into()),
                ..Process::default()
            },
            signal: Some(Signal {
                number: 11,
                name: "SIGSEGV".into(),
                code: 1,
                code_name: Some("SEGV_MAPERR"),
                address: Some(0),
                ..Signal::default()
            }),
            oom_kill: false,
            threads: vec![Thread {
                tid: 7,
                name: "x\nFatal signal \x07".into(),
                current: true,
                frames: vec![
                    Frame::Native(NativeFrame {
                        address: 0x401000,
                        function: Some("main".into()),
                        ..NativeFrame::default()
                    }),
                    Frame::Python(PythonFrame {
                        address: 0x7f00,
                        function: "inner".into(),
                        file: "/app/jobs.py".into(),
                        line: Some(42),
                        ..PythonFrame::default()
                    }),
                ],
                ..Thread::default()
            }],
            threads_omitted: 0,
            threads_lost: 0,
            threads_total: None,
            partial: None,
            profile: None,
            lost_events: 0,
            python_error: None,
            signature: None,
            suppressed: None,
        }
    }

    #[test]
    fn no_raw_control_bytes_from_the_process() {
        let text = render(&report(), false);
        assert!(
            !text.bytes().any(|b| b == 0x1b || b == 0x07),
            "raw control bytes in:\n{text}"
        );
        assert!(!text.contains("\nroot::0"), "{text}");
        assert!(!text.contains("\nFatal signal \\x07"), "{text}");
        assert!(text.contains("\"x\\nFatal signal \\x07\""), "{text}");
        assert!(
            text.contains("  File \"/app/jobs.py\", line 42 in inner\n"),
            "{text}"
        );
        assert!(text.starts_with("Fatal signal SIGSEGV, code SEGV_MAPERR, address 0x0\n"));
    }

    #[test]
    fn profile_block_keeps_its_lines_and_escapes_names() {
        let mut p = crate::profile::Profile::default();
        let f = Frame::Native(NativeFrame {
            function: Some("spin\x1b[2J".into()),
            ..NativeFrame::default()
        });
        p.add("worker\nFatal", std::slice::from_ref(&f));
        p.add("worker\nFatal", &[f]);
        let mut r = report();
        r.kind = Kind::Timeout;
        r.signal = None;
        r.profile = Some(p.summary(10));
        let text = render(&r, false);
        assert!(
            text.contains("CPU profile (2 samples):\n  100.0%  (2) worker\\nFatal: spin\\x1b[2J\n"),
            "{text}"
        );
    }
}
