//! Every crash rule on synthetic events: no kernel, no root.

use super::*;
use faulthandler_common::{EVENT_EXIT, EventHeader, SignalEvent};

const PID: u32 = 100;

fn cap(tid: u32, sig: i32, code: i32, handler: u64, flags: u32) -> Box<SignalCapture> {
    // SAFETY: SignalEvent is plain integers; all-zero is a valid value.
    let mut event: SignalEvent = unsafe { std::mem::zeroed() };
    event.pid = PID;
    event.tid = tid;
    event.sig = sig;
    event.code = code;
    event.handler = handler;
    event.flags = flags;
    event.ktime_ns = 1000 + u64::from(tid);
    event.addr = 0x40;
    event.regs[REG_SP] = 0x7fff_0000_0000;
    Box::new(SignalCapture {
        event,
        stack: Vec::new(),
        python: None,
    })
}

fn fault(tid: u32) -> Box<SignalCapture> {
    cap(tid, libc::SIGSEGV, 1, SIG_DFL, 0)
}

fn sibling(tid: u32) -> Box<SignalCapture> {
    cap(tid, SIGKILL as i32, 0, SIG_DFL, SIG_F_GROUP_EXIT)
}

fn exit(counts: Option<Dying>) -> ExitEvent {
    ExitEvent {
        header: EventHeader {
            kind: EVENT_EXIT,
            len: 0,
        },
        ktime_ns: 5000,
        pid: PID,
        tid: PID,
        was_dying: counts.is_some() as u32,
        _pad: 0,
        dying: counts.unwrap_or_default(),
    }
}

fn counts(threads: u64, omitted: u64, lost: u64, total: u32) -> Dying {
    Dying {
        threads,
        omitted,
        lost,
        exited: 0,
        total,
        sig: libc::SIGSEGV as u32,
        code: 1,
        vma_scans: 0,
    }
}

fn crash(out: Option<Output>) -> Crash {
    match out {
        Some(Output::Crash(c)) => c,
        other => panic!("expected a crash, got {other:?}"),
    }
}

#[test]
fn fault_then_siblings_then_exit() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    assert!(a.on(Input::Signal(fault(101)), t).is_none());
    assert!(a.on(Input::Signal(sibling(103)), t).is_none());
    assert!(a.on(Input::Signal(sibling(102)), t).is_none());
    let c = crash(a.on(Input::Exit(exit(Some(counts(3, 2, 1, 6)))), t));
    assert_eq!(c.current.as_ref().unwrap().event.tid, 101);
    let tids: Vec<u32> = c.others.iter().map(|s| s.event.tid).collect();
    assert_eq!(tids, [102, 103], "siblings in tid order");
    assert_eq!(c.cause.sig, libc::SIGSEGV);
    assert_eq!(c.cause.addr, Some(0x40));
    assert!(!c.cause.handled);
    assert_eq!((c.counts.omitted, c.counts.lost, c.counts.total), (2, 1, 6));
    assert!(c.partial.is_none());
    assert_eq!(a.dying().count(), 0);
}

#[test]
fn survived_signals_are_not_crashes() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    // A handler installed, and a harmless default: nothing.
    assert!(
        a.on(Input::Signal(cap(101, libc::SIGSEGV, 1, 0x4000, 0)), t)
            .is_none()
    );
    assert!(
        a.on(Input::Signal(cap(101, libc::SIGCHLD, 1, SIG_DFL, 0)), t)
            .is_none()
    );
    assert_eq!(a.dying().count(), 0);
    // The process then exits normally: no report.
    assert!(a.on(Input::Exit(exit(None)), t).is_none());
}

#[test]
fn on_signal_survived_is_a_dump_and_fatal_is_a_crash() {
    let t = Instant::now();
    let usr1 = 1u64 << libc::SIGUSR1;
    let quit = 1u64 << libc::SIGQUIT;
    let mut a = Assembler::new(usr1 | quit, STALL);
    let handled = cap(101, libc::SIGUSR1, 0, 0x4000, 0);
    assert!(matches!(
        a.on(Input::Signal(handled), t),
        Some(Output::OnSignal(_))
    ));
    // SIGQUIT with its default action kills: a crash, not a dump.
    assert!(
        a.on(Input::Signal(cap(101, libc::SIGQUIT, 0, SIG_DFL, 0)), t)
            .is_none()
    );
    let c = crash(a.on(Input::Exit(exit(Some(counts(1, 0, 0, 1)))), t));
    assert_eq!(c.cause.sig, libc::SIGQUIT);
}

#[test]
fn group_kill_puts_the_aimed_thread_first() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    let k = Killed {
        sig: libc::SIGTERM,
        code: 0,
        sender: 42,
        tid: 102,
        ktime_ns: 7,
        oom: false,
    };
    a.on(Input::Killed(PID, k), t);
    a.on(Input::Signal(sibling(101)), t);
    a.on(Input::Signal(sibling(102)), t);
    let c = crash(a.on(Input::Exit(exit(Some(counts(2, 0, 0, 2)))), t));
    assert_eq!(c.current.as_ref().unwrap().event.tid, 102);
    assert_eq!(c.cause.sig, libc::SIGTERM);
    assert_eq!(c.cause.sender_pid, Some(42));
    assert_eq!(c.ktime_ns, 7);
}

#[test]
fn oom_kill() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    let k = Killed {
        sig: SIGKILL as i32,
        code: SI_KERNEL,
        sender: 0,
        tid: 101,
        ktime_ns: 9,
        oom: true,
    };
    a.on(Input::Killed(PID, k), t);
    a.on(Input::Signal(sibling(101)), t);
    let c = crash(a.on(Input::Exit(exit(Some(counts(1, 0, 0, 1)))), t));
    assert!(c.cause.oom);
    assert_eq!(c.cause.sender_pid, None);
    assert_eq!(c.current.as_ref().unwrap().event.tid, 101);
}

#[test]
fn stalled_death_goes_out_partial_and_progress_delays_it() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    a.on(Input::Signal(fault(101)), t);
    assert!(a.tick(t + STALL / 2).is_empty());
    // The kernel counts more threads omitted: progress, the clock restarts.
    a.on(Input::Progress(PID, counts(1, 500, 0, 1000)), t + STALL / 2);
    assert!(a.tick(t + STALL).is_empty());
    // A thread's exit record is progress too.
    a.on(Input::Touch(PID), t + STALL / 2);
    // Unchanged counts are not progress.
    a.on(Input::Progress(PID, counts(1, 500, 0, 1000)), t + STALL);
    let out = a.tick(t + STALL / 2 + STALL);
    assert_eq!(out.len(), 1);
    let Output::Crash(c) = &out[0] else {
        panic!("{out:?}")
    };
    assert!(c.partial.as_deref().unwrap().contains("stuck"));
    assert_eq!(c.counts.omitted, 500);
    assert_eq!(a.dying().count(), 0);
    // The stuck thread's record, then the exit record, coming late after
    // all, make no second report, now or later.
    assert!(a.on(Input::Signal(sibling(102)), t + STALL * 3).is_none());
    let late = Input::Exit(exit(Some(counts(1, 999, 0, 1000))));
    assert!(a.on(late, t + STALL * 3).is_none());
    assert_eq!(a.dying().count(), 0);
    assert!(a.tick(t + STALL * 10).is_empty());
}

#[test]
fn lost_primary_is_reported_from_the_kernel_counts() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    a.on(Input::Signal(sibling(102)), t);
    let c = crash(a.on(Input::Exit(exit(Some(counts(1, 0, 1, 2)))), t));
    assert_eq!(c.cause.sig, libc::SIGSEGV);
    assert!(c.partial.as_deref().unwrap().contains("lost"));
    assert_eq!(c.current.as_ref().unwrap().event.tid, 102);
    // Every record lost but the exit: still a report, with no thread.
    let c = crash(a.on(Input::Exit(exit(Some(counts(0, 0, 1, 1)))), t));
    assert!(c.current.is_none());
    assert_eq!(c.counts.lost, 1);
}

#[test]
fn reraise_reports_the_original_fault() {
    // raise(SIGSEGV) from inside the handler: SI_TKILL from itself.
    let mut reraise = cap(101, libc::SIGSEGV, -6, SIG_DFL, 0);
    reraise.event.sender_pid = PID as i32;
    let cause = Cause::of(&reraise);
    assert_eq!(cause.addr, None);
    let frame = SigFrameInfo {
        sig: libc::SIGSEGV,
        code: 1,
        addr: 0x40,
    };
    let r = resolve_cause(&cause, PID, Some(frame));
    assert_eq!(
        (r.sig, r.code, r.addr, r.handled),
        (libc::SIGSEGV, 1, Some(0x40), true)
    );
    // abort() in a SIGSEGV handler dies of SIGABRT: that stays the cause.
    let mut abort = cap(101, libc::SIGABRT, -6, SIG_DFL, 0);
    abort.event.sender_pid = PID as i32;
    let r = resolve_cause(&Cause::of(&abort), PID, Some(frame));
    assert_eq!((r.sig, r.handled), (libc::SIGABRT, false));
    // A real fault inside a handler is not rewritten.
    let r = resolve_cause(&Cause::of(&fault(101)), PID, Some(frame));
    assert_eq!(r, Cause::of(&fault(101)));
    // No signal frame: unchanged.
    assert_eq!(resolve_cause(&cause, PID, None), cause);
    // The handler returned and the re-raise arrived after: the thread's
    // last fault (a page fault, not present, at 0x40) says what it was.
    let mut late = cap(101, libc::SIGSEGV, -6, SIG_DFL, SIG_F_TRAP);
    late.event.sender_pid = PID as i32;
    late.event.trap = faulthandler_common::ThreadTrap {
        trap_nr: 14,
        error_code: 6,
        cr2: 0x40,
    };
    let r = resolve_cause(&Cause::of(&late), PID, None);
    assert_eq!((r.code, r.addr, r.handled), (1, Some(0x40), true));
    // A protection fault reads as SEGV_ACCERR.
    late.event.trap.error_code = 7;
    let r = resolve_cause(&Cause::of(&late), PID, None);
    assert_eq!((r.code, r.handled), (2, true));
    // The last exception was not a page fault: nothing to say.
    late.event.trap.trap_nr = 3;
    let r = resolve_cause(&Cause::of(&late), PID, None);
    assert!(!r.handled);
}

#[test]
fn samples_and_dump_records_are_routed_away() {
    let t = Instant::now();
    let mut a = Assembler::new(0, STALL);
    let s = cap(101, 0, 0, 0, SIG_F_SAMPLE);
    assert!(matches!(a.on(Input::Signal(s), t), Some(Output::Sample(_))));
    let d = cap(101, 0, 0, 0, SIG_F_DUMP);
    assert!(a.on(Input::Signal(d), t).is_none());
    assert_eq!(a.dying().count(), 0);
}
