//! Redaction of the examples: what differs between machines and runs is
//! rewritten, so that `cargo xtask examples` gives the same files on any
//! host: pids and tids (numbered from 4242 in order of appearance in each
//! file, the process first), times, the host name, uid and cgroup, the
//! build and workspace directories (`/path/to`), GNU build-ids, CPU sample
//! counts, and every address above 4 GiB (`0x55…` for the executable's
//! range, `0x7f…` for libraries and stacks), whose value depends on ASLR.
//! Offsets within functions and modules are kept. Libraries under
//! /lib/x86_64-linux-gnu are shown under /usr/lib: on a merged-/usr system
//! that is one directory, and which name a report gives depends on whether
//! rfh-trace read /proc before the process died.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use regex::{Captures, Regex};
use serde_json::Value;

const TIME: &str = "2026-01-01T00:00:00.000000Z";
const HOST: &str = "my-host";
const UID: u64 = 1000;
const CGROUP: &str = "/user.slice/user-1000.slice/session-1.scope";
const FIRST_PID: u64 = 4242;

#[derive(Clone, Copy)]
pub(super) enum Format {
    Text,
    Json,
}

/// Rewrites what differs between machines and runs (see the module comment).
pub(super) struct Redact {
    /// (found, shown instead), longest first.
    paths: Vec<(String, String)>,
    host: String,
    time: Regex,
    process: Regex,
    ids: Regex,
    addr: Regex,
    samples: Regex,
    sample_count: Regex,
    innermost: Regex,
}

impl Redact {
    /// `work`: where the programs are built and run; `root`: the workspace.
    pub(super) fn new(work: &Path, root: &Path) -> Result<Self> {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self::with_host(work, root, host)
    }

    fn with_host(work: &Path, root: &Path, host: String) -> Result<Self> {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let mut paths = Vec::new();
        for (p, shown) in [(work, "/path/to"), (root, "/path/to/rfh-trace")] {
            for form in [p.to_path_buf(), canon(p)] {
                paths.push((form.to_string_lossy().into_owned(), shown.to_string()));
            }
        }
        paths.sort_by_key(|(found, _)| std::cmp::Reverse(found.len()));
        paths.dedup();
        Ok(Self {
            paths,
            host,
            time: Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z")?,
            process: Regex::new(r"Process (\d+)")?,
            ids: Regex::new(r"\b(Process|[Tt]hread|pid|tid) (\d+)\b")?,
            addr: Regex::new(r"( {2,})?\b0x([0-9a-f]{9,})\b")?,
            samples: Regex::new(r"CPU profile \(\d+ samples?\)")?,
            sample_count: Regex::new(r"%  \(\d+\) ")?,
            innermost: Regex::new(r"(\(most recent call first\):\n +\S+ in \S+?)\+0x[0-9a-f]+ ")?,
        })
    }

    pub(super) fn report(&self, raw: &str, format: Format) -> Result<String> {
        ensure!(!raw.trim().is_empty(), "rfh-trace wrote no report");
        match format {
            Format::Text => Ok(self.text(raw)),
            Format::Json => {
                let mut out = String::new();
                for line in raw.lines().filter(|l| !l.trim().is_empty()) {
                    let mut v: Value = serde_json::from_str(line)
                        .with_context(|| format!("a report line is not JSON: {line}"))?;
                    let mut pids = Pids::default();
                    if let Some(p) = v.pointer("/process/pid").and_then(Value::as_u64) {
                        pids.map(p);
                    }
                    self.json(None, &mut v, &mut pids);
                    out.push_str(&serde_json::to_string_pretty(&v)?);
                    out.push('\n');
                }
                Ok(out)
            }
        }
    }

    fn paths(&self, s: &str) -> String {
        const LIB: &str = "/lib/x86_64-linux-gnu/";
        let mut s = s.to_string();
        for (found, shown) in &self.paths {
            s = s.replace(found.as_str(), shown);
        }
        // A module in text output, `(/lib/...)`, or a JSON string.
        s = s.replace(&format!("({LIB}"), &format!("(/usr{LIB}"));
        match s.strip_prefix(LIB) {
            Some(rest) => format!("/usr{LIB}{rest}"),
            None => s,
        }
    }

    fn text(&self, raw: &str) -> String {
        let mut pids = Pids::default();
        for c in self.process.captures_iter(raw) {
            pids.map(c[1].parse().unwrap_or(0));
        }
        let s = self.paths(raw);
        let host = format!(" on {} at ", self.host);
        let s = s.replace(&host, &format!(" on {HOST} at "));
        let s = self.time.replace_all(&s, TIME);
        let s = self.ids.replace_all(&s, |c: &Captures| {
            format!("{} {}", &c[1], pids.map(c[2].parse().unwrap_or(0)))
        });
        let s = self.addr.replace_all(&s, |c: &Captures| {
            let shown = redact_addr(&c[2]);
            match c.get(1) {
                // Right-aligned in a column: keep the column.
                Some(pad) => {
                    let width = pad.as_str().len() + 2 + c[2].len();
                    format!("{shown:>width$}")
                }
                None => shown.to_string(),
            }
        });
        let s = self.samples.replace_all(&s, "CPU profile (N samples)");
        self.sample_count.replace_all(&s, "%  (N) ").into_owned()
    }

    /// The offset in each thread's innermost function, as `+0x…`.
    pub(super) fn innermost_offsets(&self, text: &str) -> String {
        self.innermost.replace_all(text, "${1}+0x… ").into_owned()
    }

    fn json(&self, key: Option<&str>, v: &mut Value, pids: &mut Pids) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    self.json(Some(k), x, pids);
                }
            }
            Value::Array(items) => {
                for x in items {
                    self.json(key, x, pids);
                }
            }
            Value::String(s) => {
                *s = match key {
                    Some("time") => TIME.to_string(),
                    Some("host") => HOST.to_string(),
                    Some("cgroup") => CGROUP.to_string(),
                    Some("build_id") => "<build-id>".to_string(),
                    Some("address") => match s.strip_prefix("0x") {
                        Some(hex) if hex.len() >= 9 => redact_addr(hex).to_string(),
                        _ => s.clone(),
                    },
                    _ => self.paths(s),
                };
            }
            Value::Number(n) => match (key, n.as_u64()) {
                (Some("pid" | "tid" | "sender_pid" | "ns_pid" | "ns_tid"), Some(id)) => {
                    *v = Value::from(pids.map(id));
                }
                (Some("uid"), Some(_)) => *v = Value::from(UID),
                _ => {}
            },
            Value::Null | Value::Bool(_) => {}
        }
    }
}

/// What an address above 4 GiB is shown as: its region, not its value.
fn redact_addr(hex: &str) -> &'static str {
    let v = u64::from_str_radix(hex, 16).unwrap_or(0);
    if v >= 0x7e00_0000_0000 {
        "0x7f…"
    } else if (0x5500_0000_0000..0x5700_0000_0000).contains(&v) {
        "0x55…"
    } else {
        "0x…"
    }
}

/// Real pids and tids to example ones, in order of first appearance.
#[derive(Default)]
struct Pids(HashMap<u64, u64>);

impl Pids {
    fn map(&mut self, id: u64) -> u64 {
        let next = FIRST_PID + self.0.len() as u64;
        *self.0.entry(id).or_insert(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact() -> Redact {
        Redact::with_host(
            Path::new("/ws/target/examples"),
            Path::new("/ws"),
            "box7".into(),
        )
        .unwrap()
    }

    #[test]
    fn text_is_neutral_and_keeps_its_columns() {
        let raw = "\
Stack dump on signal SIGUSR1 (User defined signal 1), code SI_USER (sent by kill, sigsend), sent by pid 900
Process 31229 \"app\" /ws/target/examples/app on box7 at 2026-12-01T05:02:28.913314Z

Current thread 31229 \"app\" (most recent call first):
      0x5651594e51f0 in f+0x0 at /ws/tests/programs/app.c:13 (/ws/target/examples/app)
           (inlined) in g at ./x.c:1 (/lib/x86_64-linux-gnu/libc.so.6)
      0x7f7bf865824a in h+0x7a at ./y.c:58 (/lib/x86_64-linux-gnu/libc.so.6)

Thread 31230 \"worker\" (most recent call first):
                 0x0 in ??
";
        let want = "\
Stack dump on signal SIGUSR1 (User defined signal 1), code SI_USER (sent by kill, sigsend), sent by pid 4243
Process 4242 \"app\" /path/to/app on my-host at 2026-01-01T00:00:00.000000Z

Current thread 4242 \"app\" (most recent call first):
               0x55… in f+0x0 at /path/to/rfh-trace/tests/programs/app.c:13 (/path/to/app)
           (inlined) in g at ./x.c:1 (/usr/lib/x86_64-linux-gnu/libc.so.6)
               0x7f… in h+0x7a at ./y.c:58 (/usr/lib/x86_64-linux-gnu/libc.so.6)

Thread 4244 \"worker\" (most recent call first):
                 0x0 in ??
";
        let r = redact();
        assert_eq!(r.report(raw, Format::Text).unwrap(), want);
        assert_eq!(
            r.innermost_offsets(want).lines().nth(4),
            Some(
                "               0x55… in f+0x… at /path/to/rfh-trace/tests/programs/app.c:13 (/path/to/app)"
            )
        );
        // A fault address is not in a column.
        let t = r.text("Fatal signal SIGSEGV, address 0x7fff428bdf80\n");
        assert_eq!(t, "Fatal signal SIGSEGV, address 0x7f…\n");
    }

    #[test]
    fn json_is_neutral() {
        let raw = r#"{"time":"2026-12-01T05:03:03.772221Z","host":"box7","process":{"pid":77,"exe":"/ws/target/examples/t","cmdline":["/ws/target/examples/t"],"uid":0,"cgroup":"/"},"signal":{"address":"0x0","sender_pid":null},"threads":[{"tid":78,"frames":[{"address":"0x7f46af5b024a","module":"/lib/x86_64-linux-gnu/libc.so.6","build_id":"93ac"}]},{"tid":77,"frames":[]}]}"#;
        let out = redact().report(raw, Format::Json).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["time"], TIME);
        assert_eq!(v["host"], HOST);
        assert_eq!(v["process"]["pid"], 4242);
        assert_eq!(v["process"]["exe"], "/path/to/t");
        assert_eq!(v["process"]["cmdline"][0], "/path/to/t");
        assert_eq!(v["process"]["uid"], UID);
        assert_eq!(v["process"]["cgroup"], CGROUP);
        assert_eq!(v["signal"]["address"], "0x0");
        assert!(v["signal"]["sender_pid"].is_null());
        let f = &v["threads"][0]["frames"][0];
        assert_eq!(v["threads"][0]["tid"], 4243);
        assert_eq!(v["threads"][1]["tid"], 4242);
        assert_eq!(f["address"], "0x7f…");
        assert_eq!(f["module"], "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(f["build_id"], "<build-id>");
    }

    #[test]
    fn addresses_by_region() {
        assert_eq!(redact_addr("7ffc12345678"), "0x7f…");
        assert_eq!(redact_addr("7e0000000000"), "0x7f…");
        assert_eq!(redact_addr("555555554000"), "0x55…");
        assert_eq!(redact_addr("56ffffffffff"), "0x55…");
        assert_eq!(redact_addr("100000000"), "0x…");
    }
}
