//! Crash signatures: one fingerprint per bug, the same on every host and
//! every run. Built from the faulting module's build-id, the signal and
//! its code, and the top frames of the crashing thread, each as its
//! symbol or, without one, build-id + file offset. Never an absolute
//! address: ASLR moves those on every run.

use crate::report::{Frame, Report};

/// Frames of the crashing thread that go into the signature.
const TOP_FRAMES: usize = 6;

/// `fnv1a64` of the canonical text, as `v1-<16 hex>`; None for a report
/// without a crashing thread.
pub fn signature(report: &Report) -> Option<String> {
    canonical(report).map(|text| format!("v1-{:016x}", fnv1a64(text.as_bytes())))
}

/// The text the signature hashes, e.g.
/// `SIGSEGV/SEGV_MAPERR|3a4f…|crasher!crash_here|crasher!main|3b9c…+0x29d90`.
pub fn canonical(report: &Report) -> Option<String> {
    let thread = report.threads.iter().find(|t| t.current)?;
    let mut parts = Vec::with_capacity(TOP_FRAMES + 2);
    parts.push(match &report.signal {
        Some(s) => match s.code_name {
            Some(code) => format!("{}/{code}", s.name),
            None => format!("{}/{}", s.name, s.code),
        },
        None => "-".into(),
    });
    let natives = thread
        .frames
        .iter()
        .filter_map(Frame::native)
        .filter(|f| !f.signal_frame);
    let faulting = natives
        .clone()
        .find(|f| f.module.is_some())
        .map(|f| {
            f.build_id
                .clone()
                .or_else(|| f.module.as_deref().map(basename))
        })
        .unwrap_or_default();
    parts.push(faulting.unwrap_or_else(|| "?".into()));
    for f in thread.frames.iter().take(TOP_FRAMES) {
        parts.push(frame_key(f));
    }
    Some(parts.join("|"))
}

fn basename(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// One frame, position-independent.
fn frame_key(frame: &Frame) -> String {
    match frame {
        Frame::Python(p) => format!("py:{}:{}", basename(&p.file), p.function),
        Frame::Native(n) if n.signal_frame => "<signal>".into(),
        Frame::Native(n) => {
            let module = n.module.as_deref().map(basename);
            match (&n.function, &n.build_id, n.module_offset) {
                (Some(func), _, _) => format!("{}!{func}", module.unwrap_or_default()),
                (None, Some(id), Some(off)) => format!("{id}+{off:#x}"),
                (None, None, Some(off)) => format!("{}+{off:#x}", module.unwrap_or_default()),
                // Outside every mapping: nothing stable to say about it.
                _ => "?".into(),
            }
        }
    }
}

/// FNV-1a, 64 bits: stable across versions and hosts, unlike std's
/// randomly keyed hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{Kind, NativeFrame, Process, SCHEMA, Signal, Thread};

    pub(crate) fn crash(base: u64, funcs: &[Option<&str>]) -> Report {
        let frames = funcs
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Frame::Native(NativeFrame {
                    address: base + 0x1000 + i as u64 * 0x10,
                    module: Some("/opt/app/bin/crasher".into()),
                    module_offset: Some(0x1000 + i as u64 * 0x10),
                    build_id: Some("ab12cd".into()),
                    function: f.map(str::to_string),
                    ..NativeFrame::default()
                })
            })
            .collect();
        Report {
            schema: SCHEMA,
            kind: Kind::Crash,
            time: "2026-01-01T00:00:00.000000Z".into(),
            host: "h".into(),
            node: None,
            process: Process::default(),
            signal: Some(Signal {
                number: 11,
                name: "SIGSEGV".into(),
                code: 1,
                code_name: Some("SEGV_MAPERR"),
                address: Some(base + 0x10),
                ..Signal::default()
            }),
            oom_kill: false,
            threads: vec![Thread {
                current: true,
                frames,
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
    fn same_bug_same_signature_whatever_the_load_address() {
        let a = crash(0x5555_0000_0000, &[Some("crash_here"), Some("main")]);
        let b = crash(0x7f00_1234_0000, &[Some("crash_here"), Some("main")]);
        assert_eq!(signature(&a), signature(&b));
        assert!(signature(&a).unwrap().starts_with("v1-"));
        let text = canonical(&a).unwrap();
        assert_eq!(
            text,
            "SIGSEGV/SEGV_MAPERR|ab12cd|crasher!crash_here|crasher!main"
        );
        assert!(!text.contains("5555"), "no absolute address: {text}");
    }

    #[test]
    fn unsymbolized_frames_use_build_id_and_offset() {
        let a = crash(0x5555_0000_0000, &[None, Some("main")]);
        let b = crash(0x7f00_0000_0000, &[None, Some("main")]);
        assert_eq!(signature(&a), signature(&b));
        assert!(canonical(&a).unwrap().contains("ab12cd+0x1000"));
    }

    #[test]
    fn different_bugs_differ() {
        let a = crash(0, &[Some("crash_here"), Some("main")]);
        let b = crash(0, &[Some("other"), Some("main")]);
        assert_ne!(signature(&a), signature(&b));
        let mut c = a.clone();
        if let Some(s) = c.signal.as_mut() {
            s.name = "SIGBUS".into();
            s.code_name = Some("BUS_ADRERR");
        }
        assert_ne!(signature(&a), signature(&c));
        let mut none = a.clone();
        none.threads.clear();
        assert_eq!(signature(&none), None);
    }

    #[test]
    fn fnv_known_vector() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
