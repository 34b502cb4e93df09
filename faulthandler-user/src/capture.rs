//! Capture stage: load the embedded eBPF object, configure it, attach its
//! tracepoints and hand out the ring buffer.
//!
//! Nothing is pinned: every program and map lives only as long as this
//! process's file descriptors, so Ctrl-C or `kill -9` detaches everything.

use std::{fs::File, os::fd::AsRawFd, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        Iter, PerfEvent, RawTracePoint,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
    },
};
use faulthandler_common::{
    CFG_ALL, CFG_CGROUP, CFG_FOLLOW, COUNTERS, Config, DumpCtl, Dying, KernelOffsets, PyProc,
    STACK_MAX,
};
use thiserror::Error;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/faulthandler"));

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "not permitted to load eBPF programs: run rfh-trace as root (sudo) or grant it CAP_BPF and CAP_PERFMON"
    )]
    NotPermitted(#[source] aya::EbpfError),
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the embedded object")]
    MissingProgram(&'static str),
    /// The verifier log can run to thousands of lines; only its first
    /// line and verdict are kept, so the error stays one line.
    #[error("failed to load or attach eBPF program {name}: {summary}")]
    Program { name: &'static str, summary: String },
    #[error("eBPF map {0} is missing from the embedded object")]
    MissingMap(&'static str),
    #[error("failed to access eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Offsets(#[from] crate::btf::BtfError),
    #[error("cannot read kernel BTF")]
    Btf(#[source] aya::BtfError),
    #[error("task iterator failed: {0}")]
    Iter(String),
    #[error("failed to wait for events")]
    Poll(#[source] std::io::Error),
}

pub struct CaptureOptions {
    pub all: bool,
    pub follow: bool,
    pub signal_mask: u64,
    pub on_signal_mask: u64,
    pub stack_size: u32,
    pub max_threads: u32,
    /// Attach the signal and process-lifecycle tracepoints (everything
    /// but `rfh-trace dump`).
    pub watch: bool,
    /// Load the dump iterator and the sampler (dumps, timeouts,
    /// --on-signal); they cost start-up time, so only when needed.
    pub dumps: bool,
    /// Watch only this cgroup subtree (id, level), filtered in the kernel
    /// (agent `--cgroup`); None for no cgroup filter.
    pub cgroup: Option<(u64, u32)>,
}

pub struct Capture {
    ebpf: Ebpf,
    /// Kernel-side diagnostics (aya-log), only with RUST_LOG at debug or
    /// trace: off, the programs' log sites cost a load and a compare.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    events: RingBuf<MapData>,
    /// Per-CPU profiling events, kept for as long as profiling runs.
    profiling: Vec<PerfEventLinkId>,
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = format!("{e:?}");
    text.contains("PermissionDenied") || text.contains("EPERM") || text.contains("os error 1)")
}

impl Capture {
    /// `offsets` is called once the programs are loaded, so the caller can
    /// work them out from kernel BTF meanwhile; until then the programs
    /// see an all-zero config and capture nothing.
    pub fn start(
        opts: &CaptureOptions,
        offsets: impl FnOnce() -> Result<KernelOffsets, crate::btf::BtfError>,
    ) -> Result<Self, CaptureError> {
        // Kernels >= 5.11 charge BPF memory to the memcg, so failing to
        // raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE) is harmless.
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit; failure is harmless (see above).
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        // Kernel BTF is only for the task iterator's attach target (the
        // programs use no CO-RE): parse it beside the load, and only then.
        let kernel_btf = opts
            .dumps
            .then(|| std::thread::spawn(aya::Btf::from_sys_fs));
        let level = kernel_log_level();
        // The Python walk's scratch has one entry per possible CPU.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(aya_log::LEVEL, &level, false)
            .map_max_entries("PY_SCRATCH", cpus)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission_error(&e) {
                    CaptureError::NotPermitted(e)
                } else {
                    CaptureError::Load(e)
                }
            })?;
        // Tracepoints attached, program name = tracepoint name.
        for (name, _, _) in crate::btf::TRACEPOINTS.iter().filter(|_| opts.watch) {
            let name = *name;
            let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
            prog.attach(name).map_err(program_error(name))?;
        }
        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(CaptureError::MissingMap("EVENTS"))?,
        )
        .map_err(map_error("EVENTS"))?;
        if let Some(kernel_btf) = kernel_btf {
            let btf = kernel_btf
                .join()
                .map_err(|_| CaptureError::Iter("the BTF parser panicked".into()))?
                .map_err(CaptureError::Btf)?;
            let iter: &mut Iter = program(&mut ebpf, "dump_task")?;
            iter.load("task", &btf)
                .map_err(program_error("dump_task"))?;
            let sample: &mut PerfEvent = program(&mut ebpf, "sample")?;
            sample.load().map_err(program_error("sample"))?;
        }
        let config = Config {
            flags: if opts.all { CFG_ALL } else { 0 }
                | if opts.follow { CFG_FOLLOW } else { 0 }
                | if opts.cgroup.is_some() { CFG_CGROUP } else { 0 },
            stack_size: opts.stack_size.min(STACK_MAX as u32),
            signal_mask: opts.signal_mask,
            on_signal_mask: opts.on_signal_mask,
            max_threads: opts.max_threads,
            view_ns_inum: view_ns_inum(),
            cgroup_id: opts.cgroup.map_or(0, |c| c.0),
            cgroup_level: opts.cgroup.map_or(0, |c| c.1),
            _pad: 0,
            offsets: offsets()?,
        };
        let mut cfg: Array<_, Config> =
            Array::try_from(map(&mut ebpf, "CONFIG")?).map_err(map_error("CONFIG"))?;
        cfg.set(0, config, 0).map_err(map_error("CONFIG"))?;
        let logger = if level > 0 {
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, log::logger()).ok()
        } else {
            None
        };
        Ok(Self {
            ebpf,
            logger,
            events,
            profiling: Vec::new(),
        })
    }

    /// Starts a dump of `tgid`'s threads: the returned file runs the task
    /// iterator as it is read (see `read_iterator`). Records arrive in the
    /// ring stamped with `seq`; `dump_ctl` tells how many were written.
    pub fn start_dump(&mut self, tgid: u32, seq: u32) -> Result<File, CaptureError> {
        let ctl = DumpCtl {
            target: tgid,
            seq,
            emitted: 0,
            retries: 0,
        };
        self.set_dump_ctl(ctl)?;
        let iter: &mut Iter = program(&mut self.ebpf, "dump_task")?;
        let link_id = iter.attach().map_err(program_error("dump_task"))?;
        let link = iter
            .take_link(link_id)
            .map_err(program_error("dump_task"))?;
        link.into_file()
            .map_err(|e| CaptureError::Iter(e.to_string()))
    }

    fn set_dump_ctl(&mut self, ctl: DumpCtl) -> Result<(), CaptureError> {
        let mut m: Array<_, DumpCtl> =
            Array::try_from(map(&mut self.ebpf, "DUMP_CTL")?).map_err(map_error("DUMP_CTL"))?;
        m.set(0, ctl, 0).map_err(map_error("DUMP_CTL"))
    }

    /// The counts of the last dump iteration.
    pub fn dump_ctl(&mut self) -> Result<DumpCtl, CaptureError> {
        let m: Array<_, DumpCtl> =
            Array::try_from(map(&mut self.ebpf, "DUMP_CTL")?).map_err(map_error("DUMP_CTL"))?;
        m.get(&0, 0).map_err(map_error("DUMP_CTL"))
    }

    /// Ends a dump: nothing is the sampler's or the iterator's target.
    pub fn end_dump(&mut self) -> Result<(), CaptureError> {
        self.set_dump_ctl(DumpCtl::default())
    }

    /// Starts sampling each of `tids` on the CPU clock every millisecond:
    /// threads that were running when dumped are caught in their own
    /// context. Stop with `stop_sampling`.
    pub fn sample_threads(&mut self, tids: &[u32]) -> Result<Vec<PerfEventLinkId>, CaptureError> {
        let prog: &mut PerfEvent = program(&mut self.ebpf, "sample")?;
        let mut links = Vec::new();
        for &tid in tids {
            // A thread that has exited meanwhile simply has no sample.
            if let Ok(l) = prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::OneProcess {
                    pid: tid,
                    cpu: None,
                },
                SamplePolicy::Period(1_000_000),
                false,
            ) {
                links.push(l);
            }
        }
        Ok(links)
    }

    pub fn stop_sampling(&mut self, links: Vec<PerfEventLinkId>) -> Result<(), CaptureError> {
        let prog: &mut PerfEvent = program(&mut self.ebpf, "sample")?;
        for l in links {
            let _ = prog.detach(l);
        }
        Ok(())
    }

    /// Samples every CPU at `hz`; the sampler keeps only watched processes.
    pub fn start_profiling(&mut self, hz: u64) -> Result<(), CaptureError> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| CaptureError::Poll(e))?;
        let prog: &mut PerfEvent = program(&mut self.ebpf, "sample")?;
        for cpu in cpus {
            let l = prog
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(hz),
                    false,
                )
                .map_err(program_error("sample"))?;
            self.profiling.push(l);
        }
        Ok(())
    }

    /// Stops the sampling `start_profiling` began.
    pub fn stop_profiling(&mut self) -> Result<(), CaptureError> {
        let prog: &mut PerfEvent = program(&mut self.ebpf, "sample")?;
        for l in self.profiling.drain(..) {
            let _ = prog.detach(l);
        }
        Ok(())
    }

    /// Hands the kernel side's log lines, if any, to the logger.
    pub fn flush_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// The drop counters by cause (`CNT_*`), summed over CPUs, as running
    /// totals since the programs were loaded.
    pub fn drops(&mut self) -> Result<[u64; COUNTERS as usize], CaptureError> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map(&mut self.ebpf, "DROPS")?).map_err(map_error("DROPS"))?;
        let mut out = [0u64; COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = m.get(&(i as u32), 0).map_err(map_error("DROPS"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// The kernel's counts for a process that is dying, while it dies.
    pub fn dying(&mut self, tgid: u32) -> Option<Dying> {
        let m: HashMap<_, u32, Dying> = HashMap::try_from(self.ebpf.map_mut("DYING")?).ok()?;
        m.get(&tgid, 0).ok()
    }

    /// Sets (or with `None` removes) `tgid`'s entry in the kernel's table
    /// of CPython processes.
    pub fn set_python(&mut self, tgid: u32, entry: Option<PyProc>) -> Result<(), CaptureError> {
        let mut m: HashMap<_, u32, PyProc> =
            HashMap::try_from(map(&mut self.ebpf, "PY_PROCS")?).map_err(map_error("PY_PROCS"))?;
        match entry {
            Some(p) => m.insert(tgid, p, 0).map_err(map_error("PY_PROCS")),
            // Absent already is fine.
            None => {
                let _ = m.remove(&tgid);
                Ok(())
            }
        }
    }

    /// Adds a process to the in-kernel watch set.
    pub fn watch(&mut self, tgid: u32) -> Result<(), CaptureError> {
        let mut watched: HashMap<_, u32, u8> =
            HashMap::try_from(map(&mut self.ebpf, "WATCHED")?).map_err(map_error("WATCHED"))?;
        watched.insert(tgid, 1, 0).map_err(map_error("WATCHED"))
    }

    /// The ring buffer's descriptor, readable when records wait: for a
    /// caller that polls it together with descriptors of its own.
    pub fn ring_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }

    /// Waits up to `timeout` for records, then hands each one to `f`.
    pub fn poll(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, CaptureError> {
        let mut pfd = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on our ring buffer's descriptor.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(CaptureError::Poll(e));
            }
        }
        Ok(self.drain(&mut f))
    }

    /// Hands every record already in the ring buffer to `f`.
    pub fn drain(&mut self, f: &mut impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            f(&item);
            n += 1;
        }
        n
    }
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> CaptureError {
    move |e| {
        let text = e.to_string();
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines.next().unwrap_or_default().to_string();
        let summary = match lines.next_back() {
            Some(last) if first.len() < 200 => format!("{first} … {last}"),
            _ => first.chars().take(300).collect(),
        };
        CaptureError::Program { name, summary }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, CaptureError> {
    ebpf.map_mut(name).ok_or(CaptureError::MissingMap(name))
}

/// The aya-log level the programs log at: what RUST_LOG asks for, if it
/// asks for debug or trace (the kernel side has nothing at other levels
/// worth its ring), else 0, off.
fn kernel_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Trace => aya_log::Level::Trace as u8,
        log::LevelFilter::Debug => aya_log::Level::Debug as u8,
        _ => 0,
    }
}

/// The inode number of rfh-trace's PID namespace, or 0 for the host's
/// (`PROC_PID_INIT_INO`), where the kernel side takes the fast path.
fn view_ns_inum() -> u32 {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(m) if m.ino() != PROC_PID_INIT_INO => m.ino() as u32,
        _ => 0,
    }
}

/// Runs a dump iteration to its end. The program asks to retry a thread
/// when the ring is full (read fails with EAGAIN, and the next read
/// starts again at that thread), so nothing is lost while the caller
/// drains the ring on another thread.
pub fn read_iterator(mut file: File, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<()> {
    use std::io::{ErrorKind, Read};
    let mut buf = [0u8; 64];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
}
