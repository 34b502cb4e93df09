//! JSON Lines on stdout, for `kubectl logs` and the node's log agent
//! (Fluent Bit, Vector, Alloy). Container runtimes split lines longer than
//! 16 KiB into several log entries, which no parser joins back, so every
//! line stays under that: a report too big is cut (other threads first,
//! then the crashing thread's outer frames) and marked
//! `"truncated_report": true`. The file and OTLP sinks get it whole.

use std::io::{self, Write};

use serde_json::{Map, Value};

use super::{Record, Writer};

/// Bytes in a line, newline included, strictly below 16 KiB.
pub const MAX_LINE: usize = 16 * 1024 - 1;

pub struct Stdout;

impl Writer for Stdout {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        let mut line = match rec {
            Record::Report(r) => {
                let v = serde_json::to_value(&**r).map_err(io::Error::other)?;
                fit(v)
            }
            Record::Loss(l) => serde_json::to_string(&**l).map_err(io::Error::other)?,
        };
        line.push('\n');
        // One write per line: lines of concurrent writers do not interleave.
        let mut out = io::stdout().lock();
        out.write_all(line.as_bytes())?;
        out.flush()
    }
}

fn len(v: &Value) -> usize {
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// The report as one line of at most `MAX_LINE - 1` bytes.
pub fn fit(v: Value) -> String {
    let whole = serde_json::to_string(&v).unwrap_or_default();
    if whole.len() < MAX_LINE {
        return whole;
    }
    let Value::Object(mut obj) = v else {
        return String::new();
    };
    obj.insert("truncated_report".into(), Value::Bool(true));
    let threads = match obj.insert("threads".into(), Value::Array(Vec::new())) {
        Some(Value::Array(t)) => t,
        _ => Vec::new(),
    };
    // Room for the threads, with slack for `threads_cut` and commas.
    let base = len(&Value::Object(obj.clone()));
    let mut budget = (MAX_LINE - 64).saturating_sub(base);
    let (mut kept, mut cut) = (Vec::new(), 0u64);
    for t in threads {
        let size = len(&t) + 1;
        if size <= budget {
            budget -= size;
            kept.push(t);
        } else if kept.is_empty() {
            // The crashing thread comes first: keep its innermost frames.
            let t = trim_frames(t, budget);
            budget = budget.saturating_sub(len(&t) + 1);
            kept.push(t);
        } else {
            cut += 1;
        }
    }
    obj.insert("threads".into(), Value::Array(kept));
    obj.insert("threads_cut".into(), Value::from(cut));
    let line = serde_json::to_string(&Value::Object(obj.clone())).unwrap_or_default();
    if line.len() < MAX_LINE {
        return line;
    }
    // Huge fields elsewhere (a command line of megabytes): the identity
    // and the signal only.
    minimal(&obj)
}

fn trim_frames(mut t: Value, budget: usize) -> Value {
    let Some(frames) = t.get_mut("frames").map(Value::take) else {
        return t;
    };
    let frames = match frames {
        Value::Array(f) => f,
        _ => Vec::new(),
    };
    t["frames"] = Value::Array(Vec::new());
    t["truncated"] = Value::Bool(true);
    let mut left = budget.saturating_sub(len(&t) + 32);
    let total = frames.len();
    let mut kept = Vec::new();
    for f in frames {
        let size = len(&f) + 1;
        if size > left {
            break;
        }
        left -= size;
        kept.push(f);
    }
    t["frames_cut"] = Value::from((total - kept.len()) as u64);
    t["frames"] = Value::Array(kept);
    t
}

fn minimal(obj: &Map<String, Value>) -> String {
    let mut m = Map::new();
    for k in [
        "schema",
        "kind",
        "time",
        "host",
        "node",
        "signal",
        "oom_kill",
        "lost_events",
        "signature",
        "suppressed",
    ] {
        if let Some(v) = obj.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    let mut process = Map::new();
    if let Some(Value::Object(p)) = obj.get("process") {
        for k in ["pid", "ns_pid", "uid", "container_id", "k8s"] {
            if let Some(v) = p.get(k) {
                process.insert(k.into(), v.clone());
            }
        }
        let short = |k: &str| {
            p.get(k)
                .and_then(Value::as_str)
                .map(|s| Value::from(s.chars().take(256).collect::<String>()))
                .unwrap_or(Value::Null)
        };
        process.insert("comm".into(), short("comm"));
        process.insert("exe".into(), short("exe"));
    }
    m.insert("process".into(), Value::Object(process));
    m.insert("threads".into(), Value::Array(Vec::new()));
    m.insert("truncated_report".into(), Value::Bool(true));
    let line = serde_json::to_string(&Value::Object(m)).unwrap_or_default();
    if line.len() < MAX_LINE {
        line
    } else {
        // Only a hostile k8s identity could get here; still one valid line.
        r#"{"schema":"rfh-trace.report.v1","kind":"crash","time":"","host":"","lost_events":0,"process":{"pid":0,"comm":"","exe":null},"threads":[],"truncated_report":true}"#.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::signature::tests::crash,
        report::{Frame, NativeFrame, Thread},
    };

    fn big_report(threads: usize, frames: usize) -> Value {
        let mut r = crash(0x5555_0000_0000, &[Some("crash_here"), Some("main")]);
        let frame = |i: usize| {
            Frame::Native(NativeFrame {
                address: 0x1000 + i as u64,
                module: Some("/usr/lib/x86_64-linux-gnu/libexample.so.1".into()),
                function: Some(format!("example::deeply::nested::function_{i}<T>")),
                file: Some("/build/src/example/deeply/nested.rs".into()),
                line: Some(i as u32),
                ..NativeFrame::default()
            })
        };
        r.threads = (0..threads)
            .map(|t| Thread {
                tid: t as u32,
                current: t == 0,
                name: format!("worker-{t}"),
                frames: (0..frames).map(frame).collect(),
                ..Thread::default()
            })
            .collect();
        serde_json::to_value(&r).unwrap()
    }

    #[test]
    fn small_reports_are_untouched() {
        let v = big_report(1, 3);
        let line = fit(v.clone());
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), v);
        assert!(!line.contains("truncated_report"));
    }

    #[test]
    fn big_reports_are_cut_and_marked() {
        for (threads, frames) in [(200, 30), (1, 2000), (50, 300)] {
            let line = fit(big_report(threads, frames));
            assert!(line.len() < MAX_LINE, "{threads}x{frames}: {}", line.len());
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["truncated_report"], true);
            let first = &v["threads"][0];
            assert_eq!(first["current"], true, "the crashing thread stays");
            assert_eq!(
                first["frames"][0]["function"], "example::deeply::nested::function_0<T>",
                "innermost frames stay"
            );
            let kept = v["threads"].as_array().unwrap().len() as u64;
            assert_eq!(kept + v["threads_cut"].as_u64().unwrap(), threads as u64);
        }
    }

    #[test]
    fn huge_fields_fall_back_to_identity() {
        let mut v = big_report(1, 1);
        v["process"]["cmdline"] = Value::from(vec!["x".repeat(100_000)]);
        let line = fit(v);
        assert!(line.len() < MAX_LINE);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["truncated_report"], true);
        assert_eq!(v["signal"]["name"], "SIGSEGV");
    }
}
