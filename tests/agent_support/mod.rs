//! Helpers for tests/agent.rs: start the real agent, wait for its
//! READY=1 on a notify socket, read its stdout as JSON lines, scrape its
//! HTTP port, run programs in cgroups of our own, stop it with SIGTERM.
#![allow(dead_code)]

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub metrics: SocketAddr,
    pub socket: PathBuf,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

fn pump(r: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    })
}

impl Agent {
    /// `rfh-trace agent` with `args` (metrics port and socket added),
    /// through `wrap` (e.g. setpriv) when given; waits for READY=1.
    pub fn start(wrap: &[&str], args: &[&str], env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("rfh-agent-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = free_port();
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let socket = dir.path().join("run/agent.sock");
        // The agent's own directory for its socket; a capability-only
        // agent runs as nobody (65534) and must own it.
        std::fs::create_dir(dir.path().join("run")).unwrap();
        std::fs::set_permissions(
            dir.path().join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        if !wrap.is_empty() {
            std::os::unix::fs::chown(dir.path().join("run"), Some(65534), Some(65534)).unwrap();
        }
        let notify = dir.path().join("notify");
        let listener = UnixDatagram::bind(&notify).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // A capability-only agent runs as another user: it must reach the
        // notify socket and create its own socket directory.
        std::fs::set_permissions(&notify, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(super::common::rfh_trace());
                c
            }
            None => Command::new(super::common::rfh_trace()),
        };
        cmd.arg("agent")
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("NOTIFY_SOCKET", &notify)
            .env_remove("NODE_NAME")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start rfh-trace agent");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err_lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            pump(child.stdout.take().unwrap(), Arc::clone(&lines)),
            pump(child.stderr.take().unwrap(), Arc::clone(&err_lines)),
        ];
        let mut buf = [0u8; 64];
        // READY=1, or the agent's early death, within a minute.
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            match listener.recv(&mut buf) {
                Ok(n) => break Ok(n),
                Err(e) if Instant::now() > deadline => break Err(e),
                Err(e) if matches!(child.try_wait(), Ok(Some(_))) => break Err(e),
                Err(_) => {}
            }
        };
        let agent = Agent {
            child,
            dir,
            metrics,
            socket,
            lines,
            stderr: err_lines,
            readers,
        };
        match ready {
            Ok(n) => assert_eq!(&buf[..n], b"READY=1"),
            Err(e) => panic!(
                "no READY=1 from the agent ({e}); stderr:\n{}",
                agent.stderr_text()
            ),
        }
        agent
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn records(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits up to `timeout` for a stdout record that `pred` accepts.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(v) = self.records().into_iter().find(|v| pred(v)) {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The raw stdout line of the first record `pred` accepts.
    pub fn raw_line(&self, pred: impl Fn(&Value) -> bool) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)))
            .cloned()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    /// SIGTERM; returns the status and how long the exit took.
    pub fn stop(mut self) -> (ExitStatus, Duration, Vec<Value>, String) {
        let t = Instant::now();
        // SAFETY: a signal to our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = t.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        std::thread::sleep(Duration::from_millis(150));
        let stderr = self.stderr_text();
        (status, took, self.records(), stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET: status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of one sample line (`name{labels} value`) of an exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A cgroup v2 directory of our own, removed (with its children) on drop.
pub struct Cgroup {
    pub path: PathBuf,
    pub rel: String,
    top: PathBuf,
}

pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("cgroup v2 is mounted")
}

impl Cgroup {
    /// `rel` below the cgroup2 root; its first component is removed on drop.
    pub fn new(rel: &str) -> Cgroup {
        let root = cgroup2_root();
        let path = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&path).expect("create a cgroup (root, cgroup v2)");
        let first = rel.trim_start_matches('/').split('/').next().unwrap();
        Cgroup {
            path,
            rel: format!("/{}", rel.trim_start_matches('/')),
            top: root.join(first),
        }
    }

    /// `exe args` started inside this cgroup (it moves itself, then execs).
    pub fn command(&self, exe: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.path)
            .arg(exe)
            .args(args);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Deepest first; a cgroup with live processes stays (and says so).
        let mut dirs = vec![];
        let mut stack = vec![self.top.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Ids of the BPF programs a process holds, from its descriptors'
/// fdinfo (`prog_id:` of each `anon_inode:bpf-prog`).
pub fn prog_ids_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return ids;
    };
    for fd in fds.flatten() {
        let is_prog =
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("bpf-prog"));
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids
}

pub fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// utime + stime of `pid` in seconds, and its RSS in bytes.
pub fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / hz, pages * 4096)
}

/// Python tools from `cargo xtask setup --with-test-tools`: on PATH, or in
/// its virtualenv.
pub fn py_tool(name: &str) -> PathBuf {
    let venv = Path::new("/var/cache/rfh-trace/pytools/bin").join(name);
    if venv.exists() {
        return venv;
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    }) {
        return p;
    }
    panic!(
        "{name} is missing: run `cargo xtask setup --with-test-tools` (it installs {name} from PyPI)"
    );
}

/// The rotel collector binary the `rotel` PyPI package ships.
pub fn rotel_agent() -> PathBuf {
    let python = py_tool("python3");
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("run python3");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "the rotel collector is missing: run `cargo xtask setup --with-test-tools` (PyPI package rotel)"
    );
    path
}

/// `podman` as this machine runs it: runc with the cgroupfs manager (crun
/// refuses hybrid v1/v2 cgroup hosts), and no default ulimits (raising
/// them needs CAP_SYS_RESOURCE, which a sandboxed root may lack).
pub fn podman(work: &Path) -> Command {
    let conf = work.join("containers.conf");
    std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n").unwrap();
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .env("CONTAINERS_CONF", conf);
    c
}

/// An image holding `exe` (at /) and the shared libraries it loads, made
/// without a registry: `podman import` of a root built here.
pub fn podman_image(work: &Path, exe: &Path, name: &str) -> String {
    let root = work.join("image-root");
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    };
    copy(exe, &root.join(exe.file_name().unwrap()));
    let ldd = Command::new("ldd").arg(exe).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let lib = Path::new(lib);
        copy(lib, &root.join(lib.strip_prefix("/").unwrap()));
    }
    let tar = work.join("image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let image = format!("localhost/{name}:test");
    let out = podman(work)
        .arg("import")
        .arg(&tar)
        .arg(&image)
        .output()
        .expect("podman (cargo xtask setup --with-test-tools)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// A pod UID of the tests' fake pods.
pub const POD_UID: &str = "0d7a9e3c-51b2-4c8e-9f6a-2b1d3e4f5a6b";

/// A containerd-style id unique to this test run.
pub fn container_id(tag: u32) -> String {
    format!("{:08x}{:056x}", std::process::id(), tag)
}

/// The cgroup containerd gives a burstable pod's container (systemd driver).
pub fn pod_cgroup(tag: &str, id: &str) -> Cgroup {
    let uid = POD_UID.replace('-', "_");
    Cgroup::new(&format!(
        "rfhtest-{tag}-{}.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{id}.scope",
        std::process::id()
    ))
}

/// A helper process (a collector, Prometheus) killed however the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
