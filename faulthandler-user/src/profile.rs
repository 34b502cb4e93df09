//! CPU profile of the watched processes: timer-driven samples, each an
//! unwound and symbolized stack, aggregated into counts per distinct stack.
//!
//! Stacks are aggregated by thread name and function names (inlined frames
//! included), so samples at different lines of the same functions add up;
//! the `file:line` shown for a stack is that of its most frequent variant.
//! Rendered as a "top stacks" list (text and JSON) and as a flame graph SVG.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::{escape::escape, report::Frame};

/// Most distinct `file:line` variants remembered per stack; later new
/// variants are still counted in the stack, only not as a variant.
const MAX_PLACES: usize = 64;

/// Where one frame of a sample was: file and line, when known.
type Place = Option<(String, Option<u32>)>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Stack {
    thread: String,
    /// Frame names, innermost first.
    names: Vec<String>,
}

#[derive(Debug, Default)]
struct Entry {
    count: u64,
    /// Per-frame places (same length as the stack's names) → samples.
    places: HashMap<Vec<Place>, u64>,
}

impl Entry {
    /// The most frequent places; ties go to the smallest, so output is
    /// deterministic.
    fn best_places(&self) -> Option<&Vec<Place>> {
        self.places
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(p, _)| p)
    }
}

/// The report's `profile`: the most frequent stacks (see
/// [`Profile::summary`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileSummary {
    pub samples: u64,
    pub top: Vec<TopStack>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopStack {
    pub count: u64,
    pub percent: f64,
    pub thread: String,
    /// Innermost first, each with the file:line of its most frequent variant.
    pub frames: Vec<String>,
    /// The bare function names, for the text form.
    #[serde(skip)]
    pub names: Vec<String>,
}

impl ProfileSummary {
    /// Text block for the text report: `CPU profile (N samples):` then one
    /// line per stack, `  12.5%  (25) thread: f <- g <- h` (innermost first).
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "CPU profile ({} sample{}):\n",
            self.samples,
            if self.samples == 1 { "" } else { "s" }
        );
        for t in &self.top {
            // Names come from the process: escaped, as everything it
            // controls in a text report.
            let chain = if t.names.is_empty() {
                "(no frames)".to_string()
            } else {
                let names: Vec<_> = t.names.iter().map(|n| escape(n)).collect();
                names.join(" <- ")
            };
            out.push_str(&format!(
                "  {:.1}%  ({}) {}: {}\n",
                t.percent,
                t.count,
                escape(&t.thread),
                chain
            ));
        }
        out
    }
}

/// CPU samples aggregated by stack: folded stacks → count.
#[derive(Debug, Default)]
pub struct Profile {
    samples: u64,
    stacks: HashMap<Stack, Entry>,
}

/// A frame's name in profiles: its function, or `?? (module file name)`
/// (`??` alone when the module is unknown too).
fn frame_name(f: &Frame) -> String {
    match f.function().filter(|s| !s.is_empty()) {
        Some(func) => func.to_string(),
        None => match f
            .native()
            .and_then(|n| n.module.as_deref())
            .filter(|s| !s.is_empty())
        {
            Some(module) => {
                let base = module.rsplit('/').next().unwrap_or(module);
                format!("?? ({base})")
            }
            None => "??".to_string(),
        },
    }
}

fn percent(count: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    (count as f64 * 1000.0 / total as f64).round() / 10.0
}

/// A name usable as one frame of a folded line: no `;` (the separator), no
/// control characters (line breaks), not empty.
fn folded_frame(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let s = s.trim();
    if s.is_empty() {
        "??".to_string()
    } else {
        s.to_string()
    }
}

impl Profile {
    /// One CPU sample of thread `thread_name`; frames innermost first.
    pub fn add(&mut self, thread_name: &str, frames: &[Frame]) {
        self.samples += 1;
        let key = Stack {
            thread: thread_name.to_string(),
            names: frames.iter().map(frame_name).collect(),
        };
        let places: Vec<Place> = frames
            .iter()
            .map(|f| match f {
                Frame::Native(n) => n.file.clone().map(|file| (file, n.line)),
                Frame::Python(p) => Some((p.file.clone(), p.line)),
            })
            .collect();
        let entry = self.stacks.entry(key).or_default();
        entry.count += 1;
        let room = entry.places.len() < MAX_PLACES;
        match entry.places.get_mut(&places) {
            Some(n) => *n += 1,
            None if room => {
                entry.places.insert(places, 1);
            }
            None => {}
        }
    }

    #[cfg(test)]
    /// Samples added since creation or the last [`clear`](Self::clear).
    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    #[cfg(test)]
    pub fn clear(&mut self) {
        self.samples = 0;
        self.stacks.clear();
    }

    /// Stacks by decreasing count (ties by thread, then names).
    fn sorted(&self) -> Vec<(&Stack, &Entry)> {
        let mut v: Vec<_> = self.stacks.iter().collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        v
    }

    #[cfg(test)]
    /// The `top` most frequent stacks, as (count, frames innermost-first
    /// names). Names are function names (inlined ones included), or
    /// `?? (module)` for frames without a symbol.
    pub fn top(&self, n: usize) -> Vec<(u64, Vec<String>)> {
        self.sorted()
            .into_iter()
            .take(n)
            .map(|(s, e)| (e.count, s.names.clone()))
            .collect()
    }

    /// JSON value for the report's `profile` field, with the `n` most
    /// frequent stacks:
    ///
    /// ```json
    /// {
    ///   "samples": 200,
    ///   "top": [
    ///     {"count": 25, "percent": 12.5, "thread": "worker",
    ///      "frames": ["spin (/src/busy.c:7)", "main (/src/busy.c:12)", "?? (libc.so.6)"]}
    ///   ]
    /// }
    /// ```
    ///
    /// `samples` counts all samples; `top` is sorted by decreasing `count`;
    /// `percent` is `count` out of `samples`, rounded to one decimal.
    /// `frames` is innermost first, each `function (file:line)`, or
    /// `function (file)` without a line, or `function` without a file;
    /// `function` is `??` or `?? (module file name)` when unknown. The
    /// `file:line` are those of the stack's most frequent variant (samples
    /// in the same functions at other lines count in the same entry).
    pub fn summary(&self, n: usize) -> ProfileSummary {
        let top = self
            .sorted()
            .into_iter()
            .take(n)
            .map(|(s, e)| {
                let places = e.best_places();
                let frames = s
                    .names
                    .iter()
                    .enumerate()
                    .map(
                        |(i, name)| match places.and_then(|p| p.get(i)).and_then(|p| p.as_ref()) {
                            Some((file, Some(line))) => format!("{name} ({file}:{line})"),
                            Some((file, None)) => format!("{name} ({file})"),
                            None => name.clone(),
                        },
                    )
                    .collect();
                TopStack {
                    count: e.count,
                    percent: percent(e.count, self.samples),
                    thread: s.thread.clone(),
                    frames,
                    names: s.names.clone(),
                }
            })
            .collect();
        ProfileSummary {
            samples: self.samples,
            top,
        }
    }

    /// The folded-stack lines of all samples (`thread;outer;...;inner N`),
    /// as flamegraph.pl and inferno read them.
    fn folded(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .stacks
            .iter()
            .map(|(s, e)| {
                let mut line = folded_frame(&s.thread);
                for name in s.names.iter().rev() {
                    line.push(';');
                    line.push_str(&folded_frame(name));
                }
                // The count is the last space-separated field, and a second
                // number before it would be read as a differential count:
                // keep the stack from ending in a number by making its last
                // space a no-break one.
                if let Some(i) = line.rfind(' ') {
                    let tail = &line[i + 1..];
                    if tail.chars().all(|c| c.is_ascii_digit() || c == '.') {
                        line.replace_range(i..i + 1, "\u{a0}");
                    }
                }
                // A line starting with "# " is a comment to inferno.
                if line.starts_with("# ") {
                    line.replace_range(1..2, "\u{a0}");
                }
                format!("{line} {}", e.count)
            })
            .collect();
        lines.sort();
        lines
    }

    /// Writes a flame graph SVG of all samples to `path`, titled `title`.
    ///
    /// Each stack is drawn root first under its thread name, with inlined
    /// frames as frames of their own. The file is created with mode 0600 or
    /// truncated; a symbolic link (as the last component) or anything but a
    /// regular file is refused, and nothing is written when there are no
    /// samples (an `InvalidInput` error).
    pub fn write_flamegraph(&self, path: &Path, title: &str) -> io::Result<()> {
        if self.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "no flame graph written to {}: no CPU samples were taken",
                    path.display()
                ),
            ));
        }
        let lines = self.folded();
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = "samples".to_string();
        // Colours from function name hashes: the same function gets the
        // same colour in every graph.
        opts.hash = true;
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg)?;

        let mut file = open_truncate(path)?;
        file.write_all(&svg)
            .and_then(|()| file.flush())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
    }
}

/// Opens `path` for writing from the start through rfh-trace's one safe
/// opener (as the invoking user under sudo, 0600 when created, never a
/// symlink, a pseudo file system or anything but a regular file), then
/// empties it: an SVG cannot be appended to.
fn open_truncate(path: &Path) -> io::Result<std::fs::File> {
    let file = crate::output::open_for(path, "--flamegraph").map_err(|e| {
        let kind = match &e {
            crate::output::OutputError::Open { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
        io::Error::new(kind, format!("{e}{}", cause.unwrap_or_default()))
    })?;
    // The opener appends; the descriptor it checked is the one emptied.
    file.set_len(0)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::NativeFrame;
    use serde_json::json;

    fn native(name: &str, line: u32) -> NativeFrame {
        NativeFrame {
            function: Some(name.to_string()),
            file: Some("/src/prog.c".to_string()),
            line: Some(line),
            module: Some("/tmp/prog".to_string()),
            ..Default::default()
        }
    }

    fn f(name: &str, line: u32) -> Frame {
        Frame::Native(native(name, line))
    }

    fn unknown(module: &str) -> Frame {
        Frame::Native(NativeFrame {
            module: Some(module.to_string()),
            ..Default::default()
        })
    }

    /// 6 samples of spin<-main in "main", 3 of work<-run (work inlined)
    /// in "worker", 1 of an unknown frame in libc.
    fn sample_profile() -> Profile {
        let mut p = Profile::default();
        for i in 0..6 {
            // Two different lines in spin: still one stack.
            let line = if i < 4 { 10 } else { 11 };
            p.add("main", &[f("spin", line), f("main", 20)]);
        }
        for _ in 0..3 {
            let mut w = native("work", 30);
            w.inlined = true;
            p.add(
                "worker",
                &[
                    Frame::Native(w),
                    f("run", 40),
                    unknown("/usr/lib/libc.so.6"),
                ],
            );
        }
        p.add("worker", &[unknown("/usr/lib/libc.so.6")]);
        p
    }

    #[test]
    fn top_orders_by_count() {
        let p = sample_profile();
        assert_eq!(p.samples(), 10);
        assert!(!p.is_empty());
        let top = p.top(10);
        assert_eq!(top.len(), 3);
        assert_eq!(top[0], (6, vec!["spin".to_string(), "main".to_string()]));
        assert_eq!(
            top[1],
            (
                3,
                vec!["work".into(), "run".into(), "?? (libc.so.6)".into()]
            )
        );
        assert_eq!(top[2], (1, vec!["?? (libc.so.6)".to_string()]));
        assert_eq!(p.top(1).len(), 1);
        assert!(p.top(0).is_empty());
    }

    #[test]
    fn json_shape() {
        let p = sample_profile();
        let v = serde_json::to_value(p.summary(2)).unwrap();
        assert_eq!(v["samples"], 10);
        let top = v["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["count"], 6);
        assert_eq!(top[0]["percent"], 60.0);
        assert_eq!(top[0]["thread"], "main");
        // The most frequent line of spin (10, 4 of 6 samples) is shown.
        assert_eq!(
            top[0]["frames"],
            json!(["spin (/src/prog.c:10)", "main (/src/prog.c:20)"])
        );
        assert_eq!(top[1]["percent"], 30.0);
        assert_eq!(top[1]["thread"], "worker");
        assert_eq!(
            top[1]["frames"],
            json!([
                "work (/src/prog.c:30)",
                "run (/src/prog.c:40)",
                "?? (libc.so.6)"
            ])
        );
        let obj = top[0].as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["count", "frames", "percent", "thread"]);
    }

    #[test]
    fn percent_rounds_to_one_decimal() {
        let mut p = Profile::default();
        p.add("t", &[f("a", 1)]);
        p.add("t", &[f("b", 1)]);
        p.add("t", &[f("b", 1)]);
        let v = serde_json::to_value(p.summary(5)).unwrap();
        assert_eq!(v["top"][0]["percent"], 66.7);
        assert_eq!(v["top"][1]["percent"], 33.3);
    }

    #[test]
    fn text_block() {
        let p = sample_profile();
        let t = p.summary(2).to_text();
        assert_eq!(
            t,
            "CPU profile (10 samples):\n\
             \x20 60.0%  (6) main: spin <- main\n\
             \x20 30.0%  (3) worker: work <- run <- ?? (libc.so.6)\n"
        );
    }

    #[test]
    fn clear_and_empty() {
        let mut p = sample_profile();
        p.clear();
        assert!(p.is_empty());
        assert_eq!(p.samples(), 0);
        assert!(p.top(5).is_empty());
        assert_eq!(
            serde_json::to_value(p.summary(5)).unwrap(),
            json!({"samples": 0, "top": []})
        );
        assert_eq!(p.summary(5).to_text(), "CPU profile (0 samples):\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        assert!(p.write_flamegraph(&path, "t").is_err());
        assert!(!path.exists());
    }

    #[test]
    fn folded_lines_are_root_first() {
        let mut p = sample_profile();
        // Awkward names: a separator, a thread name ending in a number
        // with no frames.
        p.add("pool 7", &[]);
        p.add("t", &[f("ns::f<std::array<u8; 8>>", 1)]);
        let lines = p.folded();
        assert!(lines.contains(&"main;main;spin 6".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"worker;?? (libc.so.6);run;work 3".to_string()),
            "{lines:?}"
        );
        assert!(lines.contains(&"pool\u{a0}7 1".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"t;ns::f<std::array<u8: 8>> 1".to_string()),
            "{lines:?}"
        );
    }

    #[test]
    fn flamegraph_svg() {
        let mut p = sample_profile();
        p.add("t", &[f("tmpl<int>", 1)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.svg");
        // An existing, longer file is truncated.
        std::fs::write(&path, "x".repeat(1 << 20)).unwrap();
        p.write_flamegraph(&path, "CPU of prog").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<?xml") || svg.starts_with("<svg"),
            "{}",
            &svg[..100]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        for name in [
            "spin",
            "main",
            "work",
            "run",
            "worker",
            "CPU of prog",
            "tmpl&lt;int&gt;",
        ] {
            assert!(svg.contains(name), "{name} missing");
        }

        let new = dir.path().join("new.svg");
        p.write_flamegraph(&new, "t").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn flamegraph_refuses_symlink_and_non_files() {
        let p = sample_profile();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link.svg");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = p.write_flamegraph(&link, "t").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");

        assert!(p.write_flamegraph(dir.path(), "t").is_err());

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No reader: fails at once instead of hanging.
        assert!(p.write_flamegraph(&fifo, "t").is_err());
    }
}
