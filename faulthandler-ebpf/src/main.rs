//! Kernel side of rfh-trace: capture what a crashing thread looked like at
//! signal delivery, while its memory still exists, and track the
//! processes being watched.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod dump;
mod procs;
mod python;
mod vma;

use core::{ffi::c_void, intrinsics::AtomicOrdering, mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_stack,
            bpf_probe_read_kernel as raw_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
        },
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use aya_log_ebpf::{debug, warn};
use faulthandler_common::*;

/// aya-log wants a context argument it does not use; the log sites below
/// are in helpers that have none.
const NO_CTX: () = ();

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// tgid → 1 for every watched process.
#[map]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(WATCH_MAX, 0);

/// tgid → capture state of each watched process that is dying of a
/// reported signal.
#[map]
static DYING: HashMap<u32, Dying> = HashMap::with_max_entries(DYING_MAX, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Drops by cause (`CNT_*`); userspace sums and reports them.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn watched(cfg: &Config, tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence, never held.
    cfg.flags & CFG_ALL != 0 || unsafe { WATCHED.get(tgid) }.is_some()
}

/// `watched` for the current task. Under `--cgroup` (`CFG_CGROUP`), a
/// task of the watched subtree joins the watch set the first time it
/// passes here: one hash lookup and one helper call (its ancestor's
/// cgroup id at the subtree's level) for tasks elsewhere, nothing more.
#[inline(always)]
fn watched_current(cfg: &Config, tgid: u32) -> bool {
    if watched(cfg, tgid) {
        return true;
    }
    if cfg.flags & CFG_CGROUP == 0 {
        return false;
    }
    // SAFETY: a plain helper call on the current task.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.cgroup_level as i32) };
    if id != cfg.cgroup_id {
        return false;
    }
    if WATCHED.insert(tgid, 1, 0).is_err() {
        count(CNT_WATCH_FULL);
    }
    true
}

/// Counts one drop of `cause` on this CPU.
#[inline(always)]
fn count(cause: u32) {
    if let Some(p) = DROPS.get_ptr_mut(cause) {
        // SAFETY: a per-CPU slot; this program cannot be preempted by
        // another use of the same slot on this CPU.
        unsafe { *p += 1 };
    }
}

/// Adds 1 to a counter other CPUs may be adding to at the same time.
#[inline(always)]
fn atomic_inc(counter: *mut u64) {
    // SAFETY: `counter` points into a live map value. The bpf target's
    // core has no atomic read-modify-write types; the intrinsic lowers to
    // BPF's atomic add.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// A ring-buffer reservation; a full buffer is counted under `cause`.
#[inline(always)]
fn reserve<T: 'static>(cause: u32) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(cause);
    }
    entry
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address itself and fails
    // cleanly on a bad one.
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T) }.ok()
}

/// The pid number of `task`'s struct pid (`thread_pid`) in its own,
/// innermost PID namespace.
#[inline(always)]
unsafe fn ns_nr(o: &KernelOffsets, task: *const u8) -> u32 {
    // SAFETY: every read goes through read_at (probe reads).
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

/// `task`'s pid number in rfh-trace's own PID namespace; None when the
/// task is not visible from there (it lives outside that namespace).
/// The namespace's level is not known to userspace inside a container
/// (its /proc shows no outer levels), so the levels are searched for it.
#[inline(always)]
unsafe fn view_nr(cfg: &Config, task: *const u8) -> Option<u32> {
    let o = &cfg.offsets;
    // SAFETY: every read goes through read_at (probe reads).
    unsafe {
        let pid = read_at::<*const u8>(task, o.task_thread_pid)?;
        let level = read_at::<u32>(pid, o.pid_level)?;
        for l in 1..=PID_NS_LEVELS {
            if l > level {
                break;
            }
            let upid = o.pid_numbers + l * o.upid_size;
            let ns = read_at::<*const u8>(pid, upid + o.upid_ns)?;
            if read_at::<u32>(ns, o.pidns_inum)? == cfg.view_ns_inum {
                return read_at::<u32>(pid, upid);
            }
        }
        None
    }
}

/// (tgid, tid) of `task` as rfh-trace sees them.
#[inline(always)]
unsafe fn task_ids(cfg: &Config, task: *const u8) -> Option<(u32, u32)> {
    let o = &cfg.offsets;
    // SAFETY: every read goes through read_at (probe reads).
    unsafe {
        if cfg.view_ns_inum == 0 {
            return Some((read_at(task, o.task_tgid)?, read_at(task, o.task_pid)?));
        }
        let leader = read_at::<*const u8>(task, o.task_group_leader)?;
        Some((view_nr(cfg, leader)?, view_nr(cfg, task)?))
    }
}

/// (tgid, tid) of the current task as rfh-trace sees them.
#[inline(always)]
fn current_ids(cfg: &Config) -> Option<(u32, u32)> {
    if cfg.view_ns_inum == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        return Some(((pid_tgid >> 32) as u32, pid_tgid as u32));
    }
    // SAFETY: the current task is valid for the whole program run.
    unsafe { task_ids(cfg, bpf_get_current_task_btf() as *const u8) }
}

/// Marks `tgid` as dying of `sig`, so its other threads are captured as
/// they take the group-exit SIGKILL, and returns its entry. An existing
/// mark (a fault on another thread already being reported) is kept.
#[inline(always)]
fn begin_dying(
    cfg: &Config,
    task: *const u8,
    tgid: u32,
    sig: u32,
    code: i32,
) -> Option<*mut Dying> {
    if let Some(d) = DYING.get_ptr_mut(tgid) {
        return Some(d);
    }
    let o = &cfg.offsets;
    // SAFETY: probe reads of the task's signal_struct.
    let total = unsafe {
        read_at::<*const u8>(task, o.task_signal)
            .and_then(|s| read_at::<i32>(s, o.signal_nr_threads))
            .unwrap_or(0)
    };
    let d = Dying {
        total: total.max(0) as u32,
        sig,
        code,
        ..Dying::default()
    };
    if DYING.insert(tgid, d, BPF_NOEXIST as u64).is_err() && DYING.get_ptr_mut(tgid).is_none() {
        count(CNT_DYING_FULL);
        warn!(
            &NO_CTX,
            "dying map full: the other threads of {} are not captured", tgid
        );
    }
    DYING.get_ptr_mut(tgid)
}

#[raw_tracepoint(tracepoint = "signal_deliver")]
pub fn signal_deliver(ctx: RawTracePointContext) -> i32 {
    let _ = try_signal_deliver(&ctx);
    0
}

fn try_signal_deliver(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let sig = ctx.arg::<u64>(0) as u32;
    if sig >= 64 {
        return None;
    }
    let info: *const u8 = ctx.arg(1);
    let ka: *const u8 = ctx.arg(2);
    // While a process dies, every thread but the one that took the fatal
    // signal passes through here with the group-exit SIGKILL (info NULL,
    // SEND_SIG_NOINFO), in its own context and before exit_mm: the only
    // point where a sibling's user stack can still be read. Such
    // deliveries are captured only for processes already known to be
    // dying of something reported, so a plain exit_group costs nothing.
    let group_exit = sig == SIGKILL && info.is_null();
    let bit = 1u64 << sig;
    if !group_exit && (cfg.signal_mask | cfg.on_signal_mask) & bit == 0 {
        return None;
    }
    // SAFETY: probe reads; `ka` is the k_sigaction in force.
    let handler = unsafe { read_at::<u64>(ka, 0) }.unwrap_or(0);
    let survived = !group_exit && (handler != SIG_DFL || default_is_harmless(sig));
    // The process's own handler runs, or the signal is harmless: not a
    // crash, and, unless `--on-signal` asks for it, it costs the process
    // nothing more than this (no lookup, no copy, no record). A handler
    // that re-raises from inside leaves its signal frame and the original
    // frames in the fatal delivery's stack copy; one that returns first
    // leaves the fault's details in the thread's trap fields, read then.
    if survived && cfg.on_signal_mask & bit == 0 {
        return None;
    }
    let (tgid, tid) = current_ids(cfg)?;
    // SAFETY: the current task is valid for the whole program run.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // SAFETY: probe read of the siginfo the kernel is delivering.
    let code = unsafe { read_at::<i32>(info, SI_CODE_OFF as u32) }.unwrap_or(0);
    let dying = if group_exit {
        let d = DYING.get_ptr_mut(tgid)?;
        // SAFETY: `d` points into a live map value. The cap is checked
        // before the add, so a burst of threads on several CPUs may pass
        // it by a few; the counts stay exact.
        if unsafe { (*d).threads + (*d).lost } >= cfg.max_threads as u64 {
            // SAFETY: as above.
            atomic_inc(unsafe { &raw mut (*d).omitted });
            return None;
        }
        Some(d)
    } else {
        if !watched_current(cfg, tgid) {
            return None;
        }
        if survived {
            // An --on-signal delivery: recorded, but nobody is dying.
            None
        } else {
            begin_dying(cfg, task, tgid, sig, code)
        }
    };

    // The Python frames go first, so that userspace has them when the
    // signal record arrives (an --on-signal report is made at once).
    let py_flags = python::capture(cfg, task, tgid, tid);
    let Some(mut entry) = EVENTS.reserve::<SignalRecord>(0) else {
        warn!(
            ctx,
            "ring full: the record of signal {} to {}/{} is lost", sig, tgid, tid
        );
        match dying {
            Some(d) => {
                // SAFETY: `d` points into a live map value.
                atomic_inc(unsafe { &raw mut (*d).lost });
                count(CNT_THREAD_RING_FULL);
            }
            None => count(CNT_REPORT_RING_FULL),
        }
        return None;
    };
    if let Some(d) = dying {
        // SAFETY: `d` points into a live map value.
        atomic_inc(unsafe { &raw mut (*d).threads });
    }
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` is this program's own reservation; every field is
    // written before submit, and kernel/user memory is read with probes.
    unsafe {
        let ev = addr_of_mut!((*rec).event);
        init_record(ev, tgid, tid, if group_exit { SIG_F_GROUP_EXIT } else { 0 });
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).sig = sig as i32;
        (*ev).handler = handler;
        (*ev).flags |= py_flags;
        if !info.is_null() {
            (*ev).flags |= SIG_F_HAS_INFO;
            (*ev).errno = read_at::<i32>(info, SI_ERRNO_OFF as u32).unwrap_or(0);
            (*ev).code = code;
            if code <= 0 {
                (*ev).sender_pid = read_at::<i32>(info, SI_PID_OFF as u32).unwrap_or(0);
                (*ev).sender_uid = read_at::<u32>(info, SI_UID_OFF as u32).unwrap_or(0);
            } else {
                (*ev).addr = read_at::<u64>(info, SI_ADDR_OFF as u32).unwrap_or(0);
            }
        }
        fill_task(ev, task, &cfg.offsets);
        if !group_exit && code <= 0 {
            // Sent by a process (perhaps itself, re-raising): the thread's
            // last fault, for userspace to tell a re-raise by.
            let o = &cfg.offsets;
            (*ev).trap = ThreadTrap {
                trap_nr: read_at::<u64>(task, o.thread_trap_nr).unwrap_or(0),
                error_code: read_at::<u64>(task, o.thread_error_code).unwrap_or(0),
                cr2: read_at::<u64>(task, o.thread_cr2).unwrap_or(0),
            };
            (*ev).flags |= SIG_F_TRAP;
        }
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
            (*ev).nvmas = vma::capture(
                task as *mut _,
                (*ev).regs[REG_IP],
                (*ev).regs[REG_SP],
                0,
                vmas,
            );
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
    // SAFETY: the caller passes its own ring reservation.
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
        (*ev).seq = 0;
        (*ev).fsbase = 0;
        (*ev).cgroup_id = 0;
        (*ev).trap = ThreadTrap::default();
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
    // SAFETY: `ev` is the caller's reservation; the registers are read
    // with the fault-tolerant probe helper.
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
    // SAFETY: `rec` is the caller's reservation.
    unsafe {
        let ev = addr_of_mut!((*rec).event);
        copy_stack(rec, (*ev).regs[REG_SP], stack_size, read);
        (*ev).header.len = size_of::<SignalEvent>() as u32 + (*ev).stack_len;
    }
}

/// Thread identity: comm, and pid/tid in the task's own PID namespace.
#[inline(always)]
unsafe fn fill_task(ev: *mut SignalEvent, task: *const u8, o: &KernelOffsets) {
    // SAFETY: `ev` is the caller's reservation; the task is read with
    // probes.
    unsafe {
        (*ev).comm = read_at::<[u8; COMM_LEN]>(task, o.task_comm).unwrap_or([0; COMM_LEN]);
        (*ev).ns_tid = ns_nr(o, task);
        (*ev).fsbase = read_at::<u64>(task, o.task_fsbase).unwrap_or(0);
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
    // SAFETY: `rec` is the caller's reservation (and below).
    let ev = unsafe { addr_of_mut!((*rec).event) };
    // SAFETY: as above.
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
            // SAFETY: `o` is masked below STACK_MAX, inside the buffer.
            unsafe { buf.add(o) } as *mut c_void,
            c as u32,
            addr as *const c_void,
        );
        if r != 0 {
            // SAFETY: `ev` is the caller's reservation.
            if unsafe { (*ev).stack_err } == 0 {
                debug!(
                    &NO_CTX,
                    "reading the user stack at {:x} failed: {}", addr, r
                );
                // SAFETY: as above.
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
    if !copied {
        count(CNT_STACK_COPY);
    }
    // SAFETY: `ev` is the caller's reservation.
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
