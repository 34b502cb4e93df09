//! The kernel's half of reading Python frames at signal time: what it is
//! told about a process (`PyProc`, from the `PyLayout` discovery found),
//! and what its `EVENT_PYSTACK` record becomes (the walker run over the
//! copied regions).

use faulthandler_common::{
    PY_ABSENT, PY_CODES_MAX, PY_F_CFRAME, PY_F_CODE_TAGGED, PY_F_MATCH_FSBASE, PY_F_SHIM_OWNER,
    PY_FRAMES_MAX, PY_HEADER_MAX, PY_INTERPS_MAX, PY_THREADS_MAX, PYS_F_CODES_CAPPED,
    PYS_F_FRAMES_CAPPED, PYS_F_FULL, PYS_NO_THREAD, PYS_OK, PYS_READ, PYS_THREADS_CAPPED, PyProc,
    PyStackEvent,
};

use super::PyError;
use super::discover::PyTarget;
use super::layout::{ABSENT, flags};
use super::regions::RegionMem;
use super::walk::{PyFrame, Walker};

/// The kernel's table entry for a process whose interpreter is `t`.
pub(crate) fn py_proc(t: &PyTarget) -> Result<PyProc, PyError> {
    py_proc_of(t).map_err(|e| match e {
        PyError::KernelLayout(why) => PyError::KernelLayout(format!(
            "{why} (python {}.{})",
            t.version.major, t.version.minor
        )),
        e => e,
    })
}

fn py_proc_of(t: &PyTarget) -> Result<PyProc, PyError> {
    let l = &t.layout;
    // Offsets the kernel reads at directly may be anything a struct
    // holds; those into a copied header must lie inside it.
    let within = |name: &str, v: u64, limit: u64| -> Result<u32, PyError> {
        if v == ABSENT {
            return Ok(PY_ABSENT);
        }
        u32::try_from(v)
            .ok()
            .filter(|&v| u64::from(v) + 8 <= limit)
            .ok_or_else(|| PyError::KernelLayout(format!("offset {v} of {name} is too large")))
    };
    let off = |name: &str, v: u64| within(name, v, 1 << 20);
    let in_frame = |name: &str, v: u64| within(name, v, l.frame_read_size.max(8));
    let in_code = |name: &str, v: u64| within(name, v, l.code_read_size.max(8));
    let in_str = |name: &str, v: u64| within(name, v, l.unicode_ascii_data.max(8));
    let in_bytes = |name: &str, v: u64| within(name, v, l.bytes_data.max(8));
    let header = |name: &str, v: u64| -> Result<u32, PyError> {
        u32::try_from(v)
            .ok()
            .filter(|&v| v > 0 && v <= PY_HEADER_MAX)
            .ok_or_else(|| {
                PyError::KernelLayout(format!(
                    "{name} of {v} bytes is more than the {PY_HEADER_MAX} copied"
                ))
            })
    };
    let mut f = 0;
    if l.has(flags::CFRAME) {
        f |= PY_F_CFRAME;
    }
    if l.has(flags::CODE_TAGGED) {
        f |= PY_F_CODE_TAGGED;
    }
    if l.has(flags::SHIM_OWNER) {
        f |= PY_F_SHIM_OWNER;
    }
    if l.tstate_native_thread_id == ABSENT {
        f |= PY_F_MATCH_FSBASE;
    }
    Ok(PyProc {
        runtime: t.runtime_addr,
        code_type: t.code_type_addr.unwrap_or(0),
        flags: f,
        shim_owner_min: l.shim_owner_min,
        runtime_interpreters_head: off("the interpreters' head", l.runtime_interpreters_head)?,
        interp_next: off("PyInterpreterState.next", l.interp_next)?,
        interp_threads_head: off("the threads' head", l.interp_threads_head)?,
        tstate_next: off("PyThreadState.next", l.tstate_next)?,
        tstate_frame: off("PyThreadState's frame", l.tstate_frame)?,
        cframe_current_frame: off("_PyCFrame.current_frame", l.cframe_current_frame)?,
        tstate_thread_id: off("PyThreadState.thread_id", l.tstate_thread_id)?,
        tstate_native_thread_id: off("PyThreadState.native_thread_id", l.tstate_native_thread_id)?,
        frame_previous: in_frame("the frame's previous", l.frame_previous)?,
        frame_code: in_frame("the frame's code", l.frame_code)?,
        // One byte, read at most 7 bytes before the header's end.
        frame_owner: within("the frame's owner", l.frame_owner, l.frame_read_size + 7)?,
        frame_read_size: header("a frame", l.frame_read_size)?,
        code_read_size: header("a code object's header", l.code_read_size)?,
        object_type: in_code("ob_type", l.object_type)?,
        code_name: in_code("co_name", l.code_name)?,
        code_qualname: in_code("co_qualname", l.code_qualname)?,
        code_filename: in_code("co_filename", l.code_filename)?,
        code_linetable: in_code("co_linetable", l.code_linetable)?,
        unicode_length: in_str("the string length", l.unicode_length)?,
        // A 4-byte field.
        unicode_state: within(
            "the string state",
            l.unicode_state,
            l.unicode_ascii_data + 4,
        )?,
        unicode_ascii_data: header("a string header", l.unicode_ascii_data)?,
        unicode_compact_data: off("the compact string data", l.unicode_compact_data)?,
        bytes_size: in_bytes("the bytes size", l.bytes_size)?,
        bytes_data: header("a bytes header", l.bytes_data)?,
    })
}

/// A thread's Python stack as the kernel saw it.
#[derive(Debug)]
pub(crate) struct KernelStack {
    pub frames: Vec<PyFrame>,
    /// Why the frames are missing or stop early, as the report says it.
    pub error: Option<String>,
    /// No thread state was this thread's: it has never run Python.
    pub no_thread: bool,
    /// More frames than were copied.
    pub truncated: bool,
}

/// Decodes an `EVENT_PYSTACK` record of a process whose interpreter is `t`.
pub(crate) fn decode_stack(t: &PyTarget, ev: &PyStackEvent, regions: &[u8]) -> KernelStack {
    let mut out = KernelStack {
        frames: Vec::new(),
        error: None,
        no_thread: false,
        truncated: false,
    };
    let read_err = || match ev.err {
        0 => String::new(),
        e => format!(
            ": a read failed with error {e} ({})",
            if e == -libc::EFAULT {
                "not resident: paged out, or never touched"
            } else {
                "unreadable"
            }
        ),
    };
    match ev.status {
        PYS_OK => {}
        PYS_NO_THREAD => {
            out.no_thread = true;
            return out;
        }
        PYS_READ => {
            out.error = Some(format!(
                "the interpreter's thread list could not be read at signal time{}",
                read_err()
            ));
            return out;
        }
        PYS_THREADS_CAPPED => {
            out.error = Some(format!(
                "this thread's state was not among the first {PY_THREADS_MAX} of each of the first {PY_INTERPS_MAX} interpreters"
            ));
            return out;
        }
        s => {
            out.error = Some(format!("unknown status {s} in the kernel's record"));
            return out;
        }
    }
    let mem = RegionMem::parse(regions, ev.nregions);
    let mut walker = Walker::new(&mem, t);
    let result = walker.frames(ev.frame, &mut out.frames);
    let capped = ev.flags & PYS_F_FRAMES_CAPPED != 0;
    out.truncated = capped;
    if let Err(e) = result {
        // A read of what was not copied: say why it was not.
        let why = if ev.flags & PYS_F_FULL != 0 {
            format!(
                "the frames filled the {} KiB copied at signal time",
                faulthandler_common::PY_RECORD_MAX / 1024
            )
        } else if capped && matches!(e, PyError::Read { .. }) {
            format!("more than {PY_FRAMES_MAX} frames: the older ones were not copied")
        } else if ev.flags & PYS_F_CODES_CAPPED != 0 && matches!(e, PyError::Read { .. }) {
            format!("more than {PY_CODES_MAX} distinct functions: the others were not copied")
        } else if ev.err != 0 && matches!(e, PyError::Read { .. }) {
            format!("{}{}", e.reason(), read_err())
        } else {
            e.reason()
        };
        out.error = Some(why);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::discover::PyVersion;
    use crate::python::layout::static_layout;

    fn target(minor: u32) -> PyTarget {
        PyTarget {
            runtime_addr: 0x1000,
            version: PyVersion {
                major: 3,
                minor,
                hex: None,
            },
            layout: static_layout(minor).unwrap(),
            code_type_addr: Some(0x2000),
        }
    }

    #[test]
    fn tables_for_every_static_layout() {
        for minor in 8..=12 {
            let p = py_proc(&target(minor)).unwrap();
            assert_eq!(p.flags & PY_F_MATCH_FSBASE != 0, minor <= 10, "3.{minor}");
            assert_eq!(p.flags & PY_F_CFRAME != 0, minor == 11 || minor == 12);
            assert!(p.frame_read_size > p.frame_previous);
            assert!(p.code_read_size > p.code_name);
            assert_eq!(p.code_type, 0x2000);
        }
        let p = py_proc(&target(8)).unwrap();
        assert_eq!(p.code_qualname, PY_ABSENT);
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut t = target(11);
        t.layout.code_read_size = 4096;
        assert!(matches!(py_proc(&t), Err(PyError::KernelLayout(_))));
    }

    #[test]
    fn statuses_become_reasons() {
        let t = target(11);
        let ev = |status, err| PyStackEvent {
            status,
            err,
            err_addr: 0x7000,
            ..PyStackEvent::default()
        };
        assert!(decode_stack(&t, &ev(PYS_NO_THREAD, 0), &[]).no_thread);
        let e = decode_stack(&t, &ev(PYS_READ, -libc::EFAULT), &[])
            .error
            .unwrap();
        assert!(e.contains("paged out") && !e.contains("0x7000"), "{e}");
        // The first frame was not copied (paged out).
        let mut paged = ev(PYS_OK, -libc::EFAULT);
        paged.frame = 0x5000;
        let s = decode_stack(&t, &paged, &[]);
        assert!(s.frames.is_empty());
        assert!(s.error.unwrap().contains("not resident"));
    }
}
