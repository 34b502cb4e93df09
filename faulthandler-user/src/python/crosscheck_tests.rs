//! Cross-checks of the walk against other views of the same live process:
//! the target's own faulthandler, and its native stacks (eu-stack).

use std::process::Command;
use std::time::{Duration, Instant};

use super::live_tests::{
    Interp, interpreters, remove_chroot_copies, script_file, settled, start, target_of,
};
use super::walk::PyThread;

/// The merge rule's premise: each thread has as many entry frames as its
/// native stack has `_PyEval_EvalFrameDefault` frames. Checked with
/// eu-stack (which stops the target: fine in a test).
pub(super) fn check_entries_against_native(py: &Interp, pid: u32, threads: &[PyThread]) {
    let mut cmd = Command::new("eu-stack");
    if let Some(root) = &py.root {
        cmd.arg(format!(
            "--debuginfo-path={}",
            root.join("usr/lib/debug").display()
        ));
    }
    let out = match cmd.args(["-n", "0", "-p", &pid.to_string()]).output() {
        Ok(o) => o,
        Err(e) => {
            println!("skip {}: native cross-check: no eu-stack: {e}", py.label);
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stacks: Vec<(u32, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(tid) = line.strip_prefix("TID ") {
            let tid = tid.trim_end_matches(':').parse().unwrap_or(0);
            stacks.push((tid, Vec::new()));
        } else if let (Some(last), Some(rest)) = (stacks.last_mut(), line.strip_prefix('#')) {
            let name = rest.split_whitespace().nth(2).unwrap_or("").to_string();
            last.1.push(name);
        }
    }
    let eval = |n: &String| super::merge::is_eval_frame(n);
    let evals_of = |s: &Vec<String>| s.iter().filter(|n| eval(n)).count();
    // 3.8–3.10 threads carry no tid: compare the counts as multisets.
    let mut native_counts: Vec<usize> = stacks
        .iter()
        .map(|(_, s)| evals_of(s))
        .filter(|&n| n > 0)
        .collect();
    let mut python_counts: Vec<usize> = threads
        .iter()
        .map(|t| t.frames.iter().filter(|f| f.is_entry).count())
        .collect();
    native_counts.sort_unstable();
    python_counts.sort_unstable();
    let unnamed = stacks.iter().any(|(_, s)| s.iter().any(|n| n.is_empty()));
    if native_counts != python_counts && unnamed {
        // Without symbols for every frame (e.g. `_PyEval_EvalFrameDefault.cold`
        // of a stripped build without its debug package) eu-stack cannot count.
        println!(
            "skip {}: native cross-check: eu-stack left frames unnamed: {native_counts:?} vs {python_counts:?}",
            py.label
        );
        return;
    }
    assert_eq!(
        native_counts, python_counts,
        "{}: eval frames per native stack vs entry frames per Python thread: {stacks:?}",
        py.label
    );
    for t in threads {
        let Some(tid) = t.native_tid else { continue };
        let (_, s) = stacks
            .iter()
            .find(|(id, _)| *id == tid)
            .unwrap_or_else(|| panic!("{}: no native stack for tid {tid}", py.label));
        let entries = t.frames.iter().filter(|f| f.is_entry).count();
        assert_eq!(evals_of(s), entries, "{}: thread {tid}: {s:?}", py.label);
    }
    println!(
        "{}: native cross-check ok: eval frames per thread {native_counts:?}",
        py.label
    );
}

/// faulthandler's rendering of a string (`_Py_DumpASCII`): printable ASCII
/// as is, anything else as `\xHH`, `\uHHHH` or `\UHHHHHHHH`.
fn faulthandler_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c as u32 {
            0x20..=0x7e => c.to_string(),
            n @ 0..=0xff => format!("\\x{n:02x}"),
            n @ 0x100..=0xffff => format!("\\u{n:04x}"),
            n => format!("\\U{n:08x}"),
        })
        .collect()
}

/// faulthandler's dump: per thread, its pthread id and its frames as
/// `  File "F", line N in NAME` lines.
fn parse_faulthandler(text: &str) -> Vec<(u64, Vec<String>)> {
    let mut threads: Vec<(u64, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let header = line
            .strip_prefix("Current thread 0x")
            .or_else(|| line.strip_prefix("Thread 0x"));
        if let Some(rest) = header {
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            threads.push((u64::from_str_radix(&hex, 16).unwrap(), Vec::new()));
        } else if let (Some(t), Some(frame)) = (threads.last_mut(), line.strip_prefix("  File ")) {
            t.1.push(format!("File {frame}"));
        }
    }
    threads
}

/// faulthandler prints at most this many frames per thread.
const FAULTHANDLER_MAX_FRAMES: usize = 100;

/// Each thread's frames as the target's own faulthandler prints them
/// (`faulthandler.register(SIGUSR1, all_threads=True)`), up to its 100-frame
/// limit and its first `<invalid frame>`.
#[test]
fn matches_the_targets_faulthandler() {
    let dir = tempfile::tempdir().unwrap();
    let script = script_file(dir.path(), "dumped_é.py");
    let mut tested = Vec::new();
    let interps = interpreters();
    for py in &interps {
        let name = format!("rfh-trace-test-{}-fh-{}.txt", std::process::id(), py.minor);
        let (dump_inside, dump_host) = match &py.root {
            Some(root) => (format!("/tmp/{name}"), root.join("tmp").join(&name)),
            None => {
                let p = dir.path().join(&name);
                (p.to_string_lossy().into_owned(), p)
            }
        };
        let Some(run) = start(py, &script, &[&dump_inside]) else {
            continue;
        };
        let pid = run.child.id();
        let target = target_of(pid).unwrap_or_else(|e| panic!("{}: {e}", py.label));
        let threads = settled(pid, &target);
        // SAFETY: kill has no memory preconditions; pid is our child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) }, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = String::new();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = std::fs::read_to_string(&dump_host).unwrap_or_default();
            if !now.is_empty() && now == text {
                break;
            }
            text = now;
        }
        let _ = std::fs::remove_file(&dump_host);
        let fh = parse_faulthandler(&text);
        assert_eq!(fh.len(), threads.len(), "{}: {text}", py.label);
        for (id, fh_frames) in &fh {
            let t = threads
                .iter()
                .find(|t| t.pthread_id == Some(*id))
                .unwrap_or_else(|| panic!("{}: no thread {id:#x}", py.label));
            let ours: Vec<String> = t
                .frames
                .iter()
                .take(FAULTHANDLER_MAX_FRAMES)
                .map(|f| {
                    let line = f.line.map_or("???".to_string(), |l| l.to_string());
                    format!(
                        "File \"{}\", line {line} in {}",
                        faulthandler_escape(&f.file),
                        faulthandler_escape(&f.function)
                    )
                })
                .collect();
            // 3.14 and 3.15's faulthandler stops at the frame below the
            // `_Py_InitCleanup` shim ("<invalid frame>"); we read on.
            assert!(!fh_frames.is_empty(), "{}: {text}", py.label);
            assert_eq!(
                &ours[..fh_frames.len()],
                &fh_frames[..],
                "{}: thread {id:#x}",
                py.label
            );
        }
        tested.push(py.label.clone());
    }
    remove_chroot_copies(&interps, &script);
    println!("matched faulthandler: {tested:?}");
    assert!(!tested.is_empty(), "no interpreter found to test");
}
