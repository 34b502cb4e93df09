//! The agent's threads. The capture (`Watcher`: ring → decode → assemble
//! → jobs) runs its poll loop on a dedicated thread; tokio, on the main
//! thread, serves the metrics port and the request socket and handles
//! signals and timers; the workers unwind and symbolize on their own
//! thread and the sinks write on theirs.
//!
//! Why a thread for the capture and not the ring's fd in `AsyncFd`: the
//! watcher is synchronous and owns everything it touches (the tracker,
//! the assembler, the dump collector, which itself drains the ring while
//! the kernel's task iterator runs), so an async wrapper would either
//! block the runtime during a dump or need the watcher rebuilt around
//! await points. Its loop already never waits for the workers; a thread
//! keeps it as it is, and an eventfd polled with the ring wakes it at
//! once for a dump request or shutdown.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{AgentError, metrics::Metrics, socket::DumpReply};
use crate::{
    report::{Kind, Report},
    watch::Watcher,
    workers::Job,
};

/// The capture loop's longest sleep: it also times out stalled deaths.
const TURN: Duration = Duration::from_millis(200);

pub enum Request {
    Dump { pid: u32, reply: Sender<DumpReply> },
}

/// How the rest of the agent reaches the capture thread.
pub struct Control {
    tx: Mutex<Sender<Request>>,
    wake: OwnedFd,
    stop: AtomicBool,
}

impl Control {
    pub fn new() -> Result<(Arc<Self>, Receiver<Request>), AgentError> {
        // SAFETY: a plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(AgentError::Runtime(std::io::Error::last_os_error()));
        }
        let (tx, rx) = mpsc::channel();
        let ctl = Self {
            tx: Mutex::new(tx),
            // SAFETY: `fd` is a new descriptor nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            stop: AtomicBool::new(false),
        };
        Ok((Arc::new(ctl), rx))
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn drain_wake(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 (non-blocking eventfd).
        unsafe { libc::read(self.wake.as_raw_fd(), (&raw mut n).cast(), 8) };
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// A dump of `pid` by the capture thread and the workers, waited for
    /// up to `timeout`.
    pub fn dump(&self, pid: u32, timeout: Duration) -> Result<Report, String> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .lock()
            .map_err(|_| "the agent is shutting down".to_string())?
            .send(Request::Dump { pid, reply })
            .map_err(|_| "the agent is shutting down".to_string())?;
        self.wake();
        let deadline = Instant::now() + timeout;
        let report_rx = rx
            .recv_timeout(timeout)
            .map_err(|_| "the dump timed out".to_string())??;
        report_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| "the dump timed out in the workers".to_string())
    }
}

/// Waits until the ring or the eventfd is readable, or `timeout`.
fn wait(ring: i32, wake: i32, timeout: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: ring,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds; EINTR simply returns early.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as i32) };
}

/// What the capture thread does besides draining the ring.
pub struct CaptureTask {
    pub watcher: Watcher,
    pub requests: Receiver<Request>,
    pub ctl: Arc<Control>,
    pub metrics: Arc<Metrics>,
}

impl CaptureTask {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("rfh-capture".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let w = &mut self.watcher;
        let ring = w.capture.ring_fd();
        let wake = self.ctl.wake.as_raw_fd();
        // The gauges are set on the first turn, then once a second.
        let mut last_gauges = Instant::now()
            .checked_sub(Duration::from_secs(2))
            .unwrap_or_else(Instant::now);
        loop {
            wait(ring, wake, w.sleep_for(TURN));
            self.ctl.drain_wake();
            if let Err(e) = w.poll(Duration::ZERO) {
                crate::diag!("capture: {e}");
            }
            // Exited processes are the watch modes' business, not ours.
            let _ = w.take_exited();
            self.metrics
                .heartbeat_ms
                .store(super::http::now_ms(), Ordering::Relaxed);
            while let Ok(req) = self.requests.try_recv() {
                match req {
                    Request::Dump { pid, reply } => {
                        let _ = reply.send(dump(w, pid));
                    }
                }
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                last_gauges = Instant::now();
                self.metrics.watched.set(w.tracker.pids().len() as i64);
            }
            if self.ctl.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        // Whatever the ring still holds, then the assembler's pending
        // deaths, the last watcher loss record, and the workers' queue.
        let _ = w.poll(Duration::ZERO);
        if let Some(summary) = w.finish() {
            crate::diag!("{summary}");
        }
        // Dropping the watcher closes the programs' descriptors: detached.
    }
}

fn dump(w: &mut Watcher, pid: u32) -> DumpReply {
    if std::fs::metadata(format!("/proc/{pid}")).is_err() {
        return Err(format!("no such process: {pid}"));
    }
    // The mappings as of now (the process may never have been seen).
    let _ = w.tracker.refresh(pid);
    let job = w
        .dump_job(pid, Kind::OnDemand)
        .map_err(|e| format!("cannot dump pid {pid}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    w.workers.submit_wait(Job::Reply(Box::new(job), tx));
    Ok(rx)
}
