//! Assemble stage: kernel events in, report jobs out. A pure state
//! machine (no I/O, time passed in), so every crash rule is tested on
//! synthetic events without root.
//!
//! The rules:
//! - a delivery the process dies of (SIG_DFL, a default action that
//!   ends the process) starts a death; its thread stands first;
//! - every other thread of a dying process arrives as a group-exit
//!   SIGKILL record and joins the death;
//! - a group kill (SIGKILL, SIGTERM... caught at generation) or the OOM
//!   killer starts a death with no faulting thread: the thread the kernel
//!   aimed at stands first;
//! - the death is reported at the process's exit record, with the kernel's
//!   final thread counts, or after `stall` without progress (a thread
//!   stuck in uninterruptible sleep), marked partial;
//! - a delivery the process survives (its own handler, or a harmless
//!   default) asks for a dump only when `--on-signal` names it: a signal
//!   that kills the process is a crash whatever flag watches it;
//! - a handler that re-raises is recognised later, from the signal frame
//!   on the stack (see [`resolve_cause`]): the kernel sends nothing for
//!   handled faults, so they cost the process nothing.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use faulthandler_common::{
    Dying, ExitEvent, REG_IP, REG_SP, SI_KERNEL, SIG_DFL, SIG_F_DUMP, SIG_F_GROUP_EXIT,
    SIG_F_SAMPLE, SIG_F_TRAP, SIG_IGN, SIGKILL, default_is_harmless,
};

use crate::{
    decode::SignalCapture,
    signals,
    unwind::{Trap, sigframe::from_trap},
};

/// How long a dying process may go without progress (another thread
/// captured, omitted or lost, as the kernel counts them) before its report
/// goes out with what was captured. Measured from the latest progress, so
/// a thousand threads dying slowly on a loaded machine are not cut short.
pub const STALL: Duration = Duration::from_secs(2);

/// What a process died of, as far as the kernel told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cause {
    pub sig: i32,
    pub code: i32,
    /// si_addr, for faults.
    pub addr: Option<u64>,
    pub sender_pid: Option<i32>,
    /// The process had a handler installed for the signal.
    pub handled: bool,
    pub oom: bool,
    pub stack_overflow: bool,
    /// The last delivery of the same signal to a handler on the same
    /// thread, as the kernel remembered it (see [`resolve_cause`]).
    pub prior: Option<SigFrameInfo>,
}

impl Cause {
    /// The cause of a delivery, from the kernel's record of it.
    pub fn of(cap: &SignalCapture) -> Self {
        let ev = &cap.event;
        Cause {
            sig: ev.sig,
            code: ev.code,
            addr: signals::is_fault(ev.sig, ev.code).then_some(ev.addr),
            sender_pid: signals::user_sent(ev.code)
                .then_some(ev.sender_pid)
                .filter(|&p| p > 0),
            handled: ev.handler > SIG_IGN,
            oom: false,
            stack_overflow: stack_overflow(ev.sig, ev.addr, ev.regs[REG_SP]),
            prior: (ev.flags & SIG_F_TRAP != 0)
                .then(|| {
                    let trap = Trap {
                        trapno: ev.trap.trap_nr,
                        error_code: ev.trap.error_code,
                        cr2: ev.trap.cr2,
                    };
                    from_trap(ev.sig, ev.regs[REG_IP], trap)
                })
                .flatten()
                .map(|f| SigFrameInfo {
                    sig: f.signo,
                    code: f.code,
                    addr: f.addr,
                }),
        }
    }
}

/// A fault address just below the stack pointer (a push or call into
/// the guard page) means the stack overflowed.
fn stack_overflow(sig: i32, addr: u64, sp: u64) -> bool {
    sig == libc::SIGSEGV && addr < sp.saturating_add(4096) && sp.saturating_sub(addr) <= 64 * 1024
}

/// The siginfo a signal handler was called with, found in its signal
/// frame on the stack by the unwinder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigFrameInfo {
    pub sig: i32,
    pub code: i32,
    pub addr: u64,
}

/// A handler that logs and re-raises dies of a signal the process sent
/// itself; the fault worth reporting is the one the handler was called
/// for. Its siginfo sits in the handler's signal frame when the handler
/// re-raised from inside (`innermost`, found by the unwinder), or was
/// remembered by the kernel when the re-raised signal arrives after the
/// handler returned (`cause.prior`). Rule: when the fatal signal was
/// user-sent by the process itself and that siginfo is of the same
/// signal, report it, as handled.
pub fn resolve_cause(cause: &Cause, pid: u32, innermost: Option<SigFrameInfo>) -> Cause {
    let Some(f) = innermost.or(cause.prior) else {
        return cause.clone();
    };
    let self_sent =
        signals::user_sent(cause.code) && cause.sender_pid.is_none_or(|s| s == pid as i32);
    if !self_sent || f.sig != cause.sig {
        return cause.clone();
    }
    Cause {
        sig: f.sig,
        code: f.code,
        addr: signals::is_fault(f.sig, f.code).then_some(f.addr),
        sender_pid: None,
        handled: true,
        oom: false,
        stack_overflow: cause.stack_overflow,
        prior: None,
    }
}

/// A process's death, once it is complete (or given up on).
#[derive(Debug)]
pub struct Crash {
    pub pid: u32,
    /// The thread that took the fatal signal, or the one a group kill
    /// aimed at: it stands first in the report.
    pub current: Option<Box<SignalCapture>>,
    pub others: Vec<Box<SignalCapture>>,
    pub cause: Cause,
    /// The kernel's final counts: captured + omitted + lost = total.
    pub counts: Dying,
    pub partial: Option<String>,
    /// When the death began (CLOCK_MONOTONIC ns).
    pub ktime_ns: u64,
}

#[derive(Debug)]
pub enum Output {
    Crash(Crash),
    /// An `--on-signal` delivery the process survives: report it with a
    /// dump of the other threads.
    OnSignal(Box<SignalCapture>),
    /// A CPU sample for a `--timeout` profile.
    Sample(Box<SignalCapture>),
}

/// The kernel's account of a death that was not delivered as a signal to
/// one thread: a group-wide kill, or the OOM killer.
#[derive(Clone, Debug)]
pub struct Killed {
    pub sig: i32,
    pub code: i32,
    pub sender: u32,
    pub tid: u32,
    pub ktime_ns: u64,
    pub oom: bool,
}

#[derive(Debug)]
pub enum Input {
    Signal(Box<SignalCapture>),
    Killed(u32, Killed),
    Exit(ExitEvent),
    /// The kernel's counts for a dying process, read while it dies.
    Progress(u32, Dying),
    /// Another record of the process arrived (a thread exiting): it is
    /// still dying, not stuck.
    Touch(u32),
}

#[derive(Debug)]
struct Death {
    primary: Option<Box<SignalCapture>>,
    siblings: Vec<Box<SignalCapture>>,
    killed: Option<Killed>,
    counts: Dying,
    since: Instant,
}

impl Death {
    fn new(now: Instant) -> Self {
        Self {
            primary: None,
            siblings: Vec::new(),
            killed: None,
            counts: Dying::default(),
            since: now,
        }
    }
}

pub struct Assembler {
    dying: HashMap<u32, Death>,
    /// Deaths reported after a stall, and when: their exit record, if it
    /// comes late, must not make a second report.
    given_up: HashMap<u32, Instant>,
    /// Signals that ask for a dump when survived (`--on-signal`).
    on_signal: u64,
    stall: Duration,
}

impl Assembler {
    pub fn new(on_signal: u64, stall: Duration) -> Self {
        Self {
            dying: HashMap::new(),
            given_up: HashMap::new(),
            on_signal,
            stall,
        }
    }

    /// Processes being assembled, for the caller to read their progress.
    pub fn dying(&self) -> impl Iterator<Item = u32> + '_ {
        self.dying.keys().copied()
    }

    pub fn on(&mut self, input: Input, now: Instant) -> Option<Output> {
        match input {
            Input::Signal(s) => self.signal(s, now),
            // What still trickles in of a death already reported after a
            // stall (the stuck thread itself, at last) is not a new death.
            Input::Killed(pid, _) if self.given_up.contains_key(&pid) => None,
            Input::Killed(pid, k) => {
                let d = self.dying.entry(pid).or_insert_with(|| Death::new(now));
                d.killed = Some(k);
                d.since = now;
                None
            }
            Input::Progress(pid, counts) => {
                if let Some(d) = self.dying.get_mut(&pid)
                    && d.counts != counts
                {
                    d.counts = counts;
                    d.since = now;
                }
                None
            }
            Input::Touch(pid) => {
                if let Some(d) = self.dying.get_mut(&pid) {
                    d.since = now;
                }
                None
            }
            Input::Exit(e) => {
                if self.given_up.remove(&e.pid).is_some() {
                    self.dying.remove(&e.pid);
                    return None;
                }
                let death = self.dying.remove(&e.pid);
                if death.is_none() && (e.was_dying == 0 || e.dying.sig == 0) {
                    return None;
                }
                let mut d = death.unwrap_or_else(|| Death::new(now));
                if e.was_dying != 0 {
                    d.counts = e.dying;
                }
                finish(e.pid, d, None, e.ktime_ns).map(Output::Crash)
            }
        }
    }

    fn signal(&mut self, s: Box<SignalCapture>, now: Instant) -> Option<Output> {
        let ev = &s.event;
        if ev.flags & SIG_F_SAMPLE != 0 {
            return Some(Output::Sample(s));
        }
        if ev.flags & SIG_F_DUMP != 0 {
            return None; // the dump collector's, not ours
        }
        let pid = ev.pid;
        if ev.flags & SIG_F_GROUP_EXIT != 0 {
            if self.given_up.contains_key(&pid) {
                return None; // a straggler of a death already reported
            }
            let d = self.dying.entry(pid).or_insert_with(|| Death::new(now));
            d.since = now;
            d.siblings.push(s);
            return None;
        }
        let fatal = ev.handler == SIG_DFL && !default_is_harmless(ev.sig as u32);
        if !fatal {
            let asked = self.on_signal & (1u64 << (ev.sig as u32 & 63)) != 0;
            return asked.then_some(Output::OnSignal(s));
        }
        // A new fatal delivery is a new death, whatever became of the last
        // one with this pid.
        self.given_up.remove(&pid);
        let d = self.dying.entry(pid).or_insert_with(|| Death::new(now));
        d.since = now;
        if d.primary.is_none() {
            d.primary = Some(s);
        } else {
            // Two threads faulted at once: the first stands first.
            d.siblings.push(s);
        }
        None
    }

    /// Reports the deaths that made no progress for `stall`.
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let stale: Vec<u32> = self
            .dying
            .iter()
            .filter(|(_, d)| now.saturating_duration_since(d.since) >= self.stall)
            .map(|(&p, _)| p)
            .collect();
        let why = format!(
            "no exit seen {} s after the last thread was captured: threads may be stuck exiting",
            self.stall.as_secs()
        );
        // A pid is remembered long enough for any late exit record.
        self.given_up
            .retain(|_, t| now.saturating_duration_since(*t) < self.stall * 30);
        stale
            .into_iter()
            .filter_map(|pid| {
                let d = self.dying.remove(&pid)?;
                self.given_up.insert(pid, now);
                finish(pid, d, Some(why.clone()), 0).map(Output::Crash)
            })
            .collect()
    }

    /// Reports every death still being assembled (at shutdown).
    pub fn flush(&mut self) -> Vec<Output> {
        let pids: Vec<u32> = self.dying.keys().copied().collect();
        pids.into_iter()
            .filter_map(|pid| {
                let d = self.dying.remove(&pid)?;
                let why = "rfh-trace stopped while the process was dying".to_string();
                finish(pid, d, Some(why), 0).map(Output::Crash)
            })
            .collect()
    }
}

/// The crash for a finished death; None when nothing at all is known.
fn finish(pid: u32, d: Death, mut partial: Option<String>, exit_ktime: u64) -> Option<Crash> {
    let mut siblings = d.siblings;
    let primary_lost = d.primary.is_none() && d.killed.is_none();
    // A group kill has no faulting thread: the thread the kernel aimed at
    // (or the first to die) stands first.
    let current = d.primary.or_else(|| {
        let want = d.killed.as_ref().map(|k| k.tid);
        let i = siblings
            .iter()
            .position(|s| Some(s.event.tid) == want)
            .unwrap_or(0);
        (!siblings.is_empty()).then(|| siblings.remove(i))
    });
    siblings.sort_by_key(|s| s.event.tid);
    let (cause, ktime_ns) = match (&d.killed, &current) {
        (Some(k), _) => (
            Cause {
                sig: k.sig,
                code: k.code,
                sender_pid: (k.sender != 0 && !k.oom).then_some(k.sender as i32),
                oom: k.oom,
                ..Cause::default()
            },
            k.ktime_ns,
        ),
        (None, Some(p)) if !primary_lost => (Cause::of(p), p.event.ktime_ns),
        _ if d.counts.sig != 0 || current.is_some() => {
            // The fatal delivery's record was lost; the kernel still
            // recorded what the process died of.
            partial.get_or_insert_with(|| {
                "the faulting thread's record was lost (the ring buffer was full)".into()
            });
            let ktime = current.as_ref().map_or(exit_ktime, |c| c.event.ktime_ns);
            (
                Cause {
                    sig: d.counts.sig as i32,
                    code: d.counts.code,
                    oom: d.counts.sig == SIGKILL && d.counts.code == SI_KERNEL,
                    ..Cause::default()
                },
                ktime,
            )
        }
        _ => return None,
    };
    Some(Crash {
        pid,
        current,
        others: siblings,
        cause,
        counts: d.counts,
        partial,
        ktime_ns,
    })
}

#[cfg(test)]
mod tests;
