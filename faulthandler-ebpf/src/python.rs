//! CPython frames of a thread at signal time, while it still exists.
//!
//! At a crash the process is gone by the time userspace reads the ring,
//! and on 3.11+ the Python frames live in the heap, not on the C stack.
//! So for a watched process userspace has found to be a CPython (map
//! `PY_PROCS`), the thread being captured gets a second record: its
//! `PyThreadState` is found by walking the interpreters' thread lists,
//! and its frame chain, each distinct code object, and the code object's
//! names and line table are copied as raw memory regions. Userspace runs
//! its own walker (python/walk.rs, whose module comment lists these very
//! reads) over the regions, so the decoding is the same for a crash and a
//! live dump.
//!
//! `signal_deliver` runs with interrupts off under the siglock: user
//! memory is read with `bpf_probe_read_user`, which never faults pages in.
//! A frame paged out gives a failed read, which the record carries (see
//! `PyStackEvent::err`) and the report names. Every loop is bounded, and
//! the long ones are `bpf_loop`s so the verifier sees each body once.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::BPF_RB_AVAIL_DATA,
    helpers::generated::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user,
    },
    macros::map,
    maps::{Array, HashMap},
};
use faulthandler_common::*;

use crate::{EVENTS, count};

/// tgid → how to read its frames; userspace fills it when it finds an
/// interpreter (attach, exec, dlopen) and removes it when it goes.
#[map]
static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(WATCH_MAX, 0);

/// The walk's state and the record being built. Far too large for the
/// stack and for a per-CPU map value (32 KiB at most), so this is an
/// array with one entry per possible CPU (userspace sets its size), and
/// `signal_deliver` cannot be preempted on its CPU.
#[repr(C)]
pub struct PyScratch {
    proc_: PyProc,
    /// The thread's id as the interpreter stores it (see
    /// `PY_F_MATCH_FSBASE`).
    want: u64,
    /// Cursor of the thread-state search, and what it found.
    ts: u64,
    found: u64,
    /// Cursor of the frame walk: the next frame to copy.
    frame: u64,
    /// Bytes of `buf` in use; regions start after the event header.
    used: u64,
    /// The open region: its header's offset, address and length so far.
    region: u64,
    region_addr: u64,
    region_len: u64,
    nregions: u64,
    flags: u64,
    err: i64,
    err_addr: u64,
    last_code: u64,
    last_file: u64,
    ncodes: u64,
    codes: [u64; PY_CODES_MAX],
    /// The record: a `PyStackEvent`, then the regions. `PY_CHUNK` of
    /// slack past `PY_RECORD_MAX`, so that a masked offset plus one read
    /// never leaves the value, which is what the verifier checks.
    buf: [u8; PY_RECORD_MAX + PY_CHUNK],
}

#[map]
static PY_SCRATCH: Array<PyScratch> = Array::with_max_entries(1, 0);

const MASK: u64 = (PY_RECORD_MAX - 1) as u64;
const CHUNK_MASK: u64 = (PY_CHUNK - 1) as u64;
const REGION_HEADER: u64 = size_of::<PyRegion>() as u64;
const ABSENT: u32 = PY_ABSENT;

#[inline(always)]
fn scratch() -> Option<*mut PyScratch> {
    // SAFETY: a plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    PY_SCRATCH.get_ptr_mut(cpu)
}

use faulthandler_common::py_plausible as plausible;

/// Remembers the first failed read.
#[inline(always)]
unsafe fn note_err(s: *mut PyScratch, addr: u64, r: i64) {
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        if (*s).err == 0 {
            (*s).err = r;
            (*s).err_addr = addr;
        }
    }
}

/// One u64 of user memory; the failure is noted.
#[inline(always)]
unsafe fn user_u64(s: *mut PyScratch, addr: u64) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: the helper checks the source and writes 8 bytes to `v`.
    let r =
        unsafe { bpf_probe_read_user(&mut v as *mut u64 as *mut c_void, 8, addr as *const c_void) };
    if r != 0 {
        // SAFETY: as above.
        unsafe { note_err(s, addr, r) };
        return None;
    }
    Some(v)
}

/// Reads `len` (< `PY_CHUNK`) bytes at user `addr` into `buf` at `off`.
/// The caller has checked that `off + len` fits in `PY_RECORD_MAX`; the
/// masks only show the verifier what it cannot infer.
#[inline(always)]
unsafe fn read_into(s: *mut PyScratch, off: u64, len: u64, addr: u64) -> bool {
    let off = off & MASK;
    let len = len & CHUNK_MASK;
    if len == 0 {
        return true;
    }
    // SAFETY: `off + len` is within `buf` (see the masks above).
    let r = unsafe {
        let dst = (*s).buf.as_mut_ptr().add(off as usize);
        bpf_probe_read_user(dst as *mut c_void, len as u32, addr as *const c_void)
    };
    if r != 0 {
        // SAFETY: as above.
        unsafe { note_err(s, addr, r) };
        return false;
    }
    true
}

#[inline(always)]
unsafe fn buf_u64(s: *mut PyScratch, off: u64) -> u64 {
    let off = off & MASK;
    // SAFETY: `off + 8` is within `buf`.
    unsafe { core::ptr::read_unaligned((*s).buf.as_ptr().add(off as usize) as *const u64) }
}

#[inline(always)]
unsafe fn buf_u32(s: *mut PyScratch, off: u64) -> u32 {
    let off = off & MASK;
    // SAFETY: `off + 4` is within `buf`.
    unsafe { core::ptr::read_unaligned((*s).buf.as_ptr().add(off as usize) as *const u32) }
}

#[inline(always)]
unsafe fn buf_u8(s: *mut PyScratch, off: u64) -> u8 {
    let off = off & MASK;
    // SAFETY: `off` is within `buf`.
    unsafe { *(*s).buf.as_ptr().add(off as usize) }
}

/// Opens a region at user `addr` with its first `len` bytes; false when
/// there is no room or they cannot be read (nothing is kept then).
#[inline(always)]
unsafe fn region_begin(s: *mut PyScratch, addr: u64, len: u64) -> bool {
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let used = (*s).used;
        if used + REGION_HEADER + len > PY_RECORD_MAX as u64 {
            (*s).flags |= PYS_F_FULL as u64;
            return false;
        }
        if !read_into(s, used + REGION_HEADER, len, addr) {
            return false;
        }
        (*s).region = used;
        (*s).region_addr = addr;
        (*s).region_len = len;
        true
    }
}

/// Extends the open region by the `len` bytes that follow it.
#[inline(always)]
unsafe fn region_extend(s: *mut PyScratch, len: u64) {
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let end = (*s).region + REGION_HEADER + (*s).region_len;
        if end + len > PY_RECORD_MAX as u64 {
            (*s).flags |= PYS_F_FULL as u64;
            return;
        }
        if read_into(s, end, len, (*s).region_addr + (*s).region_len) {
            (*s).region_len += len & CHUNK_MASK;
        }
    }
}

/// Closes the open region: writes its header, and the next region starts
/// after it, 8-aligned. Returns the offset of its first byte.
#[inline(always)]
unsafe fn region_end(s: *mut PyScratch) -> u64 {
    // SAFETY: `s` is this CPU's scratch value; the header lies within
    // `buf` (masked offset + 16).
    unsafe {
        let at = (*s).region & MASK;
        let hdr = (*s).buf.as_mut_ptr().add(at as usize) as *mut PyRegion;
        core::ptr::write_unaligned(
            hdr,
            PyRegion {
                addr: (*s).region_addr,
                len: (*s).region_len as u32,
                _pad: 0,
            },
        );
        (*s).used = (at + REGION_HEADER + (*s).region_len + 7) & !7;
        (*s).nregions += 1;
        at + REGION_HEADER
    }
}

/// Copies a compact `str` object: its header, and at most `cap` bytes of
/// its characters (a longer one reads as cut short).
#[inline(always)]
unsafe fn copy_str(s: *mut PyScratch, addr: u64, cap: u32) {
    if !plausible(addr) {
        return;
    }
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let p = &(*s).proc_;
        let head = p.unicode_ascii_data as u64;
        let compact_data = p.unicode_compact_data as u64;
        let (len_at, state_at) = (p.unicode_length as u64, p.unicode_state as u64);
        if head > PY_HEADER_MAX as u64 || !region_begin(s, addr, head) {
            return;
        }
        let base = (*s).region + REGION_HEADER;
        let len = buf_u64(s, base + len_at);
        let state = buf_u32(s, base + state_at);
        let kind = ((state >> UNICODE_KIND_SHIFT) & 7) as u64;
        let ascii = state & UNICODE_ASCII_BIT != 0;
        let compact = state & UNICODE_COMPACT_BIT != 0;
        if compact && (kind == 1 || kind == 2 || kind == 4) && len <= (1 << 20) {
            let data = if ascii { head } else { compact_data };
            let mut bytes = len * kind;
            if bytes > cap as u64 {
                bytes = cap as u64;
            }
            if data >= head && data - head <= 64 {
                region_extend(s, data - head + bytes);
            }
        }
        region_end(s);
    }
}

/// Copies a `bytes` object: its header and at most `cap` bytes of data.
#[inline(always)]
unsafe fn copy_bytes(s: *mut PyScratch, addr: u64, cap: u32) {
    if !plausible(addr) {
        return;
    }
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let p = &(*s).proc_;
        let head = p.bytes_data as u64;
        let size_at = p.bytes_size as u64;
        if head > PY_HEADER_MAX as u64 || !region_begin(s, addr, head) {
            return;
        }
        let size = buf_u64(s, (*s).region + REGION_HEADER + size_at) as i64;
        if size > 0 {
            let n = if size > cap as i64 {
                cap as u64
            } else {
                size as u64
            };
            region_extend(s, n);
        }
        region_end(s);
    }
}

/// A field of the open code object's header, 0 when absent.
#[inline(always)]
unsafe fn field(s: *mut PyScratch, base: u64, off: u32) -> u64 {
    if off == ABSENT {
        return 0;
    }
    // SAFETY: forwarded.
    unsafe { buf_u64(s, base + off as u64) }
}

/// Copies code object `code` and what its frames need, once per walk.
#[inline(always)]
unsafe fn copy_code(s: *mut PyScratch, code: u64) {
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        if !plausible(code) || code == (*s).last_code {
            return;
        }
        let n = (*s).ncodes;
        for j in 0..PY_CODES_MAX {
            if j as u64 >= n {
                break;
            }
            if *(*s).codes.as_ptr().add(j) == code {
                (*s).last_code = code;
                return;
            }
        }
        if n >= PY_CODES_MAX as u64 {
            (*s).flags |= PYS_F_CODES_CAPPED as u64;
            return;
        }
        *(*s)
            .codes
            .as_mut_ptr()
            .add((n as usize) & (PY_CODES_MAX - 1)) = code;
        (*s).ncodes = n + 1;
        (*s).last_code = code;
        let p = &(*s).proc_;
        if p.code_read_size > PY_HEADER_MAX || !region_begin(s, code, p.code_read_size as u64) {
            return;
        }
        let base = region_end(s);
        if p.code_type != 0 && field(s, base, p.object_type) != p.code_type {
            return; // not a code object: userspace says so
        }
        let name = field(s, base, p.code_name);
        let qualname = field(s, base, p.code_qualname);
        let file = field(s, base, p.code_filename);
        let table = field(s, base, p.code_linetable);
        copy_str(s, name, PY_NAME_CAP);
        if qualname != name {
            copy_str(s, qualname, PY_NAME_CAP);
        }
        if file != (*s).last_file {
            copy_str(s, file, PY_FILE_CAP);
            (*s).last_file = file;
        }
        copy_bytes(s, table, PY_LINETABLE_CAP);
    }
}

/// `bpf_loop` body: copies one frame and its code, then moves to the
/// frame before it.
#[inline(never)]
extern "C" fn frame_step(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let f = (*s).frame;
        if !plausible(f) {
            return 1;
        }
        let p = &(*s).proc_;
        if p.frame_read_size > PY_HEADER_MAX || !region_begin(s, f, p.frame_read_size as u64) {
            return 1;
        }
        let base = region_end(s);
        let previous = buf_u64(s, base + p.frame_previous as u64);
        let mut code = buf_u64(s, base + p.frame_code as u64);
        if p.flags & PY_F_CODE_TAGGED != 0 {
            code &= !7;
        }
        let shim = p.flags & PY_F_SHIM_OWNER != 0
            && p.frame_owner != ABSENT
            && buf_u8(s, base + p.frame_owner as u64) as u32 >= p.shim_owner_min;
        if !shim {
            copy_code(s, code);
        }
        (*s).frame = previous;
    }
    0
}

/// `bpf_loop` body: checks one thread state, then moves to the next.
#[inline(never)]
extern "C" fn thread_step(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let ts = (*s).ts;
        if !plausible(ts) {
            (*s).ts = 0;
            return 1;
        }
        let p = &(*s).proc_;
        let id_at = if p.flags & PY_F_MATCH_FSBASE != 0 {
            p.tstate_thread_id
        } else {
            p.tstate_native_thread_id
        };
        let next_at = p.tstate_next;
        if id_at == ABSENT {
            return 1;
        }
        let Some(id) = user_u64(s, ts + id_at as u64) else {
            return 1;
        };
        if id == (*s).want {
            (*s).found = ts;
            return 1;
        }
        let Some(next) = user_u64(s, ts + next_at as u64) else {
            return 1;
        };
        (*s).ts = next;
    }
    0
}

/// Finds the thread's `PyThreadState`; a `PYS_*` status.
#[inline(always)]
unsafe fn find_thread(s: *mut PyScratch) -> u32 {
    // SAFETY: `s` is this CPU's scratch value.
    unsafe {
        let p = &(*s).proc_;
        let Some(mut interp) = user_u64(s, p.runtime + p.runtime_interpreters_head as u64) else {
            return PYS_READ;
        };
        for _ in 0..PY_INTERPS_MAX {
            if !plausible(interp) {
                return PYS_NO_THREAD;
            }
            let Some(head) = user_u64(s, interp + p.interp_threads_head as u64) else {
                return PYS_READ;
            };
            (*s).ts = head;
            (*s).found = 0;
            bpf_loop(
                PY_THREADS_MAX,
                thread_step as *const () as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
            if (*s).found != 0 {
                return PYS_OK;
            }
            if (*s).err != 0 {
                return PYS_READ;
            }
            if (*s).ts != 0 {
                return PYS_THREADS_CAPPED;
            }
            let Some(next) = user_u64(s, interp + p.interp_next as u64) else {
                return PYS_READ;
            };
            interp = next;
        }
        if interp != 0 {
            PYS_THREADS_CAPPED
        } else {
            PYS_NO_THREAD
        }
    }
}

/// Writes the current thread's Python frames as an `EVENT_PYSTACK`
/// record when `tgid` is a known CPython. Returns the `SIG_F_PYTHON*`
/// flag for the thread's signal record (0: not a known CPython).
/// `task` is the current task, matched to its thread state by its id in
/// its own PID namespace or its TLS base.
#[inline(always)]
pub fn capture(cfg: &Config, task: *const u8, tgid: u32, tid: u32) -> u32 {
    // SAFETY: the value is copied at once.
    let Some(p) = (unsafe { PY_PROCS.get(tgid) }) else {
        return 0;
    };
    let p = *p;
    // Not without room for this record and the thread's own after it: a
    // crash of many Python threads must not fill the ring with Python
    // frames and lose the native stacks they belong to.
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if pending + (PY_RECORD_MAX + size_of::<SignalRecord>()) as u64 > RING_BYTES as u64 {
        count(CNT_PYTHON_RING_FULL);
        return SIG_F_PYTHON_LOST;
    }
    // SAFETY: probe reads of the current task.
    let (ns_tid, fsbase) = unsafe {
        (
            crate::ns_nr(&cfg.offsets, task),
            crate::read_at::<u64>(task, cfg.offsets.task_fsbase).unwrap_or(0),
        )
    };
    let Some(s) = scratch() else { return 0 };
    // SAFETY: `s` is this CPU's scratch value, used by one program at a
    // time (interrupts are off in signal_deliver).
    unsafe {
        (*s).proc_ = p;
        (*s).want = if p.flags & PY_F_MATCH_FSBASE != 0 {
            fsbase
        } else {
            ns_tid as u64
        };
        (*s).used = size_of::<PyStackEvent>() as u64;
        (*s).nregions = 0;
        (*s).flags = 0;
        (*s).err = 0;
        (*s).err_addr = 0;
        (*s).last_code = 0;
        (*s).last_file = 0;
        (*s).ncodes = 0;
        (*s).found = 0;
        (*s).frame = 0;
        let status = find_thread(s);
        let tstate = (*s).found;
        let mut first = 0;
        if status == PYS_OK {
            let mut f = user_u64(s, tstate + p.tstate_frame as u64).unwrap_or(0);
            if p.flags & PY_F_CFRAME != 0 && plausible(f) {
                f = user_u64(s, f + p.cframe_current_frame as u64).unwrap_or(0);
            }
            first = f;
            (*s).frame = f;
            bpf_loop(
                PY_FRAMES_MAX,
                frame_step as *const () as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
            if plausible((*s).frame) {
                (*s).flags |= PYS_F_FRAMES_CAPPED as u64;
            }
        }
        let used = (*s).used;
        if used > PY_RECORD_MAX as u64 {
            return 0;
        }
        core::ptr::write_unaligned(
            (*s).buf.as_mut_ptr() as *mut PyStackEvent,
            PyStackEvent {
                header: EventHeader {
                    kind: EVENT_PYSTACK,
                    len: used as u32,
                },
                ktime_ns: bpf_ktime_get_ns(),
                pid: tgid,
                tid,
                status,
                flags: (*s).flags as u32,
                tstate,
                frame: first,
                err_addr: (*s).err_addr,
                err: (*s).err as i32,
                nregions: (*s).nregions as u32,
            },
        );
        let record = core::slice::from_raw_parts((*s).buf.as_ptr(), used as usize);
        if EVENTS.output::<[u8]>(record, 0).is_err() {
            count(CNT_PYTHON_RING_FULL);
            return SIG_F_PYTHON_LOST;
        }
        SIG_F_PYTHON
    }
}
