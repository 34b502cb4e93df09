//! Unwind stage: a thread's registers plus a copy of the top of its stack
//! become code addresses, stepping through signal handler frames. Pure
//! apart from reading (and caching) the module files for their CFI;
//! x86_64 only.
//!
//! Nothing but code leaves this stage: a return address outside the
//! process's executable file mappings ends the unwind unshown, since a
//! corrupt or hostile stack can make any memory word look like one.

mod cache;
mod cfi;
mod elf;
pub(crate) mod sigframe;
#[cfg(test)]
mod tests;
mod walk;

use std::path::Path;
use std::sync::Arc;

use framehop::Unwinder as _;
use framehop::x86_64::UnwinderX86_64;

#[cfg(test)]
pub use self::cache::CacheLimits;
use self::cache::FileCache;
use self::elf::Mapped;
use crate::modules::{self, Module};

type Data = Arc<[u8]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// `bytes[i]` is the memory at `base + i`; `base` was `sp` at capture.
#[derive(Clone, Copy, Debug)]
pub struct StackCopy<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl StackCopy<'_> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let b = self.bytes.get(off..off.checked_add(8)?)?;
        b.try_into().ok().map(u64::from_le_bytes)
    }

    fn contains(&self, addr: u64) -> bool {
        addr.checked_sub(self.base)
            .is_some_and(|off| off < self.bytes.len() as u64)
    }
}

/// A code address of a stack: the exact address of an instruction that
/// was executing (a thread's IP, or the IP a signal interrupted), or a
/// return address, whose call is the byte before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodeAddr {
    pub addr: u64,
    pub is_return: bool,
}

impl CodeAddr {
    pub fn exact(addr: u64) -> Self {
        Self {
            addr,
            is_return: false,
        }
    }

    pub fn ret(addr: u64) -> Self {
        Self {
            addr,
            is_return: true,
        }
    }

    /// Where the executing instruction is: for a return address, within
    /// the call before it (which may be the last byte of a function).
    pub fn lookup(self) -> u64 {
        self.addr.saturating_sub(u64::from(self.is_return))
    }
}

/// A signal handler frame found on the stack: gdb's `<signal handler
/// called>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalFrame {
    /// `frames[index]` is the interrupted instruction (an exact address),
    /// then come its callers; the handler's frames are before it. Equals
    /// `frames.len()` when the unwind stopped at the signal frame.
    pub index: usize,
    /// The interrupted IP and stack pointer, as the kernel saved them: they
    /// equal the registers at the delivery that called the handler, which
    /// is how a capture of that delivery is matched with this frame.
    pub ip: u64,
    pub sp: u64,
    /// The signal the handler was called for, when the frame holds it in a
    /// form the kernel's own register save confirms (an SA_SIGINFO
    /// handler of a fault: see `sigframe`). `None` otherwise: the bytes
    /// are then whatever the stack held.
    pub info: Option<SigInfo>,
    /// The thread's last hardware exception, as the kernel saved it.
    pub trap: Trap,
}

impl SignalFrame {
    /// The fault a handler of `signo` was most likely called for, e.g. for
    /// a handler that re-raised `signo`: the confirmed siginfo when there
    /// is one (`None` if it names another signal), else what the saved
    /// exception implies (see `sigframe::from_trap`). The exception is the
    /// thread's last one: a `signo` sent by another process to a thread
    /// that once faulted would be taken for that fault.
    pub fn fault_for(&self, signo: i32) -> Option<SigInfo> {
        match self.info {
            Some(info) => (info.signo == signo).then_some(info),
            None => sigframe::from_trap(signo, self.ip, self.trap),
        }
    }
}

/// `trapno`, `err` and `cr2` of the saved sigcontext: the vector of the
/// thread's last exception, its error code and, for a page fault, the
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    pub trapno: u64,
    pub error_code: u64,
    pub cr2: u64,
}

/// The part of a siginfo a report names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    pub signo: i32,
    /// si_code, e.g. SEGV_MAPERR.
    pub code: i32,
    /// si_addr.
    pub addr: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Dwarf,
    FramePointer,
    Mixed,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Dwarf => "dwarf",
            Method::FramePointer => "frame-pointer",
            Method::Mixed => "mixed",
        }
    }
}

/// Why an unwind stopped early. No message carries an address: those
/// come from memory that may hold anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnwindError {
    #[error("the stack continues past the captured copy")]
    OutsideCopy,
    #[error("a return address is outside the process's executable mappings (not shown)")]
    NotCode,
    #[error("the stack pointer did not increase")]
    SpDidNotIncrease,
    #[error(
        "the unwind stopped in code outside the known mappings (a library loaded just before the capture?)"
    )]
    NoUnwindInfo,
    #[error("a return address of 0 ended the unwind before the stack's end")]
    ZeroReturn,
    #[error("the signal frame is past the captured copy")]
    BadSignalFrame,
    #[error("the interrupted instruction pointer is outside any executable mapping (not shown)")]
    InterruptedIpNotCode,
    #[error("the interrupted code ran on another stack than the signal handler (sigaltstack)")]
    OtherStack,
    /// Never `CouldNotReadStack`, whose message holds an address.
    #[error("unwinding failed")]
    Step(#[source] framehop::Error),
}

/// Innermost first: `frames[0]` is the thread's IP, then return
/// addresses, and after each signal frame the interrupted IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub frames: Vec<CodeAddr>,
    pub signal_frames: Vec<SignalFrame>,
    pub method: Method,
    pub truncated: bool,
    pub error: Option<UnwindError>,
}

impl Unwound {
    fn new(ip: u64) -> Self {
        Self {
            frames: vec![CodeAddr::exact(ip)],
            signal_frames: Vec::new(),
            method: Method::FramePointer,
            truncated: false,
            error: None,
        }
    }

    #[cfg(test)]
    /// The addresses alone, innermost first.
    pub fn addrs(&self) -> Vec<u64> {
        self.frames.iter().map(|f| f.addr).collect()
    }
}

/// Caches parsed files and framehop modules across unwinds, within
/// `CacheLimits`.
#[derive(Default)]
pub struct Unwinder {
    cache: FileCache,
}

impl Unwinder {
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(test)]
    pub fn with_limits(limits: CacheLimits) -> Self {
        Self {
            cache: FileCache::new(limits),
        }
    }

    /// `max_frames` counts `frames[0]`; the IP is always returned, mapped
    /// or not: it is a register, not memory.
    pub fn unwind(
        &mut self,
        regs: &Regs,
        stack: &StackCopy,
        modules: &[Module],
        max_frames: usize,
    ) -> Unwound {
        self.cache.start_use();
        let mapped: Vec<Option<Mapped>> = modules.iter().map(|m| self.cache.mapped(m)).collect();
        // Fresh framehop state per call: its rule cache is keyed by a global
        // u16 generation that would wrap in a long-running daemon.
        let mut fh = UnwinderX86_64::new();
        for m in mapped.iter().flatten() {
            fh.add_module(m.fh.clone());
        }
        let has_cfi = |addr: u64| mapped.iter().flatten().any(|m| m.has_cfi_for(addr));
        let cache = &mut self.cache;
        let mut is_trampoline = |ra: u64| {
            let Some(i) = modules.iter().position(|m| m.contains(ra)) else {
                return false;
            };
            match &mapped[i] {
                Some(m) if m.cfi_trampoline(ra) => true,
                // Covered by CFI that does not say "signal frame".
                Some(m) if m.has_cfi_for(ra - 1) => false,
                _ => cache.is_sigreturn(&modules[i], ra),
            }
        };
        let mut code = walk::Code {
            modules,
            has_cfi: &has_cfi,
            is_trampoline: &mut is_trampoline,
        };
        let out = walk::walk(&fh, &mut code, regs, stack, max_frames);
        self.cache.end_use();
        out
    }

    /// The kernel's frame-pointer walk (`bpf_get_stack`: the IP, then
    /// return addresses) through the same filter as `unwind`: it stops at
    /// the first word that is not a return address into code. `fp[0]` is
    /// kept whatever it is, as in `unwind`.
    pub fn unwind_fp_chain(fp: &[u64], modules: &[Module], max_frames: usize) -> Unwound {
        let Some((&ip, rest)) = fp.split_first() else {
            return Unwound {
                frames: Vec::new(),
                ..Unwound::new(0)
            };
        };
        let mut out = Unwound::new(ip);
        for &ra in rest {
            if ra == 0 {
                break;
            }
            if modules::find(modules, ra - 1).is_none() {
                out.error = Some(UnwindError::NotCode);
                break;
            }
            if out.frames.len() >= max_frames.max(1) {
                out.truncated = true;
                break;
            }
            out.frames.push(CodeAddr::ret(ra));
        }
        out
    }

    /// Drops what is cached for the file at `open_path` (e.g. a deleted
    /// binary no tracked process maps any more).
    pub fn forget_file(&mut self, open_path: &Path) {
        self.cache.forget(open_path);
    }
}
