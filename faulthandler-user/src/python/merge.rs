//! One stack out of a thread's native frames and its Python frames: each
//! native call of the eval loop is replaced, in place, by the Python frames
//! it ran (the rule py-spy and pystack use).
//!
//! A call of `_PyEval_EvalFrameDefault` runs one Python frame on 3.8–3.10;
//! from 3.11 on, Python-to-Python calls stay inside the same call, so it
//! runs every frame from the innermost one down to (and including) the next
//! entry frame (`PyFrame::is_entry`). Generic over both frame types so the
//! report model can plug in its own.

use std::fmt;

/// A frame of the merged stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MergedFrame<N, P> {
    Native(N),
    Python(P),
}

/// Why a stack was not merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// Native frames that are calls of the eval loop.
    pub eval_frames: usize,
    /// Python eval-loop calls: the number of entry frames.
    pub python_calls: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the native stack has {} eval-loop frames but the Python stack was run by {} eval-loop \
             calls: native frames first, then Python frames, unmerged",
            self.eval_frames, self.python_calls
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Merged<N, P> {
    /// Innermost first.
    pub frames: Vec<MergedFrame<N, P>>,
    /// Set when the counts disagree: `frames` is then every native frame
    /// followed by every Python frame.
    pub mismatch: Option<Mismatch>,
}

/// Whether a native frame's function is a call of the eval loop: the
/// symbol `_PyEval_EvalFrameDefault`, or a part of it GCC split off
/// (`_PyEval_EvalFrameDefault.cold`). `PyEval_EvalFrameEx` and the inline
/// `_PyEval_EvalFrame` of 3.8–3.10 only forward to it: counting them too
/// would count one call twice.
pub(crate) fn is_eval_frame(function: &str) -> bool {
    let base = function.split_once('.').map_or(function, |(b, _)| b);
    base == "_PyEval_EvalFrameDefault"
}

/// Merges `native` and `python` (both innermost first). `native_cut`:
/// the native stack ends early (its copy was too short), so the oldest
/// eval-loop calls may be missing from it: their Python frames then come
/// after the native frames, where the rest of the native stack would be.
pub(crate) fn merge<N, P>(
    native: Vec<N>,
    python: Vec<P>,
    is_eval: impl Fn(&N) -> bool,
    is_entry: impl Fn(&P) -> bool,
    native_cut: bool,
) -> Merged<N, P> {
    let eval_frames = native.iter().filter(|n| is_eval(n)).count();
    let python_calls = python.iter().filter(|p| is_entry(p)).count();
    // Frames after the last entry frame belong to no call: a torn walk.
    let dangling = python.last().is_some_and(|p| !is_entry(p));
    let cut_short = native_cut && eval_frames < python_calls;
    if (eval_frames != python_calls && !cut_short) || dangling {
        let mut frames: Vec<_> = native.into_iter().map(MergedFrame::Native).collect();
        frames.extend(python.into_iter().map(MergedFrame::Python));
        return Merged {
            frames,
            mismatch: Some(Mismatch {
                eval_frames,
                python_calls,
            }),
        };
    }
    let mut frames = Vec::with_capacity(native.len() + python.len());
    let mut python = python.into_iter();
    for n in native {
        if !is_eval(&n) {
            frames.push(MergedFrame::Native(n));
            continue;
        }
        for p in python.by_ref() {
            let entry = is_entry(&p);
            frames.push(MergedFrame::Python(p));
            if entry {
                break;
            }
        }
    }
    // The calls the cut native stack did not reach.
    frames.extend(python.map(MergedFrame::Python));
    Merged {
        frames,
        mismatch: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python frames as (name, is_entry).
    fn merged(
        native: &[&'static str],
        python: &[(&'static str, bool)],
    ) -> Merged<&'static str, &'static str> {
        let entries: Vec<_> = python.iter().filter(|p| p.1).map(|p| p.0).collect();
        merge(
            native.to_vec(),
            python.iter().map(|p| p.0).collect(),
            |n| is_eval_frame(n),
            |p| entries.contains(p),
            false,
        )
    }

    fn names(m: &Merged<&'static str, &'static str>) -> Vec<String> {
        m.frames
            .iter()
            .map(|f| match f {
                MergedFrame::Native(n) => n.to_string(),
                MergedFrame::Python(p) => format!("py:{p}"),
            })
            .collect()
    }

    #[test]
    fn one_frame_per_eval_call_before_3_11() {
        let m = merged(
            &[
                "read",
                "_PyEval_EvalFrameDefault",
                "call",
                "_PyEval_EvalFrameDefault",
                "main",
            ],
            &[("inner", true), ("outer", true)],
        );
        assert_eq!(m.mismatch, None);
        assert_eq!(names(&m), ["read", "py:inner", "call", "py:outer", "main"]);
    }

    #[test]
    fn eval_calls_run_frames_up_to_their_entry_frame() {
        // ctypes callback from qsort: Python on both sides of C.
        let m = merged(
            &[
                "string_at",
                "_PyEval_EvalFrameDefault.cold",
                "_ctypes_callproc",
                "qsort",
                "closure_fcn",
                "_PyEval_EvalFrameDefault",
                "PyEval_EvalCode",
                "main",
            ],
            &[
                ("cmp", false),
                ("key", true),
                ("sorter", false),
                ("outer", false),
                ("<module>", true),
            ],
        );
        assert_eq!(m.mismatch, None);
        assert_eq!(
            names(&m),
            [
                "string_at",
                "py:cmp",
                "py:key",
                "_ctypes_callproc",
                "qsort",
                "closure_fcn",
                "py:sorter",
                "py:outer",
                "py:<module>",
                "PyEval_EvalCode",
                "main"
            ]
        );
    }

    #[test]
    fn disagreeing_counts_are_not_merged() {
        let m = merged(
            &["a", "_PyEval_EvalFrameDefault", "main"],
            &[("f", true), ("g", true)],
        );
        assert_eq!(
            m.mismatch,
            Some(Mismatch {
                eval_frames: 1,
                python_calls: 2
            })
        );
        assert_eq!(
            names(&m),
            ["a", "_PyEval_EvalFrameDefault", "main", "py:f", "py:g"]
        );
        assert!(
            m.mismatch
                .unwrap()
                .to_string()
                .contains("1 eval-loop frames")
        );

        // A walk that stopped before an entry frame.
        let m = merged(&["_PyEval_EvalFrameDefault"], &[("f", true), ("g", false)]);
        assert!(m.mismatch.is_some());
    }

    #[test]
    fn a_cut_native_stack_is_followed_by_the_calls_it_missed() {
        let entries = ["f", "g", "h"];
        let m = merge(
            vec!["read", "_PyEval_EvalFrameDefault", "call"],
            vec!["f", "g", "h"],
            |n| is_eval_frame(n),
            |p| entries.contains(p),
            true,
        );
        assert_eq!(m.mismatch, None);
        assert_eq!(names(&m), ["read", "py:f", "call", "py:g", "py:h"]);
        // More eval frames than Python calls is no cut: unmerged.
        let m = merge(
            vec!["_PyEval_EvalFrameDefault", "_PyEval_EvalFrameDefault"],
            vec!["f"],
            |n| is_eval_frame(n),
            |p| entries.contains(p),
            true,
        );
        assert!(m.mismatch.is_some());
    }

    #[test]
    fn no_python_no_change() {
        let m = merged(&["a", "main"], &[]);
        assert_eq!(m.mismatch, None);
        assert_eq!(names(&m), ["a", "main"]);
    }

    #[test]
    fn eval_frame_names() {
        assert!(is_eval_frame("_PyEval_EvalFrameDefault"));
        assert!(is_eval_frame("_PyEval_EvalFrameDefault.cold"));
        assert!(!is_eval_frame("PyEval_EvalFrameEx"));
        assert!(!is_eval_frame("_PyEval_EvalFrame"));
        assert!(!is_eval_frame("_PyEval_EvalFrameDefaultX"));
    }
}
