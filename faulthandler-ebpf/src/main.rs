//! Kernel side of rfh-trace: capture what a crashing thread looked like at
//! signal delivery, while its memory still exists, and track the
//! processes being watched.
#![no_std]
#![no_main]

mod vma;

use core::{ffi::c_void, mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
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

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Failed reservations, reported to userspace in the next record.
#[map]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
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
    if o.task_thread_pid == 0 || o.upid_size == 0 {
        return 0;
    }
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

#[raw_tracepoint(tracepoint = "signal_deliver")]
pub fn signal_deliver(ctx: RawTracePointContext) -> i32 {
    let _ = try_signal_deliver(&ctx);
    0
}

fn try_signal_deliver(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let sig: u64 = ctx.arg(0);
    let sig = sig as u32;
    if sig >= 64 || cfg.signal_mask & (1u64 << sig) == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(cfg, tgid) {
        return None;
    }
    let info: *const u8 = ctx.arg(1);
    let ka: *const u8 = ctx.arg(2);

    let Some(mut entry) = EVENTS.reserve::<SignalRecord>(0) else {
        count_lost();
        return None;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        let ev = addr_of_mut!((*rec).event);
        (*ev).header = EventHeader {
            kind: EVENT_SIGNAL,
            len: size_of::<SignalEvent>() as u32,
        };
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).pid = tgid;
        (*ev).tid = pid_tgid as u32;
        (*ev).sig = sig as i32;
        (*ev).code = 0;
        (*ev).errno = 0;
        (*ev).sender_pid = 0;
        (*ev).sender_uid = 0;
        (*ev).addr = 0;
        (*ev).flags = 0;
        (*ev).lost = take_lost();
        (*ev).fp_len = 0;
        (*ev).stack_len = 0;
        (*ev).stack_err = 0;
        (*ev).nvmas = 0;
        // Group-exit SIGKILL is delivered with SEND_SIG_NOINFO (NULL).
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
        (*ev).handler = read_at::<u64>(ka, 0).unwrap_or(0);
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);

        let task = bpf_get_current_task_btf();
        let o = &cfg.offsets;
        (*ev).ns_tid = ns_nr(o, task as *const u8);
        (*ev).ns_pid = match read_at::<*const u8>(task as *const u8, o.task_group_leader) {
            Some(leader) if o.task_group_leader != 0 => ns_nr(o, leader),
            _ => 0,
        };

        let regs = bpf_task_pt_regs(task as *mut _) as *const c_void;
        let got = raw_read_kernel(
            addr_of_mut!((*ev).regs) as *mut c_void,
            (PT_REGS_LEN * 8) as u32,
            regs,
        );
        if got == 0 {
            (*ev).flags |= SIG_F_HAS_REGS;
        }
        let n = bpf_get_stack(
            ctx.as_ptr(),
            addr_of_mut!((*ev).fp) as *mut c_void,
            (FP_MAX * 8) as u32,
            BPF_F_USER_STACK as u64,
        );
        if n > 0 {
            (*ev).fp_len = (n as u32) / 8;
        }
        if got == 0 {
            let sp = (*ev).regs[REG_SP];
            copy_stack(rec, sp, cfg.stack_size);
            vma::capture(task, ev, rec);
        }
        (*ev).header.len = size_of::<SignalEvent>() as u32 + (*ev).stack_len;
    }
    entry.submit(0);
    Some(())
}

/// Copies up to `want` bytes of user stack from `sp` upwards, one
/// page-bounded chunk at a time: a thread stack's top page is often the
/// last mapped one, and one large read would fail as a whole there.
#[inline(always)]
unsafe fn copy_stack(rec: *mut SignalRecord, sp: u64, want: u32) {
    let want = if want as usize > STACK_MAX {
        STACK_MAX as u32
    } else {
        want
    };
    let ev = unsafe { addr_of_mut!((*rec).event) };
    let buf = unsafe { addr_of_mut!((*rec).stack) } as *mut u8;
    let mut off: u32 = 0;
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
        let r = unsafe {
            bpf_probe_read_user(buf.add(o) as *mut c_void, c as u32, addr as *const c_void)
        };
        if r != 0 {
            unsafe { (*ev).stack_err = r as i32 };
            break;
        }
        off += chunk;
    }
    unsafe { (*ev).stack_len = off };
}

#[inline(always)]
fn emit_proc(kind: u32, pid: u32, tid: u32, arg: u32, addr: u64) {
    let ev = ProcEvent {
        header: EventHeader {
            kind,
            len: size_of::<ProcEvent>() as u32,
        },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        tid,
        arg,
        _pad: 0,
        addr,
    };
    if EVENTS.output::<ProcEvent>(&ev, 0).is_err() {
        count_lost();
    }
}

/// A watched process forking a new process makes the child watched, in
/// the parent's context and before the child can run, so a child that
/// crashes at once is still caught.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    if cfg.flags & CFG_FOLLOW == 0 || cfg.flags & CFG_ALL != 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    unsafe { WATCHED.get(&tgid) }?;
    let child: *const u8 = ctx.arg(1);
    let child_tgid = unsafe { read_at::<u32>(child, cfg.offsets.task_tgid) }?;
    if child_tgid == tgid {
        return None; // a new thread, already covered
    }
    if WATCHED.insert(&child_tgid, &1, 0).is_err() {
        count_lost();
    }
    emit_proc(EVENT_FORK, tgid, pid_tgid as u32, child_tgid, 0);
    Some(())
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    if let Some(cfg) = config() {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        if watched(cfg, tgid) {
            emit_proc(EVENT_EXEC, tgid, pid_tgid as u32, 0, 0);
        }
    }
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    if let Some(cfg) = config() {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        if tgid == pid_tgid as u32 && watched(cfg, tgid) {
            emit_proc(EVENT_EXIT, tgid, pid_tgid as u32, 0, 0);
        }
    }
    0
}

const SYS_MMAP: u64 = 9;
const PROT_EXEC: u64 = 4;
/// `struct pt_regs` byte offsets: orig_ax and dx (the third argument).
const PT_REGS_ORIG_AX: u32 = 15 * 8;
const PT_REGS_DX: u32 = 12 * 8;

/// An executable mmap in a watched process (a dlopen, or ld.so mapping a
/// library) tells userspace to refresh its copy of the mappings now,
/// while the process is alive.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_sys_exit(&ctx);
    0
}

fn try_sys_exit(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !watched(cfg, tgid) {
        return None;
    }
    let regs: *const u8 = ctx.arg(0);
    let nr = unsafe { read_at::<u64>(regs, PT_REGS_ORIG_AX) }?;
    if nr != SYS_MMAP {
        return None;
    }
    let ret: i64 = ctx.arg(1);
    let prot = unsafe { read_at::<u64>(regs, PT_REGS_DX) }?;
    if ret < 0 || prot & PROT_EXEC == 0 {
        return None;
    }
    emit_proc(EVENT_MMAP, tgid, pid_tgid as u32, 0, ret as u64);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
