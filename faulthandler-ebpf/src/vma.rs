//! Resolve, in the kernel, the mappings that a dying thread's IP and
//! stack words point into.
//!
//! Userspace normally knows a watched process's mappings ahead of time
//! (read from /proc at attach, exec and executable mmap). A process that
//! crashes microseconds after exec can die before that read happens, and
//! by the time userspace handles the event its mm is gone. The return
//! addresses a DWARF unwind will visit all sit in the stack, so looking
//! each plausible code pointer up with `bpf_find_vma` gives userspace
//! every mapping it can need, whatever it learned in time.
//!
//! `signal_deliver` runs under the siglock with interrupts off, where
//! `bpf_find_vma` can unlock the mm only through a per-CPU irq_work: the
//! first lookup succeeds and every later one fails with EBUSY until
//! interrupts are back on. So the signal records only the IP's mapping,
//! and the stack scan runs at `sched_process_exit`, which this kernel
//! fires before `exit_mm`, with interrupts on.

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::{
    helpers::{
        bpf_get_current_task_btf, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user,
        generated::{bpf_find_vma, bpf_loop, bpf_probe_read_kernel as raw_read_kernel},
    },
    macros::map,
    maps::PerCpuArray,
};
use faulthandler_common::*;

use crate::{CONFIG, read_at};

#[repr(C)]
pub struct ScanState {
    sp: u64,
    n: u64,
    vmas: [Vma; VMA_MAX],
}

/// bpf_find_vma's answer for an address with no mapping: not a failure.
const ENOENT: i32 = 2;
/// Words this far above SP point into the thread's own stack: no code
/// there, and not worth a lookup.
const STACK_SPAN: u64 = 8 << 20;

/// Scratch space: the scan state is far too large for the 512-byte stack.
#[map]
static SCAN: PerCpuArray<ScanState> = PerCpuArray::with_max_entries(1, 0);

/// Records the mapping of `ip` and of every code-looking word among the
/// `words` stack words above `sp` into `out`; returns how many.
pub unsafe fn capture(
    task: *mut aya_ebpf::bindings::task_struct,
    ip: u64,
    sp: u64,
    words: u32,
    out: *mut [Vma; VMA_MAX],
) -> u32 {
    let Some(st) = SCAN.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*st).sp = sp;
        (*st).n = 0;
        lookup(task, ip);
        if words > 0 {
            bpf_loop(
                words,
                scan_word as *const () as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
        let n = (*st).n;
        raw_read_kernel(
            out as *mut c_void,
            core::mem::size_of::<[Vma; VMA_MAX]>() as u32,
            addr_of_mut!((*st).vmas) as *const c_void,
        );
        if n > VMA_MAX as u64 {
            VMA_MAX as u32
        } else {
            n as u32
        }
    }
}

/// Looks `addr` up unless an already-recorded mapping covers it.
#[inline(always)]
unsafe fn lookup(task: *mut aya_ebpf::bindings::task_struct, addr: u64) -> i64 {
    if !(USER_ADDR_MIN..USER_ADDR_MAX).contains(&addr) {
        return 0;
    }
    let Some(st) = SCAN.get_ptr_mut(0) else {
        return 1;
    };
    let n = unsafe { (*st).n };
    for j in 0..VMA_MAX {
        if j as u64 >= n {
            break;
        }
        let v = unsafe { &(*st).vmas[j] };
        if addr >= v.start && addr < v.end {
            return 0;
        }
    }
    let sp = unsafe { (*st).sp };
    if addr >= sp && addr - sp < STACK_SPAN {
        return 0;
    }
    if n >= VMA_MAX as u64 {
        return 1;
    }
    // SAFETY: `task` is the current task; the callback only writes the
    // per-CPU scan state.
    let r = unsafe {
        bpf_find_vma(
            task,
            addr,
            record_vma as *const () as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    if r < 0 && r != -(ENOENT as i64) {
        aya_log_ebpf::debug!(&crate::NO_CTX, "mapping lookup of {:x} failed: {}", addr, r);
    }
    0
}

#[inline(never)]
extern "C" fn scan_word(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(st) = SCAN.get_ptr_mut(0) else {
        return 1;
    };
    let sp = unsafe { (*st).sp };
    let Ok(word) = (unsafe { bpf_probe_read_user((sp + i * 8) as *const u64) }) else {
        return 0;
    };
    let task = unsafe { bpf_get_current_task_btf() };
    unsafe { lookup(task, word) }
}

#[inline(never)]
extern "C" fn record_vma(_task: *mut c_void, vma: *mut c_void, _ctx: *mut c_void) -> i64 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    let Some(st) = SCAN.get_ptr_mut(0) else {
        return 0;
    };
    let o = &cfg.offsets;
    let vma = vma as *const u8;
    unsafe {
        let start = read_at::<u64>(vma, o.vma_vm_start).unwrap_or(0);
        let end = read_at::<u64>(vma, o.vma_vm_end).unwrap_or(0);
        let flags = read_at::<u64>(vma, o.vma_vm_flags).unwrap_or(0);
        let file = read_at::<*const u8>(vma, o.vma_vm_file).filter(|f| !f.is_null());
        // Only code is worth a slot: the heap and anonymous mappings
        // would use up the table before the libraries are found.
        if file.is_none() || flags & VM_EXEC == 0 {
            return 0;
        }
        let n = (*st).n as usize;
        if n >= VMA_MAX {
            return 0;
        }
        let v = &mut (*st).vmas[n];
        v.start = start;
        v.end = end;
        v.file_offset = read_at::<u64>(vma, o.vma_vm_pgoff).unwrap_or(0) << 12;
        v.vm_flags = flags as u32;
        v.ino = 0;
        v.dev = 0;
        v.name[0] = 0;
        if let Some(file) = file {
            if let Some(inode) = read_at::<*const u8>(file, o.file_f_inode) {
                v.ino = read_at::<u64>(inode, o.inode_i_ino).unwrap_or(0);
                if let Some(sb) = read_at::<*const u8>(inode, o.inode_i_sb) {
                    v.dev = read_at::<u32>(sb, o.sb_s_dev).unwrap_or(0);
                }
            }
            if let Some(dentry) = read_at::<*const u8>(file, o.file_f_path_dentry) {
                if let Some(name) = read_at::<*const u8>(dentry, o.dentry_d_name_name) {
                    let _ = bpf_probe_read_kernel_str_bytes(name, &mut v.name);
                }
            }
        }
        (*st).n = n as u64 + 1;
    }
    0
}
