//! CPython frames at signal time: the per-process table userspace hands
//! the kernel and the record the kernel writes (see the comment below).

use crate::{EventHeader, USER_ADDR_MAX, USER_ADDR_MIN};

/// Whether `addr` may point at a Python object: in user space, 8-aligned.
/// The kernel side and userspace's walker must agree on what they follow.
#[inline(always)]
pub const fn py_plausible(addr: u64) -> bool {
    addr >= USER_ADDR_MIN && addr < USER_ADDR_MAX && addr & 7 == 0
}

/// The PyUnicode `state` bitfield of GIL builds (all versions here):
/// interned:2, kind:3, compact:1, ascii:1.
pub const UNICODE_KIND_SHIFT: u32 = 2;
pub const UNICODE_COMPACT_BIT: u32 = 1 << 5;
pub const UNICODE_ASCII_BIT: u32 = 1 << 6;

// CPython frames at signal time. Userspace finds the interpreter of each
// watched process (discovery reads its ELF files) and hands the kernel a
// `PyProc` in map `PY_PROCS`; when that process's thread is captured at
// `signal_deliver`, the kernel finds its `PyThreadState`, walks its frame
// chain and copies the memory userspace's walker reads (frames, code
// objects, their name, file name and line table) into an `EVENT_PYSTACK`
// record of regions. Userspace then runs the same walker over those
// regions as over live memory.

/// Offsets in `PyProc` that a version does not have.
pub const PY_ABSENT: u32 = u32::MAX;
/// Interpreters searched for a thread's state, at most.
pub const PY_INTERPS_MAX: u32 = 4;
/// Thread states per interpreter searched, at most.
pub const PY_THREADS_MAX: u32 = 512;
/// Frames copied per thread, at most (a shim frame counts).
pub const PY_FRAMES_MAX: u32 = 256;
/// Distinct code objects copied per thread, at most.
pub const PY_CODES_MAX: usize = 64;
/// Bytes of regions one `EVENT_PYSTACK` record carries, at most (the
/// header included). A power of two: offsets are masked with it.
pub const PY_RECORD_MAX: usize = 64 * 1024;
/// One read copies less than this; the scratch buffer has this much
/// slack past `PY_RECORD_MAX` so a masked offset plus a read stays inside.
pub const PY_CHUNK: usize = 4096;
/// Largest frame or code object header a `PyProc` may ask for.
pub const PY_HEADER_MAX: u32 = 512;
/// Bytes of a function name (co_name, co_qualname) copied, at most.
pub const PY_NAME_CAP: u32 = 512;
/// Bytes of a file name copied, at most.
pub const PY_FILE_CAP: u32 = 2048;
/// Bytes of a line table copied, at most (longer ones give approximate
/// lines past the copied part).
pub const PY_LINETABLE_CAP: u32 = 4000;

/// `PyProc::flags`.
/// `tstate_frame` holds a `_PyCFrame *`; the frame is at
/// `cframe_current_frame` in it (3.11, 3.12).
pub const PY_F_CFRAME: u32 = 1;
/// The frame's code pointer is a tagged `_PyStackRef` (3.14+): clear the
/// low 3 bits.
pub const PY_F_CODE_TAGGED: u32 = 2;
/// Frames whose `owner` byte is at least `shim_owner_min` are the eval
/// loop's shim frames: no code object is copied for them (3.12+).
pub const PY_F_SHIM_OWNER: u32 = 4;
/// Match a thread by `thread_id` (its pthread_t) against the task's fs
/// base (3.8–3.10, which have no `native_thread_id`); else by
/// `native_thread_id` against its tid in its own PID namespace.
pub const PY_F_MATCH_FSBASE: u32 = 8;

/// How to read one CPython process's frames (map `PY_PROCS`, keyed by
/// tgid). Offsets are bytes into the structure named, `PY_ABSENT` when
/// the version has no such field; see faulthandler-user's python/walk.rs
/// for the read sequence this mirrors.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime`.
    pub runtime: u64,
    /// Address of `PyCode_Type`, 0 when unknown (no check then).
    pub code_type: u64,
    pub flags: u32,
    pub shim_owner_min: u32,
    pub runtime_interpreters_head: u32,
    pub interp_next: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_frame: u32,
    pub cframe_current_frame: u32,
    pub tstate_thread_id: u32,
    pub tstate_native_thread_id: u32,
    pub frame_previous: u32,
    pub frame_code: u32,
    pub frame_owner: u32,
    pub frame_read_size: u32,
    pub code_read_size: u32,
    pub object_type: u32,
    pub code_name: u32,
    pub code_qualname: u32,
    pub code_filename: u32,
    pub code_linetable: u32,
    pub unicode_length: u32,
    pub unicode_state: u32,
    pub unicode_ascii_data: u32,
    pub unicode_compact_data: u32,
    pub bytes_size: u32,
    pub bytes_data: u32,
}

/// `PyStackEvent::status`.
/// The thread's state was found; `frame` is its innermost frame (0: it
/// runs no Python code now).
pub const PYS_OK: u32 = 0;
/// No thread state of the interpreter belongs to this thread.
pub const PYS_NO_THREAD: u32 = 1;
/// Reading the interpreter or thread-state list failed at `err_addr`.
pub const PYS_READ: u32 = 2;
/// More thread states than `PY_THREADS_MAX` (or interpreters than
/// `PY_INTERPS_MAX`): the search stopped before finding this thread's.
pub const PYS_THREADS_CAPPED: u32 = 3;

/// `PyStackEvent::flags`.
/// The chain had more than `PY_FRAMES_MAX` frames.
pub const PYS_F_FRAMES_CAPPED: u32 = 1;
/// More than `PY_CODES_MAX` distinct code objects: later ones were not
/// copied.
pub const PYS_F_CODES_CAPPED: u32 = 2;
/// The record filled up (`PY_RECORD_MAX`): later regions were not copied.
pub const PYS_F_FULL: u32 = 4;

/// The `EVENT_PYSTACK` record: this header, then `nregions` regions, each
/// a `PyRegion` followed by its `len` bytes padded to 8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyStackEvent {
    pub header: EventHeader,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub status: u32,
    pub flags: u32,
    /// The thread's `PyThreadState`.
    pub tstate: u64,
    /// Its innermost frame.
    pub frame: u64,
    /// The first failed read: its address and negative errno (-EFAULT for
    /// a page that is not resident: nothing can be faulted in here).
    pub err_addr: u64,
    pub err: i32,
    pub nregions: u32,
}

/// A copied range of the thread's memory: `[addr, addr + len)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyRegion {
    pub addr: u64,
    pub len: u32,
    pub _pad: u32,
}
