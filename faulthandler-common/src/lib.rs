//! The one definition of every type that crosses the kernel↔user boundary.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields, so the eBPF
//! object and the loader can never disagree on a layout; the size asserts at
//! the bottom fail the build if a field is added without thinking about it.
#![no_std]

/// Largest user-stack copy one signal event can carry. The ring-buffer
/// reservation has to be a verifier-visible constant, so this is the upper
/// bound; `Config::stack_size` picks how much of it is actually copied.
/// Every record reserves this much whatever is copied, and the ring
/// buffer is mapped (twice) into rfh-trace, so it is kept at the default.
pub const STACK_MAX: usize = 32 * 1024;
/// Size of the event ring buffer: room for a 256-thread crash report's
/// records even before userspace starts draining.
pub const RING_BYTES: u32 = 16 * 1024 * 1024;
/// Default number of stack bytes copied from SP (`--stack-size`).
pub const STACK_DEFAULT: u32 = 32 * 1024;
/// Frame-pointer chain depth from `bpf_get_stack`.
pub const FP_MAX: usize = 64;
/// Mappings resolved in the kernel at signal time (see `Vma`).
pub const VMA_MAX: usize = 24;
/// Bytes of the mapped file's dentry name kept per `Vma`.
pub const VMA_NAME_LEN: usize = 64;
/// `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// Maximum number of processes in the watch map.
pub const WATCH_MAX: u32 = 16384;
/// Most processes dying at once whose threads are being captured.
pub const DYING_MAX: u32 = 1024;

// Kernel ABI, x86_64. Both sides read these here so they cannot disagree.

pub const SIGKILL: u32 = 9;
/// Nesting limit of PID namespaces (`MAX_PID_NS_LEVEL`).
pub const PID_NS_LEVELS: u32 = 32;
/// `si_code` of a signal the kernel itself sent.
pub const SI_KERNEL: i32 = 0x80;
/// `vm_flags` bit of an executable mapping.
pub const VM_EXEC: u64 = 4;
/// Lowest address a user mapping can start at (`mmap_min_addr` floor).
pub const USER_ADDR_MIN: u64 = 0x1000;
/// User space ends here with 4-level paging, and 5-level paging hands out
/// higher addresses only on explicit request: nothing above is user code.
pub const USER_ADDR_MAX: u64 = 0x0000_8000_0000_0000;
/// `siginfo_t` byte offsets: si_errno, si_code, and the union that holds
/// si_pid/si_uid for user-sent signals and si_addr for faults.
pub const SI_ERRNO_OFF: usize = 4;
pub const SI_CODE_OFF: usize = 8;
pub const SI_PID_OFF: usize = 16;
pub const SI_UID_OFF: usize = 20;
pub const SI_ADDR_OFF: usize = 16;

/// Every record in the ring buffer starts with this header; `len` is the
/// number of meaningful bytes including the header, so the decoder can
/// reject short or truncated records before it casts anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub len: u32,
}

pub const EVENT_SIGNAL: u32 = 1;
pub const EVENT_EXEC: u32 = 2;
pub const EVENT_MMAP: u32 = 3;
pub const EVENT_FORK: u32 = 4;
pub const EVENT_EXIT: u32 = 5;
/// A watched process is being killed by a signal that never reaches
/// `signal_deliver` as itself: a default-action terminating signal that
/// the kernel turns into a group-wide SIGKILL at generation time (e.g.
/// `kill -9` when SIGKILL is in `--signals`).
pub const EVENT_KILLED: u32 = 6;
/// The OOM killer chose a watched process (`oom:mark_victim`).
pub const EVENT_OOM: u32 = 7;
/// The mappings a dying thread's stack points into, resolved as it exits.
pub const EVENT_VMAS: u32 = 8;
/// A thread's Python frames, copied at signal time (`PyStackEvent`); it
/// comes just before the thread's `EVENT_SIGNAL` record.
pub const EVENT_PYSTACK: u32 = 9;

/// `sa_handler` values with a meaning of their own.
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;

/// Signals whose default action does not end the process: stop,
/// continue, or ignore (CHLD, CONT, STOP, TSTP, TTIN, TTOU, URG, WINCH).
/// The kernel side and userspace must agree on what is fatal, so both
/// read it from here.
pub const HARMLESS_DEFAULT: u64 =
    (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23) | (1 << 28);

/// True when `sig`'s default action leaves the process alive.
pub const fn default_is_harmless(sig: u32) -> bool {
    sig < 64 && HARMLESS_DEFAULT & (1u64 << sig) != 0
}

/// The last hardware exception the kernel turned into a signal for a
/// thread (`task->thread.{trap_nr, error_code, cr2}`, set by
/// `set_signal_archinfo`): what a handler that re-raises was called for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTrap {
    pub trap_nr: u64,
    pub error_code: u64,
    pub cr2: u64,
}

/// `SignalEvent::flags` bits.
pub const SIG_F_HAS_INFO: u32 = 1 << 0;
pub const SIG_F_HAS_REGS: u32 = 1 << 1;
/// The group-exit SIGKILL every other thread takes while a process dies:
/// a sibling's stack at the moment of death, not a signal of its own.
pub const SIG_F_GROUP_EXIT: u32 = 1 << 2;
/// Not a signal: a thread's state read by the dump iterator.
pub const SIG_F_DUMP: u32 = 1 << 3;
/// Not a signal: a perf-event sample of a running thread.
pub const SIG_F_SAMPLE: u32 = 1 << 4;
/// The dumped thread was on a CPU (TASK_RUNNING): its saved registers
/// are stale, so a sample must stand in for them.
pub const SIG_F_RUNNING: u32 = 1 << 5;
/// `SignalEvent::trap` is set.
pub const SIG_F_TRAP: u32 = 1 << 6;
/// The process is a known CPython and its thread's `EVENT_PYSTACK` record
/// went into the ring just before this one.
pub const SIG_F_PYTHON: u32 = 1 << 7;
/// The process is a known CPython but the thread's `EVENT_PYSTACK` record
/// did not fit in the ring.
pub const SIG_F_PYTHON_LOST: u32 = 1 << 8;

/// A file-backed mapping the faulting thread's stack or IP points into,
/// resolved with `bpf_find_vma` while the process still exists. Userspace
/// prefers the mappings it read from /proc ahead of time; these cover the
/// window where the process died before that read happened.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `vm_pgoff << PAGE_SHIFT`: file offset of `start`.
    pub file_offset: u64,
    pub ino: u64,
    pub dev: u32,
    /// Low 32 bits of `vm_flags` (VM_READ=1, VM_WRITE=2, VM_EXEC=4).
    pub vm_flags: u32,
    pub name: [u8; VMA_NAME_LEN],
}

/// A user thread received a signal in the watched set.
///
/// The ring-buffer record is a `SignalRecord`: this struct followed by
/// `stack_len` bytes of user stack starting at `regs[REG_SP]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SignalEvent {
    pub header: EventHeader,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at delivery.
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub ns_pid: u32,
    pub ns_tid: u32,
    pub sig: i32,
    pub code: i32,
    pub errno: i32,
    /// `si_pid` for user-sent signals (`code <= 0`), else 0.
    pub sender_pid: i32,
    pub sender_uid: u32,
    pub flags: u32,
    /// `si_addr` for faults.
    pub addr: u64,
    /// `sa_handler` of the action in force (0 = SIG_DFL, 1 = SIG_IGN).
    pub handler: u64,
    /// Dump records: `DumpCtl::seq` of the iteration that wrote them.
    pub seq: u64,
    /// `task->thread.fsbase`: the thread's TLS base, which glibc's
    /// `pthread_self()` returns (how CPython 3.8–3.10 name a thread).
    pub fsbase: u64,
    /// Signal records: the cgroup v2 id of the receiving thread
    /// (`bpf_get_current_cgroup_id`), 0 when unknown. A process that dies
    /// before /proc is read still has its container known by it.
    pub cgroup_id: u64,
    /// With `SIG_F_TRAP` (a signal the process sent itself): the thread's
    /// last fault. A handler that re-raises after returning dies of a
    /// signal whose own siginfo says only SI_TKILL; the fault it handled
    /// is this one. Read at the fatal delivery, so handled faults cost
    /// nothing at all.
    pub trap: ThreadTrap,
    /// The user `pt_regs` of the thread, as the kernel lays them out.
    pub regs: [u64; PT_REGS_LEN],
    pub comm: [u8; COMM_LEN],
    pub fp_len: u32,
    pub stack_len: u32,
    /// Negative errno of the first failed stack-page read, 0 if none.
    pub stack_err: i32,
    pub nvmas: u32,
    pub fp: [u64; FP_MAX],
    pub vmas: [Vma; VMA_MAX],
}

/// Stack pages are copied one page-bounded chunk at a time; the verifier
/// cannot relate a chunk's offset to its length, so the buffer carries one
/// page of slack past `STACK_MAX`.
pub const PAGE_SIZE: usize = 4096;
pub const STACK_BUF: usize = STACK_MAX + PAGE_SIZE;

/// The full reservation for one signal event.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignalRecord {
    pub event: SignalEvent,
    pub stack: [u8; STACK_BUF],
}

/// x86_64 `struct pt_regs` is 21 u64s; indices below are its field order.
pub const PT_REGS_LEN: usize = 21;
pub const REG_BP: usize = 4;
pub const REG_BX: usize = 5;
pub const REG_DX: usize = 12;
pub const REG_ORIG_AX: usize = 15;
pub const REG_IP: usize = 16;
pub const REG_SP: usize = 19;

/// Process-level events: exec, executable mmap, fork and exit of watched
/// processes. Userspace refreshes its view of the process's mappings on
/// exec/mmap so that symbols survive the process's death.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub header: EventHeader,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// Fork: the child's tgid.
    /// Killed: the signal number. Otherwise 0.
    pub arg: u32,
    /// Killed: the sender's tgid, 0 when the kernel sent it.
    pub sender: u32,
    /// Mmap: start address of the new mapping. Killed: the si_code.
    pub addr: u64,
}

/// A watched process exec'd. `filename` is the path given to execve,
/// which may be relative to the process's working directory; userspace
/// uses it to find the executable if the process dies before its
/// mappings can be read.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub filename: [u8; EXEC_PATH_LEN],
}

pub const EXEC_PATH_LEN: usize = 256;

/// See `EVENT_VMAS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VmaEvent {
    pub header: EventHeader,
    pub pid: u32,
    pub tid: u32,
    pub nvmas: u32,
    pub _pad: u32,
    pub vmas: [Vma; VMA_MAX],
}

/// Per dying process: what it is dying of, and the fate of each of its
/// threads, so a report can say captured + omitted + lost = total.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dying {
    /// Thread records written to the ring. The counters are 64-bit so
    /// the kernel side can count with the plain atomic add every BPF CPU
    /// version has: threads die on several CPUs at once.
    pub threads: u64,
    /// Threads left out by the thread cap (`--max-threads`).
    pub omitted: u64,
    /// Thread records that did not fit in the ring.
    pub lost: u64,
    /// Threads that have exited since the death began: a death of
    /// thousands of threads takes seconds, and this shows it progressing.
    pub exited: u64,
    /// Threads in the process when its death began (`signal->nr_threads`).
    pub total: u32,
    /// The signal it is dying of, and its si_code (0 when unknown).
    pub sig: u32,
    pub code: i32,
    /// Exiting threads whose stacks were scanned for mappings (see
    /// `VMA_SCANS`).
    pub vma_scans: u32,
}

/// Threads of one death whose stacks are scanned for mappings as they
/// exit: the first few cover what a process that died before userspace
/// read /proc needs, and scanning thousands would stall the death.
pub const VMA_SCANS: u32 = 16;

/// `EVENT_EXIT`: the last thread of a watched process has exited. When it
/// was dying of something reported, `dying` holds the final counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitEvent {
    pub header: EventHeader,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// 1 when `dying` is meaningful.
    pub was_dying: u32,
    pub _pad: u32,
    pub dying: Dying,
}

/// The dump iterator's control block (map `DUMP_CTL`, one entry):
/// userspace sets `target` and `seq` before each iteration and reads the
/// counts after it, so it knows how many records to wait for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpCtl {
    /// The process (as rfh-trace sees its pid) whose threads are dumped,
    /// 0 for none.
    pub target: u32,
    /// Stamped into each record as `SignalEvent::seq`.
    pub seq: u32,
    /// Records written by this iteration.
    pub emitted: u64,
    /// Times a record did not fit and the iterator asked to retry.
    pub retries: u64,
}

/// `Config::flags` bits.
pub const CFG_ALL: u32 = 1 << 0;
pub const CFG_FOLLOW: u32 = 1 << 1;
/// Watch the processes of one cgroup subtree (`Config::cgroup_id`): a
/// task found there joins the watch set (agent `--cgroup`).
pub const CFG_CGROUP: u32 = 1 << 2;

/// Kernel struct member offsets, read by userspace from
/// /sys/kernel/btf/vmlinux, because Rust eBPF has no CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_thread_pid: u32,
    pub task_group_leader: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub vma_vm_start: u32,
    pub vma_vm_end: u32,
    pub vma_vm_pgoff: u32,
    pub vma_vm_file: u32,
    pub vma_vm_flags: u32,
    pub file_f_inode: u32,
    pub file_f_path_dentry: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub dentry_d_name_name: u32,
    pub task_sighand: u32,
    pub sighand_action: u32,
    pub k_sigaction_size: u32,
    pub binprm_filename: u32,
    pub task_comm: u32,
    pub task_state: u32,
    pub task_signal: u32,
    pub signal_nr_threads: u32,
    /// `struct upid::ns` and `pid_namespace::ns.inum`: which namespace a
    /// pid number belongs to.
    pub upid_ns: u32,
    pub pidns_inum: u32,
    /// `task_struct::thread.fsbase` (x86_64).
    pub task_fsbase: u32,
    /// `task_struct::thread.{cr2, trap_nr, error_code}` (x86_64).
    pub thread_cr2: u32,
    pub thread_trap_nr: u32,
    pub thread_error_code: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// Bytes of user stack to copy, at most `STACK_MAX`.
    pub stack_size: u32,
    /// Bit N set: signal N is reported when it kills the process.
    pub signal_mask: u64,
    /// Bit N set: signal N asks for a dump when it does not kill the
    /// process (`--on-signal`).
    pub on_signal_mask: u64,
    /// Most threads captured per dying process (`--max-threads`).
    pub max_threads: u32,
    /// The inode number of the PID namespace rfh-trace runs in, 0 for
    /// the host's. Every pid the kernel side reports or looks up is the
    /// process's number in that namespace, so rfh-trace inside a
    /// container sees the pids its own /proc shows.
    pub view_ns_inum: u32,
    /// With `CFG_CGROUP`: the id of the watched cgroup (its cgroup2 inode
    /// number) and its depth below the root, as
    /// `bpf_get_current_ancestor_cgroup_id` counts levels.
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    pub _pad: u32,
    pub offsets: KernelOffsets,
}

/// Indices into the per-CPU drop counters (map `COUNTERS`), one per
/// cause; userspace sums them every poll. Each drop is counted once.
/// A whole report (a crash whose every record was lost, or an
/// `--on-signal` delivery) did not fit in the ring.
pub const CNT_REPORT_RING_FULL: u32 = 0;
/// One thread of a report did not fit (also counted in `Dying::lost`).
pub const CNT_THREAD_RING_FULL: u32 = 1;
/// A process-lifecycle or mapping record did not fit: symbols may suffer.
pub const CNT_EVENT_RING_FULL: u32 = 2;
/// A CPU sample for a `--timeout` profile did not fit.
pub const CNT_SAMPLE_RING_FULL: u32 = 3;
/// A process could not be added to the watch map (it is full).
pub const CNT_WATCH_FULL: u32 = 4;
/// A death could not be tracked (the dying map is full): its other
/// threads are not captured.
pub const CNT_DYING_FULL: u32 = 5;
/// A thread's user stack could not be read at all.
pub const CNT_STACK_COPY: u32 = 6;
/// A thread's Python frames did not fit (its native record may have):
/// the report says so on that thread.
pub const CNT_PYTHON_RING_FULL: u32 = 7;
pub const COUNTERS: u32 = 8;
/// The cause names userspace reports, indexed like the counters.
pub const COUNTER_NAMES: [&str; COUNTERS as usize] = [
    "ring_full",
    "threads_ring_full",
    "events_ring_full",
    "samples_ring_full",
    "watch_map_full",
    "dying_map_full",
    "stack_copy_failed",
    "python_ring_full",
];

mod python;
pub use python::*;

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(EventHeader, 8);
assert_size!(Vma, 40 + VMA_NAME_LEN);
assert_size!(ThreadTrap, 24);
assert_size!(
    SignalEvent,
    8 + 8
        + 8
        + 24
        + 16
        + 16
        + 8
        + 8
        + 8
        + 8
        + 8
        + PT_REGS_LEN * 8
        + COMM_LEN
        + 16
        + FP_MAX * 8
        + VMA_MAX * (40 + VMA_NAME_LEN)
);
assert_size!(SignalRecord, size_of::<SignalEvent>() + STACK_BUF);
assert_size!(ProcEvent, 40);
assert_size!(KernelOffsets, 32 * 4);
assert_size!(Dying, 48);
assert_size!(ExitEvent, 32 + 48);
assert_size!(DumpCtl, 24);
assert_size!(VmaEvent, 24 + VMA_MAX * (40 + VMA_NAME_LEN));
assert_size!(ExecEvent, 24 + EXEC_PATH_LEN);
assert_size!(Config, 48 + 32 * 4);
assert_size!(PyProc, 16 + 26 * 4);
assert_size!(PyStackEvent, 64);
assert_size!(PyRegion, 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for each impl below): the type is repr(C), holds only
    // integers and arrays of integers, and has no implicit padding (the
    // size asserts above check it), so every bit pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Dying {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::DumpCtl {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PyProc {}
}
