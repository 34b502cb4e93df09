//! Python stacks into report threads: which Python thread a captured
//! thread is, where its frames come from (the kernel's copy at signal
//! time, or the live process after a dump), and the merge of them into
//! the thread's native frames as `--stack` asks.

use faulthandler_common::{SIG_F_DUMP, SIG_F_PYTHON_LOST, SIG_F_SAMPLE};

use super::discover::PyTarget;
use super::kernel::{decode_stack, py_proc};
use super::merge::{MergedFrame, is_eval_frame, merge};
use super::walk::{PyFrame, PyWalk};
use crate::cli::StackMode;
use crate::decode::SignalCapture;
use crate::report::{Frame, PythonFrame, Thread};

/// One thread's Python stack, wherever it came from.
#[derive(Debug, Default)]
pub(crate) struct ThreadPython {
    /// Innermost first.
    pub frames: Vec<PyFrame>,
    /// Why the frames are missing or incomplete.
    pub error: Option<String>,
    /// More frames than were read.
    pub truncated: bool,
    pub python_name: Option<String>,
}

/// The Python thread of a live walk that is the captured thread `cap`:
/// by its tid in its own PID namespace (3.11+ record it), else by its
/// pthread_t, which on glibc is its fs base (3.8–3.10).
pub(crate) fn live_thread(walk: &PyWalk, cap: &SignalCapture) -> Option<ThreadPython> {
    let ev = &cap.event;
    let t = walk.threads.iter().find(|t| match t.native_tid {
        Some(tid) => tid == ev.ns_tid && tid != 0,
        None => t.pthread_id.is_some_and(|p| p == ev.fsbase && p != 0),
    })?;
    Some(ThreadPython {
        frames: t.frames.clone(),
        error: t.error.as_ref().map(|e| e.reason()),
        truncated: false,
        python_name: t.python_name.clone(),
    })
}

/// The Python stack of a thread the kernel captured at a signal, from its
/// `EVENT_PYSTACK` record. `None`: the thread runs no Python (or the
/// process none we can read, said once for the whole report).
pub(crate) fn signal_thread(target: &PyTarget, cap: &SignalCapture) -> Option<ThreadPython> {
    let ev = &cap.event;
    if ev.flags & (SIG_F_DUMP | SIG_F_SAMPLE) != 0 {
        return None;
    }
    let Some(rec) = &cap.python else {
        let why = if ev.flags & SIG_F_PYTHON_LOST != 0 {
            "their record did not fit in the ring buffer".to_string()
        } else if let Err(e) = py_proc(target) {
            e.reason()
        } else {
            "the interpreter was not known yet when the thread was captured (just after exec \
             or attach)"
                .to_string()
        };
        return Some(ThreadPython {
            error: Some(why),
            ..ThreadPython::default()
        });
    };
    let k = decode_stack(target, &rec.event, &rec.regions);
    if k.no_thread {
        return None;
    }
    Some(ThreadPython {
        frames: k.frames,
        error: k.error,
        truncated: k.truncated,
        python_name: None,
    })
}

fn python_frame(p: PyFrame) -> Frame {
    Frame::Python(PythonFrame {
        address: p.instr_addr.unwrap_or(0),
        function: p.function,
        qualified_name: p.qualified_name,
        file: p.file,
        line: p.line,
        approximate: p.approximate,
    })
}

fn is_eval(f: &Frame) -> bool {
    f.native()
        .and_then(|n| n.function.as_deref())
        .is_some_and(is_eval_frame)
}

/// Puts `py` into `thread` (native frames only so far) as `mode` asks.
/// A thread with calls of the eval loop but no Python stack says why.
pub(crate) fn apply(thread: &mut Thread, py: Option<ThreadPython>, mode: StackMode) {
    if mode == StackMode::Native {
        return;
    }
    // Worth a line: a thread that ran Python, or whose native stack may
    // have been cut before its eval-loop frames.
    let runs_python = thread.frames.iter().any(is_eval) || thread.current || thread.error.is_some();
    let Some(py) = py else {
        if mode == StackMode::Python {
            thread.frames.clear();
        }
        return;
    };
    thread.python_name = py.python_name;
    let mut note = match (&py.error, py.frames.is_empty()) {
        (Some(e), true) if runs_python || mode == StackMode::Python => {
            Some(format!("Python frames unavailable: {e}"))
        }
        (Some(e), false) => Some(format!("Python frames incomplete: {e}")),
        _ => None,
    };
    if py.truncated && note.is_none() {
        note = Some("Python frames incomplete: the older ones were not read".into());
    }
    match mode {
        StackMode::Python => {
            thread.frames = py.frames.into_iter().map(python_frame).collect();
            // How the native stack was unwound says nothing of these.
            thread.unwind = None;
        }
        StackMode::Merged | StackMode::Native => {
            let native = std::mem::take(&mut thread.frames);
            let cut = thread.truncated || thread.error.is_some();
            let merged = merge(native, py.frames, is_eval, |p: &PyFrame| p.is_entry, cut);
            if let Some(m) = merged.mismatch
                && m.python_calls > 0
            {
                note.get_or_insert_with(|| format!("Python frames not merged: {m}"));
            }
            thread.frames = merged
                .frames
                .into_iter()
                .map(|f| match f {
                    MergedFrame::Native(n) => n,
                    MergedFrame::Python(p) => python_frame(p),
                })
                .collect();
        }
    }
    thread.python_error = note;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::NativeFrame;

    fn native(name: &str) -> Frame {
        Frame::Native(NativeFrame {
            function: Some(name.into()),
            ..NativeFrame::default()
        })
    }

    fn py(name: &str, is_entry: bool) -> PyFrame {
        PyFrame {
            code_addr: 0x1000,
            function: name.into(),
            qualified_name: None,
            file: "/app/x.py".into(),
            line: Some(3),
            instr_addr: Some(0x2000),
            is_entry,
            approximate: false,
        }
    }

    fn names(t: &Thread) -> Vec<String> {
        t.frames
            .iter()
            .map(|f| match f {
                Frame::Python(p) => format!("py:{}", p.function),
                f => f.function().unwrap_or("??").to_string(),
            })
            .collect()
    }

    fn thread() -> Thread {
        Thread {
            frames: vec![
                native("strlen"),
                native("_PyEval_EvalFrameDefault"),
                native("main"),
            ],
            ..Thread::default()
        }
    }

    fn stack() -> ThreadPython {
        ThreadPython {
            frames: vec![py("inner", false), py("outer", true)],
            ..ThreadPython::default()
        }
    }

    #[test]
    fn modes() {
        let mut t = thread();
        apply(&mut t, Some(stack()), StackMode::Merged);
        assert_eq!(names(&t), ["strlen", "py:inner", "py:outer", "main"]);
        assert_eq!(t.python_error, None);

        let mut t = thread();
        apply(&mut t, Some(stack()), StackMode::Python);
        assert_eq!(names(&t), ["py:inner", "py:outer"]);

        let mut t = thread();
        apply(&mut t, Some(stack()), StackMode::Native);
        assert_eq!(names(&t), ["strlen", "_PyEval_EvalFrameDefault", "main"]);
    }

    #[test]
    fn missing_and_disagreeing_stacks_say_why() {
        let mut t = thread();
        let none = ThreadPython {
            error: Some("paged out".into()),
            ..ThreadPython::default()
        };
        apply(&mut t, Some(none), StackMode::Merged);
        assert_eq!(t.frames.len(), 3);
        assert_eq!(
            t.python_error.as_deref(),
            Some("Python frames unavailable: paged out")
        );

        let mut t = thread();
        let two_calls = ThreadPython {
            frames: vec![py("a", true), py("b", true)],
            ..ThreadPython::default()
        };
        apply(&mut t, Some(two_calls), StackMode::Merged);
        assert!(
            t.python_error
                .as_deref()
                .is_some_and(|e| e.starts_with("Python frames not merged")),
            "{:?}",
            t.python_error
        );
        assert_eq!(names(&t).len(), 5, "native then Python");

        // A thread with no eval frames and nothing to read: no line.
        let mut t = Thread {
            frames: vec![native("poll")],
            ..Thread::default()
        };
        let none = ThreadPython {
            error: Some("x".into()),
            ..ThreadPython::default()
        };
        apply(&mut t, Some(none), StackMode::Merged);
        assert_eq!(t.python_error, None);
    }
}
