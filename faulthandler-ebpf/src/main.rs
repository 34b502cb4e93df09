//! Kernel side of rfh-trace: capture what a crashing thread looked like at
//! signal delivery, while its memory still exists, and track the
//! processes being watched.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod dump;
mod procs;
mod vma;

use core::{ffi::c_void, intrinsics::AtomicOrdering, mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_stack, bpf_probe_read_kernel as raw_read_kernel, bpf_probe_read_user,
            bpf_task_pt_regs,
        },
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use faulthandler_common::*;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// tgid → 1 for every watched process.
#[map]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(WATCH_MAX, 0);

/// tgid → capture state of each watched process that is dying of a
/// reported signal.
#[map]
static DYING: HashMap<u32, Dying> = HashMap::with_max_entries(1024, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Failed reservations, reported to userspace in the next record.
#[map]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// (tgid, tid) of the current task.
#[inline(always)]
fn current() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
fn watched(cfg: &Config, tgid: u32) -> bool {
    cfg.flags & CFG_ALL != 0 || unsafe { WATCHED.get(&tgid) }.is_some()
}

#[inline(always)]
fn count_lost() {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(COUNTER_LOST) {
        unsafe { *p += 1 };
    }
}

/// A ring-buffer reservation; a full buffer is counted, never silent.
#[inline(always)]
fn reserve<T: 'static>() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count_lost();
    }
    entry
}

/// Takes and clears this CPU's lost count, so each loss is reported once.
#[inline(always)]
fn take_lost() -> u64 {
    match COUNTERS_MAP.get_ptr_mut(COUNTER_LOST) {
        Some(p) => unsafe {
            let n = *p;
            *p = 0;
            n
        },
        None => 0,
    }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T) }.ok()
}

/// The pid number of `task`'s struct pid (`thread_pid`) in its own,
/// innermost PID namespace.
#[inline(always)]
unsafe fn ns_nr(o: &KernelOffsets, task: *const u8) -> u32 {
    unsafe {
        let Some(pid) = read_at::<*const u8>(task, o.task_thread_pid) else {
            return 0;
        };
        let Some(level) = read_at::<u32>(pid, o.pid_level) else {
            return 0;
        };
        let off = o.pid_numbers + (level & 63) * o.upid_size;
        read_at::<i32>(pid, off).unwrap_or(0) as u32
    }
}

const SIGKILL: u32 = 9;

#[raw_tracepoint(tracepoint = "signal_deliver")]
pub fn signal_deliver(ctx: RawTracePointContext) -> i32 {
    let _ = try_signal_deliver(&ctx);
    0
}

fn try_signal_deliver(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let sig: u64 = ctx.arg(0);
    let sig = sig as u32;
    if sig >= 64 {
        return None;
    }
    let (tgid, tid) = current();
    let info: *const u8 = ctx.arg(1);
    let ka: *const u8 = ctx.arg(2);
    // While a process dies, every thread but the one that took the fatal
    // signal passes through here with the group-exit SIGKILL (info NULL,
    // SEND_SIG_NOINFO), in its own context and before exit_mm: the only
    // point where a sibling's user stack can still be read. Such
    // deliveries are captured only for processes already known to be
    // dying of something reported, so a plain exit_group costs nothing.
    let group_exit = sig == SIGKILL && info.is_null();
    if group_exit {
        let d = DYING.get_ptr_mut(&tgid)?;
        unsafe {
            // The cap is checked before the add, so a burst of threads on
            // several CPUs may pass it by a few; the counts stay exact.
            let full = (*d).threads >= cfg.max_threads as u64;
            let counter = if full {
                &raw mut (*d).omitted
            } else {
                &raw mut (*d).threads
            };
            // The bpf target's core has no atomic read-modify-write types;
            // the intrinsic lowers to BPF's atomic add.
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
            if full {
                return None;
            }
        }
    } else if cfg.signal_mask & (1u64 << sig) == 0 || !watched(cfg, tgid) {
        return None;
    }
    let handler = unsafe { read_at::<u64>(ka, 0) }.unwrap_or(0);
    if !group_exit && handler == SIG_DFL && !default_is_harmless(sig) {
        // The process dies of this: capture its other threads as they go.
        let first = Dying {
            threads: 1,
            omitted: 0,
        };
        let _ = DYING.insert(&tgid, &first, BPF_NOEXIST as u64);
    }

    let mut entry = crate::reserve::<SignalRecord>()?;
    let rec = entry.as_mut_ptr();
    unsafe {
        let ev = addr_of_mut!((*rec).event);
        init_record(ev, tgid, tid, if group_exit { SIG_F_GROUP_EXIT } else { 0 });
        (*ev).sig = sig as i32;
        (*ev).handler = handler;
        if !info.is_null() {
            (*ev).flags |= SIG_F_HAS_INFO;
            (*ev).errno = read_at::<i32>(info, 4).unwrap_or(0);
            let code = read_at::<i32>(info, 8).unwrap_or(0);
            (*ev).code = code;
            if code <= 0 {
                (*ev).sender_pid = read_at::<i32>(info, 16).unwrap_or(0);
                (*ev).sender_uid = read_at::<u32>(info, 20).unwrap_or(0);
            } else {
                (*ev).addr = read_at::<u64>(info, 16).unwrap_or(0);
            }
        }
        let task = bpf_get_current_task_btf();
        fill_task(ev, task as *const u8, &cfg.offsets);
        let n = bpf_get_stack(
            ctx.as_ptr(),
            addr_of_mut!((*ev).fp) as *mut c_void,
            (FP_MAX * 8) as u32,
            BPF_F_USER_STACK as u64,
        );
        (*ev).fp_len = if n > 0 { (n as u32) / 8 } else { 0 };
        if read_regs(ev, bpf_task_pt_regs(task as *mut _) as *const c_void) {
            copy_user_stack(rec, cfg.stack_size, |d, n, src| {
                bpf_probe_read_user(d, n, src)
            });
            let vmas = addr_of_mut!((*ev).vmas);
            (*ev).nvmas = vma::capture(task, (*ev).regs[REG_IP], (*ev).regs[REG_SP], 0, vmas);
        }
    }
    // A death, or a signal userspace may act on while the process lives
    // (--on-signal): wake it even behind unwoken bookkeeping records.
    entry.submit(procs::WAKE_NOW);
    Some(())
}

/// Everything of a record but the signal, registers and stack.
#[inline(always)]
unsafe fn init_record(ev: *mut SignalEvent, tgid: u32, tid: u32, flags: u32) {
    unsafe {
        (*ev).header = EventHeader {
            kind: EVENT_SIGNAL,
            len: size_of::<SignalEvent>() as u32,
        };
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev).sig = 0;
        (*ev).code = 0;
        (*ev).errno = 0;
        (*ev).sender_pid = 0;
        (*ev).sender_uid = 0;
        (*ev).addr = 0;
        (*ev).handler = 0;
        (*ev).flags = flags;
        (*ev).lost = take_lost();
        (*ev).fp_len = 0;
        (*ev).stack_len = 0;
        (*ev).stack_err = 0;
        (*ev).nvmas = 0;
    }
}

/// Copies the user registers at `regs` into the record; false when they
/// were unreadable.
#[inline(always)]
unsafe fn read_regs(ev: *mut SignalEvent, regs: *const c_void) -> bool {
    unsafe {
        let got = raw_read_kernel(
            addr_of_mut!((*ev).regs) as *mut c_void,
            (PT_REGS_LEN * 8) as u32,
            regs,
        );
        if got == 0 {
            (*ev).flags |= SIG_F_HAS_REGS;
        }
        got == 0
    }
}

/// Copies the top of the user stack the record's registers point at.
#[inline(always)]
unsafe fn copy_user_stack(
    rec: *mut SignalRecord,
    stack_size: u32,
    read: impl Fn(*mut c_void, u32, *const c_void) -> i64,
) {
    unsafe {
        let ev = addr_of_mut!((*rec).event);
        copy_stack(rec, (*ev).regs[REG_SP], stack_size, read);
        (*ev).header.len = size_of::<SignalEvent>() as u32 + (*ev).stack_len;
    }
}

/// Thread identity: comm, and pid/tid in the task's own PID namespace.
#[inline(always)]
unsafe fn fill_task(ev: *mut SignalEvent, task: *const u8, o: &KernelOffsets) {
    unsafe {
        (*ev).comm = read_at::<[u8; COMM_LEN]>(task, o.task_comm).unwrap_or([0; COMM_LEN]);
        (*ev).ns_tid = ns_nr(o, task);
        (*ev).ns_pid = match read_at::<*const u8>(task, o.task_group_leader) {
            Some(leader) => ns_nr(o, leader),
            None => 0,
        };
    }
}

/// Copies up to `want` bytes of user stack from `sp` upwards, one
/// page-bounded chunk at a time: a thread stack's top page is often the
/// last mapped one, and one large read would fail as a whole there.
///
/// After a stack overflow SP itself can point into the guard gap, so
/// unreadable pages before the first readable one are kept as zeros
/// (the helper zero-fills on failure); the first unreadable page after
/// readable ones is the top of the stack and ends the copy.
#[inline(always)]
unsafe fn copy_stack(
    rec: *mut SignalRecord,
    sp: u64,
    want: u32,
    read: impl Fn(*mut c_void, u32, *const c_void) -> i64,
) {
    let want = if want as usize > STACK_MAX {
        STACK_MAX as u32
    } else {
        want
    };
    let ev = unsafe { addr_of_mut!((*rec).event) };
    let buf = unsafe { addr_of_mut!((*rec).stack) } as *mut u8;
    let mut off: u32 = 0;
    let mut copied = false;
    for _ in 0..(STACK_MAX / PAGE_SIZE + 1) {
        if off >= want {
            break;
        }
        let addr = sp + off as u64;
        let mut chunk = PAGE_SIZE as u32 - (addr as u32 & (PAGE_SIZE as u32 - 1));
        if chunk > want - off {
            chunk = want - off;
        }
        let o = (off as usize) & (STACK_MAX - 1);
        let c = (chunk as usize) & (2 * PAGE_SIZE - 1);
        if c == 0 || c > PAGE_SIZE {
            break;
        }
        let r = read(
            unsafe { buf.add(o) } as *mut c_void,
            c as u32,
            addr as *const c_void,
        );
        if r != 0 {
            if unsafe { (*ev).stack_err } == 0 {
                unsafe { (*ev).stack_err = r as i32 };
            }
            if copied {
                break;
            }
        } else {
            copied = true;
        }
        off += chunk;
    }
    unsafe { (*ev).stack_len = if copied { off } else { 0 } };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
