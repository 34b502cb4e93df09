//! Where each field the walk reads lives, per CPython version (x86_64).
//!
//! `PyLayout` is flat; the kernel side gets the offsets it needs from it
//! as a `PyProc` (faulthandler-common) in a BPF map, and mirrors the walk
//! in `walk.rs` with them.
//!
//! Sources:
//! - 3.8–3.12: CPython's headers of each version (Include/cpython/pystate.h
//!   `struct _ts`, Include/internal/pycore_interp.h `struct _is`,
//!   Include/internal/pycore_runtime.h `_PyRuntimeState`,
//!   Include/cpython/frameobject.h / Include/internal/pycore_frame.h,
//!   Include/cpython/code.h, Include/cpython/unicodeobject.h,
//!   Include/cpython/bytesobject.h). Every number below was checked against
//!   the DWARF of a build of that version (pyenv 3.8.18, 3.9.18, 3.10.13,
//!   3.11.7, 3.12.1, with `gdb -batch -ex 'ptype /o struct _ts'` and
//!   `print &((T *)0)->field`), and Debian's static python3.11 is tested to
//!   match (`live_tests`).
//! - 3.13+: the target's own `_Py_DebugOffsets` (see `debug_offsets.rs`).
//!   Fields it does not carry (the compact-unicode header size before 3.15,
//!   the frame owner values) come from the same headers and DWARF.

/// Marks a field this version does not have.
pub(crate) const ABSENT: u64 = u64::MAX;

/// How a frame records where it is in its bytecode.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InstrKind {
    /// `PyFrameObject.f_lasti`: an `int` byte offset into `co_code`, -1
    /// before the first instruction (3.8, 3.9).
    LastiBytes = 1,
    /// `PyFrameObject.f_lasti` in 2-byte code units (3.10).
    LastiUnits = 2,
    /// `_PyInterpreterFrame.prev_instr` / `instr_ptr`: a pointer into the
    /// code object's inline `co_code_adaptive` (3.11+).
    Pointer = 3,
}

/// The line table format of `code_linetable`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LineTableKind {
    /// `co_lnotab` (3.8, 3.9): (byte delta, signed line delta) pairs.
    Lnotab = 1,
    /// `co_linetable` of 3.10: (byte delta, signed line delta, -128 = none).
    Lines310 = 2,
    /// The location table of 3.11+ (Objects/locations.md).
    Locations = 3,
}

/// Flags in `PyLayout::flags`.
pub(crate) mod flags {
    /// `tstate_frame` points at a `_PyCFrame` whose `cframe_current_frame`
    /// holds the frame (3.11, 3.12).
    pub(crate) const CFRAME: u32 = 1;
    /// The frame's `frame_code` is a `_PyStackRef`: clear `CODE_TAG_MASK`
    /// (3.14+).
    pub(crate) const CODE_TAGGED: u32 = 2;
    /// Frames carry a one-byte `is_entry` at `frame_is_entry` (3.11).
    pub(crate) const ENTRY_FLAG: u32 = 4;
    /// Frames whose one-byte `owner` is `>= shim_owner_min` are the eval
    /// loop's shim/entry frames, not Python frames (3.12+).
    pub(crate) const SHIM_OWNER: u32 = 8;
}

/// Low bits of a `_PyStackRef` that are tags, not address (objects are at
/// least 8-byte aligned).
pub(crate) const CODE_TAG_MASK: u64 = 7;

pub(crate) use faulthandler_common::{UNICODE_ASCII_BIT, UNICODE_COMPACT_BIT, UNICODE_KIND_SHIFT};

/// Byte offsets (`ABSENT` when the version has no such field) and the
/// encodings the walk needs. All reads are of fixed-size fields at these
/// offsets from an address the previous read produced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PyLayout {
    /// `flags::*`.
    pub flags: u32,
    /// `InstrKind` as u32.
    pub instr_kind: u32,
    /// `LineTableKind` as u32.
    pub linetable_kind: u32,
    /// With `flags::SHIM_OWNER`: owners at or above this are shims
    /// (3.12, 3.13: FRAME_OWNED_BY_CSTACK = 3; 3.14: INTERPRETER = 3,
    /// CSTACK = 4; 3.15: INTERPRETER = 3).
    pub shim_owner_min: u32,

    /// `_PyRuntimeState.interpreters.head` (PyInterpreterState *).
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.next`.
    pub interp_next: u64,
    /// `PyInterpreterState.tstate_head` (3.8–3.10) / `.threads.head`.
    pub interp_threads_head: u64,
    /// `PyInterpreterState.modules` / `.imports.modules` (sys.modules).
    pub interp_modules: u64,

    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.interp`.
    pub tstate_interp: u64,
    /// `PyThreadState.frame` (3.8–3.10), `.cframe` (3.11, 3.12; see
    /// `flags::CFRAME`), `.current_frame` (3.13+).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame` (3.11, 3.12).
    pub cframe_current_frame: u64,
    /// `PyThreadState.thread_id` (pthread_t, unsigned long).
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (unsigned long; 3.11+).
    pub tstate_native_thread_id: u64,

    /// `PyFrameObject.f_back` (3.8–3.10) / `_PyInterpreterFrame.previous`.
    pub frame_previous: u64,
    /// `f_code` / `f_executable`.
    pub frame_code: u64,
    /// `f_lasti` (int) / `prev_instr` / `instr_ptr`; see `instr_kind`.
    pub frame_instr: u64,
    /// `_PyInterpreterFrame.owner` (char; 3.11+).
    pub frame_owner: u64,
    /// `_PyInterpreterFrame.is_entry` (char; 3.11 only).
    pub frame_is_entry: u64,
    /// Bytes to read to get all the frame fields above at once.
    pub frame_read_size: u64,

    /// `PyCodeObject.co_name` (PyUnicode *).
    pub code_name: u64,
    /// `co_qualname` (3.11+).
    pub code_qualname: u64,
    /// `co_filename`.
    pub code_filename: u64,
    /// `co_firstlineno` (int).
    pub code_firstlineno: u64,
    /// `co_lnotab` / `co_linetable` (PyBytes *); see `linetable_kind`.
    pub code_linetable: u64,
    /// `co_code` (PyBytes *; 3.8–3.10).
    pub code_code: u64,
    /// Offset of the inline bytecode `co_code_adaptive` (3.11+).
    pub code_adaptive: u64,
    /// Bytes to read to get all the code fields above at once.
    pub code_read_size: u64,

    /// `PyObject.ob_type`.
    pub object_type: u64,
    /// `PyTypeObject.tp_name` (const char *).
    pub type_name: u64,
    /// `PyVarObject.ob_size` of a bytes object.
    pub bytes_size: u64,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u64,
    /// `PyASCIIObject.length`.
    pub unicode_length: u64,
    /// `PyASCIIObject.state` (a 32-bit bitfield).
    pub unicode_state: u64,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's data starts.
    pub unicode_ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' start.
    pub unicode_compact_data: u64,
}

impl PyLayout {
    pub(crate) fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub(crate) fn instr_kind(&self) -> InstrKind {
        match self.instr_kind {
            1 => InstrKind::LastiBytes,
            2 => InstrKind::LastiUnits,
            _ => InstrKind::Pointer,
        }
    }

    pub(crate) fn linetable_kind(&self) -> LineTableKind {
        match self.linetable_kind {
            1 => LineTableKind::Lnotab,
            2 => LineTableKind::Lines310,
            _ => LineTableKind::Locations,
        }
    }

    /// Fills in the `*_read_size` fields from the offsets.
    pub(super) fn with_read_sizes(mut self) -> Self {
        let end = |fields: &[(u64, u64)]| {
            fields
                .iter()
                .filter(|(off, _)| *off != ABSENT)
                .map(|(off, size)| off + size)
                .max()
                .unwrap_or(0)
        };
        self.frame_read_size = end(&[
            (self.frame_previous, 8),
            (self.frame_code, 8),
            (self.frame_instr, 8),
            (self.frame_owner, 1),
            (self.frame_is_entry, 1),
        ]);
        self.code_read_size = end(&[
            (self.object_type, 8),
            (self.code_name, 8),
            (self.code_qualname, 8),
            (self.code_filename, 8),
            (self.code_firstlineno, 4),
            (self.code_linetable, 8),
            (self.code_code, 8),
        ]);
        self
    }
}

/// Fields shared by every version here (PyObject, PyTypeObject and
/// PyBytesObject have not moved since 3.0 on x86_64).
const COMMON: PyLayout = PyLayout {
    flags: 0,
    instr_kind: InstrKind::LastiBytes as u32,
    linetable_kind: LineTableKind::Lnotab as u32,
    shim_owner_min: u32::MAX,
    runtime_interpreters_head: ABSENT,
    interp_next: 0,
    interp_threads_head: ABSENT,
    interp_modules: ABSENT,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_frame: ABSENT,
    cframe_current_frame: ABSENT,
    tstate_thread_id: ABSENT,
    tstate_native_thread_id: ABSENT,
    frame_previous: ABSENT,
    frame_code: ABSENT,
    frame_instr: ABSENT,
    frame_owner: ABSENT,
    frame_is_entry: ABSENT,
    frame_read_size: 0,
    code_name: ABSENT,
    code_qualname: ABSENT,
    code_filename: ABSENT,
    code_firstlineno: ABSENT,
    code_linetable: ABSENT,
    code_code: ABSENT,
    code_adaptive: ABSENT,
    code_read_size: 0,
    object_type: 8,
    type_name: 24,
    bytes_size: 16,
    bytes_data: 32,
    unicode_length: 16,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
};

/// 3.8 and 3.9: PyFrameObject chain from `PyThreadState.frame`.
const V3_8: PyLayout = PyLayout {
    instr_kind: InstrKind::LastiBytes as u32,
    linetable_kind: LineTableKind::Lnotab as u32,
    runtime_interpreters_head: 32,
    interp_threads_head: 8,
    interp_modules: 56,
    tstate_frame: 24,
    tstate_thread_id: 176,
    frame_previous: 24,
    frame_code: 32,
    frame_instr: 104,
    code_name: 112,
    code_filename: 104,
    code_firstlineno: 40,
    code_linetable: 120,
    code_code: 48,
    ..COMMON
};

const V3_9: PyLayout = PyLayout {
    interp_modules: 856,
    ..V3_8
};

/// 3.10: `co_linetable`, f_lasti in code units.
const V3_10: PyLayout = PyLayout {
    instr_kind: InstrKind::LastiUnits as u32,
    linetable_kind: LineTableKind::Lines310 as u32,
    frame_instr: 96,
    ..V3_9
};

/// 3.11: `_PyInterpreterFrame`s from `tstate->cframe->current_frame`.
const V3_11: PyLayout = PyLayout {
    flags: flags::CFRAME | flags::ENTRY_FLAG,
    instr_kind: InstrKind::Pointer as u32,
    linetable_kind: LineTableKind::Locations as u32,
    runtime_interpreters_head: 40,
    interp_threads_head: 16,
    interp_modules: 888,
    tstate_frame: 56,
    cframe_current_frame: 8,
    tstate_thread_id: 152,
    tstate_native_thread_id: 160,
    frame_previous: 48,
    frame_code: 32,
    frame_instr: 56,
    frame_owner: 69,
    frame_is_entry: 68,
    code_name: 120,
    code_qualname: 128,
    code_filename: 112,
    code_firstlineno: 72,
    code_linetable: 136,
    code_code: ABSENT,
    code_adaptive: 184,
    ..COMMON
};

/// 3.12: entry frames became shim frames owned by the C stack; PyUnicode
/// lost its `wstr` fields.
const V3_12: PyLayout = PyLayout {
    flags: flags::CFRAME | flags::SHIM_OWNER,
    shim_owner_min: 3,
    interp_threads_head: 72,
    interp_modules: 944,
    tstate_frame: 56,
    cframe_current_frame: 0,
    tstate_thread_id: 136,
    tstate_native_thread_id: 144,
    frame_previous: 8,
    frame_code: 0,
    frame_instr: 56,
    frame_owner: 70,
    frame_is_entry: ABSENT,
    code_firstlineno: 68,
    code_adaptive: 192,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    ..V3_11
};

/// The static table for `minor` (3.8–3.12).
pub(crate) fn static_layout(minor: u32) -> Option<PyLayout> {
    let l = match minor {
        8 => V3_8,
        9 => V3_9,
        10 => V3_10,
        11 => V3_11,
        12 => V3_12,
        _ => return None,
    };
    Some(l.with_read_sizes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_tables_have_what_the_walk_reads() {
        for minor in 8..=12 {
            let l = static_layout(minor).unwrap();
            for (name, v) in [
                ("interpreters head", l.runtime_interpreters_head),
                ("threads head", l.interp_threads_head),
                ("frame", l.tstate_frame),
                ("previous", l.frame_previous),
                ("code", l.frame_code),
                ("instr", l.frame_instr),
                ("name", l.code_name),
                ("filename", l.code_filename),
                ("linetable", l.code_linetable),
            ] {
                assert_ne!(v, ABSENT, "3.{minor} lacks {name}");
            }
            assert!(l.frame_read_size > 0 && l.code_read_size > 0);
        }
        assert!(static_layout(7).is_none() && static_layout(13).is_none());
    }
}
