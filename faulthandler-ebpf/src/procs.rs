//! Process lifecycle of watched processes: follow forks, tell userspace
//! when to re-read mappings (exec, executable mmap), and mark deaths that
//! never pass through `signal_deliver` as themselves.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        generated::bpf_task_pt_regs,
    },
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use faulthandler_common::*;

use crate::{
    DYING, EVENTS, WATCHED, begin_dying, config, count, current_ids, read_at, task_ids, watched,
    watched_current,
};

/// Ring-buffer submit flags: a record userspace must act on now (a
/// death, a signal) forces a wake-up. Under --all, bookkeeping records
/// (fork, exec, mmap, exit of a process not being reported) wake nobody:
/// each wake-up costs the task that submits it an irq_work (a self-IPI,
/// several µs in a VM) and every exec on the host sends a few; userspace
/// reads them with the next record that wakes it, or at its poll
/// timeout. A pending unwoken record stops the kernel's default wake-up
/// (it wakes only a consumer that has caught up), hence the forcing.
pub(crate) const WAKE_NOW: u64 = BPF_RB_FORCE_WAKEUP as u64;

/// Submit flags of a bookkeeping record: outside --all the processes are
/// few and their exec and mmap records are worth reading at once (a
/// process may be gone, or its binary deleted, soon after).
#[inline(always)]
fn bookkeeping(cfg: &Config) -> u64 {
    if cfg.flags & CFG_ALL != 0 {
        BPF_RB_NO_WAKEUP as u64
    } else {
        0
    }
}

#[inline(always)]
fn emit_proc(kind: u32, pid: u32, tid: u32, arg: u32, sender: u32, addr: u64, wake: u64) {
    let ev = ProcEvent {
        header: EventHeader {
            kind,
            len: size_of::<ProcEvent>() as u32,
        },
        // SAFETY: a plain helper call.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        tid,
        arg,
        sender,
        addr,
    };
    if EVENTS.output::<ProcEvent>(&ev, wake).is_err() {
        count(CNT_EVENT_RING_FULL);
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
    let (tgid, tid) = current_ids(cfg)?;
    if !watched_current(cfg, tgid) {
        return None;
    }
    let child: *const u8 = ctx.arg(1);
    // SAFETY: probe reads of the new task.
    let (child_tgid, _) = unsafe { task_ids(cfg, child) }?;
    if child_tgid == tgid {
        return None; // a new thread, already covered
    }
    if WATCHED.insert(child_tgid, 1, 0).is_err() {
        count(CNT_WATCH_FULL);
    }
    emit_proc(EVENT_FORK, tgid, tid, child_tgid, 0, 0, bookkeeping(cfg));
    Some(())
}

/// `sched_process_exec(task, old_pid, bprm)`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let _ = try_exec(&ctx);
    0
}

fn try_exec(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let (tgid, tid) = current_ids(cfg)?;
    if !watched_current(cfg, tgid) {
        return None;
    }
    let mut entry = crate::reserve::<ExecEvent>(CNT_EVENT_RING_FULL)?;
    let ev = entry.as_mut_ptr();
    // SAFETY: our own reservation; the filename is read with a probe.
    unsafe {
        (*ev).header = EventHeader {
            kind: EVENT_EXEC,
            len: size_of::<ExecEvent>() as u32,
        };
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev).filename[0] = 0;
        let bprm: *const u8 = ctx.arg(2);
        if let Some(name) = read_at::<*const u8>(bprm, cfg.offsets.binprm_filename) {
            let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).filename);
        }
    }
    entry.submit(bookkeeping(cfg));
    Some(())
}

/// `sched_process_exit(task, group_dead)`: the last thread of a watched
/// process is gone, so any crash report for it is complete.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let (tgid, tid) = current_ids(cfg)?;
    let d = DYING.get_ptr_mut(tgid);
    // SAFETY: `d` points into a live map value; the scan count is a cap,
    // so a race between exiting threads costs at most a scan or two.
    let dying = d.map(|d| unsafe {
        crate::atomic_inc(&raw mut (*d).exited);
        if (*d).vma_scans < VMA_SCANS {
            (*d).vma_scans += 1;
            emit_vmas(cfg, tgid, tid);
        }
        *d
    });
    if ctx.arg::<u64>(1) & 0xff == 0 {
        return None; // not the last thread
    }
    if dying.is_none() && !watched(cfg, tgid) {
        return None;
    }
    let _ = DYING.remove(tgid);
    let _ = WATCHED.remove(tgid);
    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        // Without the exit record userspace still reports a death it saw
        // a thread of (after a stall); one it saw nothing of is lost whole.
        match dying {
            Some(d) if d.threads == 0 => count(CNT_REPORT_RING_FULL),
            _ => count(CNT_EVENT_RING_FULL),
        }
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: our own reservation, every field written before submit.
    unsafe {
        (*ev).header = EventHeader {
            kind: EVENT_EXIT,
            len: size_of::<ExitEvent>() as u32,
        };
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev).was_dying = dying.is_some() as u32;
        (*ev)._pad = 0;
        (*ev).dying = dying.unwrap_or_default();
    }
    // A report waits for this exit, and so does rfh-trace for its
    // command (and --pid for its processes).
    let wake = if dying.is_some() || cfg.flags & CFG_ALL == 0 {
        WAKE_NOW
    } else {
        bookkeeping(cfg)
    };
    entry.submit(wake);
    Some(())
}

/// A thread of a dying process is exiting, its mm still in place: find
/// the mappings its stack points into (see vma.rs for why not earlier).
fn emit_vmas(cfg: &Config, tgid: u32, tid: u32) {
    let Some(mut entry) = crate::reserve::<VmaEvent>(CNT_EVENT_RING_FULL) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: our own reservation; registers are read with probes.
    unsafe {
        (*ev).header = EventHeader {
            kind: EVENT_VMAS,
            len: size_of::<VmaEvent>() as u32,
        };
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev)._pad = 0;
        (*ev).nvmas = 0;
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u8;
        if let (Some(ip), Some(sp)) = (
            read_at::<u64>(regs, REG_IP as u32 * 8),
            read_at::<u64>(regs, REG_SP as u32 * 8),
        ) {
            let vmas = core::ptr::addr_of_mut!((*ev).vmas);
            (*ev).nvmas = crate::vma::capture(task, ip, sp, cfg.stack_size / 8, vmas);
        }
    }
    // The process's exit record follows and wakes userspace.
    entry.submit(bookkeeping(cfg));
}

/// `struct ma_state` (include/linux/maple_tree.h): `tree`, then the
/// range being written, `index` and `last` (inclusive).
const MAS_INDEX: u32 = 8;
const MAS_LAST: u32 = 16;
/// x86_64 syscalls through which a process maps code on purpose (ld.so
/// and dlopen map libraries with mmap; some loaders map first and make
/// the code executable with mprotect). The mappings exec makes are left
/// out: `sched_process_exec` already has userspace re-read them.
const SYS_MMAP: u64 = 9;
const SYS_MPROTECT: u64 = 10;
const SYS_PKEY_MPROTECT: u64 = 329;

/// The entry the last `ma_write` on this CPU wrote. One store into a tree
/// fires the tracepoint at several levels in a row, with the same entry:
/// only the first is looked at. (A later store of the same VMA object
/// for a new mapping comes after other writes: at least the unmap or
/// merge that freed it, which reset the slot.)
#[map]
static LAST_ENTRY: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `ma_write(fn, mas, piv, entry)`: a range of a maple tree is being
/// written. A process's mappings are a maple tree of VMAs, so this fires
/// only when mappings change (mmap, munmap, mprotect, brk, stack growth):
/// work that maps nothing pays nothing. A raw tracepoint on `sys_exit`
/// would run for every syscall on the host (about 140 ns each), and a
/// syscall tracepoint puts every task on the syscall slow path; fexit on
/// the mmap functions and the BPF LSM `mmap_file` hook are refused by
/// some kernels (see docs/performance.md).
///
/// An executable, file-backed mapping made by a watched process (a
/// dlopen, or ld.so mapping a library) tells userspace to refresh its
/// copy of the mappings while the process is alive.
#[raw_tracepoint(tracepoint = "ma_write")]
pub fn ma_write(ctx: RawTracePointContext) -> i32 {
    let _ = try_ma_write(&ctx);
    0
}

fn try_ma_write(ctx: &RawTracePointContext) -> Option<()> {
    // Every mapping change on the host passes here: cheapest tests first.
    let vma: *const u8 = ctx.arg(3);
    let last = LAST_ENTRY.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU map. A raw tracepoint program
    // runs with migration off and is never nested on one CPU (the kernel
    // skips a re-entrant run), so nothing else touches the slot meanwhile.
    unsafe {
        if *last == vma as u64 {
            return None;
        }
        *last = vma as u64;
    }
    if vma.is_null() {
        return None; // an unmap
    }
    let cfg = config()?;
    let (tgid, tid) = current_ids(cfg)?;
    if !watched_current(cfg, tgid) {
        return None;
    }
    let start = executable_file_vma(cfg, ctx.arg(1), vma)?;
    // SAFETY: the current task's saved user registers, read through the
    // fault-tolerant probe helper.
    let nr = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        read_at::<u64>(regs, REG_ORIG_AX as u32 * 8)
    }?;
    if nr != SYS_MMAP && nr != SYS_MPROTECT && nr != SYS_PKEY_MPROTECT {
        return None;
    }
    emit_proc(EVENT_MMAP, tgid, tid, 0, 0, start, bookkeeping(cfg));
    Some(())
}

/// The start of `vma` if it is the entry `mas` is writing and an
/// executable mapping of a file. Other maple trees store other things;
/// the entry is a VMA only if the range written is the VMA's own.
#[inline(always)]
fn executable_file_vma(cfg: &Config, mas: *const u8, vma: *const u8) -> Option<u64> {
    let o = &cfg.offsets;
    // SAFETY: every read goes through the fault-tolerant probe helper, so
    // a pointer that is not what it seems yields None, never a fault.
    unsafe {
        if read_at::<u64>(vma, o.vma_vm_flags)? & VM_EXEC == 0 {
            return None;
        }
        let start = read_at::<u64>(vma, o.vma_vm_start)?;
        let end = read_at::<u64>(vma, o.vma_vm_end)?;
        if read_at::<u64>(mas, MAS_INDEX)? != start
            || read_at::<u64>(mas, MAS_LAST)?.wrapping_add(1) != end
            || read_at::<u64>(vma, o.vma_vm_file)? == 0
        {
            return None;
        }
        Some(start)
    }
}

/// Signals whose default action dumps core; the kernel delivers these to
/// one thread, which `signal_deliver` captures. Every other fatal
/// default action becomes a group-wide SIGKILL at generation time.
const COREDUMP: u64 = (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 24)
    | (1 << 25)
    | (1 << 31);

/// `signal_generate(sig, info, task, group, result)`. It fires after the
/// signal is queued but while the sender still holds the target's
/// siglock, so the DYING mark is in place before any target thread can
/// dequeue the resulting group-exit SIGKILL.
#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn signal_generate(ctx: RawTracePointContext) -> i32 {
    let _ = try_generate(&ctx);
    0
}

fn try_generate(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let sig = ctx.arg::<u64>(0) as u32;
    if sig == 0 || sig >= 64 || (cfg.signal_mask | cfg.on_signal_mask) & (1u64 << sig) == 0 {
        return None;
    }
    if (COREDUMP | HARMLESS_DEFAULT) & (1u64 << sig) != 0 || ctx.arg::<u64>(4) as u32 != 0 {
        return None; // delivered normally, or not delivered at all
    }
    let task: *const u8 = ctx.arg(2);
    let o = &cfg.offsets;
    // SAFETY: probe reads of the target task.
    let (tgid, target_tid) = unsafe { task_ids(cfg, task) }?;
    if !watched(cfg, tgid) {
        return None;
    }
    // SAFETY: probe reads of the target's signal handlers.
    let sighand = unsafe { read_at::<*const u8>(task, o.task_sighand) }?;
    let slot = o.sighand_action + (sig - 1) * o.k_sigaction_size;
    // SAFETY: a probe read of the handler slot.
    if unsafe { read_at::<u64>(sighand, slot) }? != SIG_DFL {
        return None; // the process handles it and may well survive
    }
    let info: *const u8 = ctx.arg(1);
    // SEND_SIG_NOINFO (0) is a user kill; SEND_SIG_PRIV (1) the kernel's.
    let code = match info as usize {
        0 => 0,
        1 => SI_KERNEL,
        // SAFETY: a probe read of the siginfo being sent.
        _ => unsafe { read_at::<i32>(info, SI_CODE_OFF as u32) }.unwrap_or(0),
    };
    begin_dying(cfg, task, tgid, sig, code);
    let sender = current_ids(cfg).map_or(0, |(p, _)| p);
    emit_proc(
        EVENT_KILLED,
        tgid,
        target_tid,
        sig,
        sender,
        code as i64 as u64,
        WAKE_NOW,
    );
    Some(())
}

/// `mark_victim(task, uid)`: the OOM killer has sent SIGKILL to a
/// process; capture its threads as they die.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn mark_victim(ctx: RawTracePointContext) -> i32 {
    let _ = try_oom(&ctx);
    0
}

fn try_oom(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = config()?;
    let task: *const u8 = ctx.arg(0);
    // SAFETY: probe reads of the victim task.
    let (tgid, tid) = unsafe { task_ids(cfg, task) }?;
    if !watched(cfg, tgid) {
        return None;
    }
    begin_dying(cfg, task, tgid, SIGKILL, SI_KERNEL);
    emit_proc(EVENT_OOM, tgid, tid, SIGKILL, 0, 0, WAKE_NOW);
    Some(())
}
