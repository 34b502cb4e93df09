//! `rfh-trace agent`: cluster-wide crash capture. A long-running watcher
//! of every process on the node (or of one cgroup subtree, filtered in the
//! kernel) that stamps each report with node, container and pod identity,
//! signs crashes and limits storms, and ships records to stdout, a
//! rotating file and/or an OTLP collector; metrics and health on one HTTP
//! port, dumps on a root-only socket. See runtime.rs for the threads.

pub mod config;
mod http;
mod hub;
mod identity;
mod metrics;
mod outputs;
mod runtime;
pub(crate) mod signature;
mod socket;
mod storm;

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use thiserror::Error;

pub use self::{
    config::AgentArgs,
    socket::{ask_dump, client_path},
};
use self::{
    config::Config,
    hub::{Hub, HubSink},
    identity::Pods,
    metrics::Metrics,
    outputs::{Otlp, Output, Reasons, RotatingFile, Stdout},
    runtime::{CaptureTask, Control},
    storm::Storm,
};
use crate::{
    btf,
    capture::{Capture, CaptureError, CaptureOptions},
    procs::Tracker,
    ready, signals,
    watch::Watcher,
    workers::{WorkerOptions, Workers},
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("agent configuration: {0}")]
    Config(String),
    #[error("cannot read the agent configuration file {}", path.display())]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "rfh-trace agent needs root, or the capabilities CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE and CAP_DAC_READ_SEARCH (see deploy/)"
    )]
    NotPrivileged,
    #[error("--cgroup {}: {why}", path.display())]
    Cgroup { path: PathBuf, why: String },
    #[error("cannot listen on {addr} for metrics (--metrics-addr)")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for dump requests on {} (--socket)", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the {name} sink")]
    Sink {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error(transparent)]
    Signal(#[from] signals::SignalError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("--ready-fd {0} is not an open file descriptor")]
    ReadyFd(i32, #[source] std::io::Error),
    #[error("cannot start the agent's threads")]
    Runtime(#[source] std::io::Error),
    #[error("the program loader thread panicked")]
    Panicked,
    #[error("the agent at {} could not dump: {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("talking to the agent at {}", path.display())]
    Ask {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Shutdown has this long, from SIGTERM to exit (systemd and the kubelet
/// give more; the issue asks for 5 s).
const SHUTDOWN: Duration = Duration::from_millis(4500);

/// Runs the agent until SIGTERM or SIGINT; returns the exit status.
pub fn run(args: AgentArgs) -> Result<i32, AgentError> {
    let env = |k: &str| std::env::var(k).ok();
    let file = args.config.clone().or_else(|| {
        env("RFH_TRACE_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let text = match &file {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|source| AgentError::ConfigFile {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let cfg = Config::resolve(&args, &env, text.as_deref())?;
    start(&cfg)
}

/// A cgroup v2 directory as the kernel filter needs it: (id, level), and
/// its path as /proc/PID/cgroup writes it.
fn resolve_cgroup(path: &Path) -> Result<(u64, u32, String), AgentError> {
    let root = cgroup2_root();
    let root = root.as_path();
    let err = |why: String| AgentError::Cgroup {
        path: path.to_path_buf(),
        why,
    };
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let full = full
        .canonicalize()
        .map_err(|e| err(format!("cannot resolve it: {e}")))?;
    let rel = full
        .strip_prefix(root)
        .map_err(|_| err(format!("not under {}, the cgroup v2 mount", root.display())))?;
    let meta = std::fs::metadata(&full).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() || !full.join("cgroup.procs").exists() {
        return Err(err("not a cgroup directory".into()));
    }
    let level = rel.components().count() as u32;
    Ok((meta.ino(), level, format!("/{}", rel.display())))
}

fn cgroup2_root() -> PathBuf {
    crate::procs::cgroup2_root().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Whether a /proc/PID/cgroup path is `subtree` or below it.
fn in_subtree(cgroup: &str, subtree: &str) -> bool {
    subtree == "/"
        || cgroup == subtree
        || cgroup
            .strip_prefix(subtree)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn signal_mask(names: &[String]) -> Result<u64, AgentError> {
    let sigs: Vec<i32> = if names.is_empty() {
        signals::DEFAULT_FATAL.to_vec()
    } else {
        names
            .iter()
            .map(|n| signals::parse(n))
            .collect::<Result<_, _>>()?
    };
    Ok(sigs.iter().fold(0u64, |m, &s| m | (1u64 << s)))
}

fn start_outputs(cfg: &Config, metrics: &Arc<Metrics>) -> Result<Vec<Output>, AgentError> {
    let mut outputs = Vec::new();
    let sink_err = |name| move |source| AgentError::Sink { name, source };
    if cfg.stdout {
        let reasons = Reasons {
            queue_full: "stdout_queue_full",
            write_failed: "stdout_write_failed",
        };
        outputs.push(
            Output::start("stdout", reasons, Arc::clone(metrics), || Ok(Stdout))
                .map_err(sink_err("stdout"))?,
        );
    }
    if let Some(path) = &cfg.file {
        // Opened here, so a refused path stops the start.
        let file = RotatingFile::open(path, cfg.file_max_bytes, cfg.file_keep)?;
        let reasons = Reasons {
            queue_full: "file_queue_full",
            write_failed: "file_write_failed",
        };
        outputs.push(
            Output::start("file", reasons, Arc::clone(metrics), move || Ok(file))
                .map_err(sink_err("file"))?,
        );
    }
    if let Some(endpoint) = &cfg.otlp_endpoint {
        let endpoint = endpoint.clone();
        let reasons = Reasons {
            queue_full: "otlp_queue_full",
            write_failed: "otlp_export_failed",
        };
        outputs.push(
            Output::start("otlp", reasons, Arc::clone(metrics), move || {
                Otlp::new(&endpoint)
            })
            .map_err(sink_err("otlp"))?,
        );
    }
    Ok(outputs)
}

/// BTF offsets, the programs and the workers, loaded side by side (as the
/// watch modes do in run.rs).
fn load(
    cfg: &Config,
    mask: u64,
    cgroup: Option<(u64, u32)>,
    hub: HubSink,
) -> Result<Watcher, AgentError> {
    let offsets = std::thread::spawn(|| {
        let b = btf::Btf::from_sys_fs()?;
        btf::check_tracepoints(&b)?;
        btf::kernel_offsets(&b)
    });
    let opts = CaptureOptions {
        all: cgroup.is_none(),
        follow: true,
        signal_mask: mask,
        on_signal_mask: 0,
        stack_size: faulthandler_common::STACK_DEFAULT,
        max_threads: cfg.max_threads,
        watch: true,
        dumps: true,
        cgroup,
    };
    let loading = std::thread::spawn(move || {
        Capture::start(&opts, || {
            offsets
                .join()
                .unwrap_or_else(|_| Err(btf::BtfError::Malformed("the BTF parser panicked".into())))
        })
    });
    let workers = Workers::start(
        vec![Box::new(hub)],
        WorkerOptions {
            max_frames: 256,
            stack: crate::cli::StackMode::Merged,
            flamegraph: None,
            warm: Vec::new(),
        },
    )
    .map_err(AgentError::Runtime)?;
    let capture = loading.join().map_err(|_| AgentError::Panicked)??;
    Ok(Watcher::new(capture, Tracker::default(), workers, 0))
}

/// Processes already running: all of them, or those of the subtree
/// (which the kernel then watches by pid; new ones join as they run).
fn adopt_running(w: &mut Watcher, subtree: Option<&str>) -> Result<(), AgentError> {
    let Some(subtree) = subtree else {
        w.tracker.refresh_all();
        return Ok(());
    };
    let own = std::process::id();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&p| p != own)
                .collect()
        })
        .unwrap_or_default();
    for pid in pids {
        let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let inside = cg
            .lines()
            .filter_map(|l| l.strip_prefix("0::"))
            .any(|p| in_subtree(p, subtree));
        if inside && w.tracker.refresh(pid).is_ok() {
            w.capture.watch(pid)?;
        }
    }
    Ok(())
}

fn start(cfg: &Config) -> Result<i32, AgentError> {
    if let Some(fd) = cfg.ready_fd {
        ready::claim(fd).map_err(|e| AgentError::ReadyFd(fd, e))?;
    }
    let mask = signal_mask(&cfg.signals)?;
    if !crate::run::privileged() {
        return Err(AgentError::NotPrivileged);
    }
    let cgroup = cfg.cgroup.as_deref().map(resolve_cgroup).transpose()?;
    // Ports, sockets and files first: a taken one fails before anything
    // is loaded.
    let http = std::net::TcpListener::bind(cfg.metrics_addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| AgentError::Metrics {
            addr: cfg.metrics_addr,
            source,
        })?;
    let sock = socket::bind(&cfg.socket)?;
    let metrics = Arc::new(Metrics::new());
    let outputs = start_outputs(cfg, &metrics)?;
    let storm = Storm::new(
        cfg.storm_reports,
        cfg.storm_window,
        cfg.rate_limit,
        cfg.rate_burst,
    );
    let node = identity::node_name(cfg.node.as_deref());
    let hub = Arc::new(Mutex::new(Some(Hub::new(
        node,
        Pods::new(&cfg.pods_dir),
        storm,
        outputs,
        Arc::clone(&metrics),
    ))));
    crate::run::raise_nofile();
    let mut watcher = load(
        cfg,
        mask,
        cgroup.as_ref().map(|c| (c.0, c.1)),
        HubSink(Arc::clone(&hub)),
    )?;
    metrics.watch_worker_queue(Arc::clone(&watcher.workers.stats));
    adopt_running(&mut watcher, cgroup.as_ref().map(|c| c.2.as_str()))?;
    let (ctl, requests) = Control::new()?;
    let capture = CaptureTask {
        watcher,
        requests,
        ctl: Arc::clone(&ctl),
        metrics: Arc::clone(&metrics),
    }
    .spawn()
    .map_err(AgentError::Runtime)?;
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    ready::notify(cfg.ready_fd);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let served: Result<(), std::io::Error> = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let http = tokio::net::TcpListener::from_std(http)?;
        let sock = tokio::net::UnixListener::from_std(sock)?;
        let h = tokio::spawn(http::serve(http, Arc::clone(&metrics)));
        let s = tokio::spawn(socket::serve(sock, Arc::clone(&ctl)));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    if let Ok(mut h) = hub.lock() && let Some(h) = h.as_mut() {
                        h.tick(Instant::now());
                    }
                    if capture.is_finished() {
                        crate::diag!("the capture thread ended unexpectedly");
                        break;
                    }
                }
            }
        }
        h.abort();
        s.abort();
        Ok(())
    });
    let deadline = Instant::now() + SHUTDOWN;
    ctl.stop();
    // The capture thread drains and hands the workers' queue to the sinks;
    // the sinks then get what is left of the budget.
    while !capture.is_finished() && Instant::now() + Duration::from_millis(500) < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained = capture.is_finished();
    if drained {
        let _ = capture.join();
    } else {
        crate::diag!("shutdown: the workers did not finish their queue in time");
    }
    let hub = hub.lock().ok().and_then(|mut h| h.take());
    if let Some(hub) = hub {
        let late = hub.finish(deadline);
        if !late.is_empty() {
            crate::diag!("shutdown: sinks still busy at exit: {}", late.join(", "));
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    served.map_err(AgentError::Runtime)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_membership() {
        assert!(in_subtree("/a/b", "/a"));
        assert!(in_subtree("/a", "/a"));
        assert!(!in_subtree("/ab", "/a"));
        assert!(in_subtree("/anything", "/"));
    }

    #[test]
    fn cgroup_paths_resolve_to_id_and_level() {
        let (id, level, rel) = resolve_cgroup(&cgroup2_root()).unwrap();
        assert_eq!((level, rel.as_str()), (0, "/"));
        assert!(id > 0);
        assert!(resolve_cgroup(Path::new("/tmp")).is_err());
        assert!(resolve_cgroup(Path::new("no/such/group")).is_err());
    }
}
