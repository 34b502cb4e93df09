//! Stacks of live threads without stopping them: a sleepable task
//! iterator for threads blocked in the kernel, and a perf-event sampler
//! for threads running on a CPU.
//!
//! `bpf_get_task_stack` refuses user stacks of any task but the current
//! one, so the iterator reads each thread's saved user registers
//! (`bpf_task_pt_regs`, written at kernel entry) and copies its stack
//! with `bpf_copy_from_user_task`; userspace unwinds that like a crash.
//! A running thread's saved registers are stale, so the sampler catches
//! it in its own context instead.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_task_btf,
        generated::{bpf_copy_from_user_task, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::{map, perf_event},
    maps::Array,
    programs::PerfEventContext,
};
use faulthandler_common::*;

use crate::{
    EVENTS, config, copy_user_stack, current_ids, fill_task, init_record, read_at, read_regs,
    task_ids, watched,
};

/// What the next iteration dumps, and its counts (see `DumpCtl`).
#[map]
static DUMP_CTL: Array<DumpCtl> = Array::with_max_entries(1, 0);

const TASK_RUNNING: u32 = 0;

/// What the program returns to make the iterator retry the same task:
/// read() fails with EAGAIN and the next read() starts again at it. A
/// full ring thus pauses the dump until userspace has drained it,
/// instead of losing threads.
const RETRY: i32 = 1;

/// `iter.s/task`: called once per task on the system, in process
/// context and allowed to sleep, so paged-out stack pages are faulted in.
#[unsafe(link_section = "iter.s/task")]
#[unsafe(no_mangle)]
pub extern "C" fn dump_task(ctx: *mut c_void) -> i32 {
    // SAFETY: the context is `struct bpf_iter__task { struct
    // bpf_iter_meta *meta; struct task_struct *task; }`; task is NULL on
    // the final call.
    let task = unsafe { *(ctx as *const *mut task_struct).add(1) };
    if task.is_null() {
        return 0;
    }
    // SAFETY: a task the iterator holds a reference on.
    match unsafe { dump_one(task) } {
        Some(false) => RETRY,
        _ => 0,
    }
}

/// Some(true): dumped; Some(false): the ring is full, retry; None: not a
/// thread of the target.
#[inline(always)]
unsafe fn dump_one(task: *mut task_struct) -> Option<bool> {
    let cfg = config()?;
    let o = &cfg.offsets;
    let ctl = DUMP_CTL.get_ptr_mut(0)?;
    // SAFETY: `ctl` points into a live map value; iterations never run
    // concurrently (userspace runs one at a time).
    let (target, seq) = unsafe { ((*ctl).target, (*ctl).seq) };
    let t = task as *const u8;
    // SAFETY: probe reads of the task.
    let (tgid, tid) = unsafe { task_ids(cfg, t) }?;
    if target == 0 || tgid != target {
        return None;
    }
    // SAFETY: a probe read.
    let state = unsafe { read_at::<u32>(t, o.task_state) }.unwrap_or(0);
    let Some(mut entry) = EVENTS.reserve::<SignalRecord>(0) else {
        aya_log_ebpf::debug!(&crate::NO_CTX, "ring full during a dump: retrying {}", tid);
        // SAFETY: as above.
        unsafe { (*ctl).retries += 1 };
        return Some(false);
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: our own reservation; user memory is read with
    // bpf_copy_from_user_task, which checks and may fault pages in.
    unsafe {
        let ev = core::ptr::addr_of_mut!((*rec).event);
        let flags = SIG_F_DUMP
            | if state == TASK_RUNNING {
                SIG_F_RUNNING
            } else {
                0
            };
        init_record(ev, tgid, tid, flags);
        (*ev).seq = seq as u64;
        fill_task(ev, t, o);
        if read_regs(ev, bpf_task_pt_regs(task) as *const c_void) {
            copy_user_stack(rec, cfg.stack_size, |d, n, src| {
                bpf_copy_from_user_task(d, n, src, task, 0)
            });
        }
        (*ctl).emitted += 1;
    }
    entry.submit(0);
    Some(true)
}

/// A CPU-clock sample: capture the interrupted thread if it belongs to a
/// watched process (profiling) or to the dump target (a running thread
/// during a dump).
#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    let _ = try_sample(&ctx);
    0
}

fn try_sample(ctx: &PerfEventContext) -> Option<()> {
    let cfg = config()?;
    let (tgid, tid) = current_ids(cfg)?;
    let target = DUMP_CTL.get(0).map_or(0, |c| c.target);
    if tgid == 0 || (tgid != target && !watched(cfg, tgid)) {
        return None;
    }
    let mut entry = crate::reserve::<SignalRecord>(CNT_SAMPLE_RING_FULL)?;
    let rec = entry.as_mut_ptr();
    // SAFETY: our own reservation; the sample's registers come from the
    // perf context, and user memory is read with probes.
    unsafe {
        let ev = core::ptr::addr_of_mut!((*rec).event);
        init_record(ev, tgid, tid, SIG_F_SAMPLE);
        let task = bpf_get_current_task_btf();
        fill_task(ev, task as *const u8, &cfg.offsets);
        // Interrupted in user mode (the low bits of cs are the privilege
        // level): the sample's registers are the user's. In the kernel:
        // the user registers saved at kernel entry. The sample's
        // registers must be read field by field: the verifier rewrites
        // those context loads, and the context itself is not a pt_regs.
        let r = &(*ctx.ctx).regs;
        let user = if r.cs & 3 == 3 {
            (*ev).regs = [
                r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx,
                r.rdx, r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss,
            ];
            (*ev).flags |= SIG_F_HAS_REGS;
            true
        } else {
            read_regs(ev, bpf_task_pt_regs(task) as *const c_void)
        };
        if user {
            copy_user_stack(rec, cfg.stack_size, |d, n, src| {
                bpf_probe_read_user(d, n, src)
            });
        }
    }
    entry.submit(0);
    Some(())
}
