//! What userspace knows about each watched process, learned while it was
//! alive: identity, and the executable mappings with an open handle on
//! each mapped file.
//!
//! A crashing process is normally gone by the time its event is handled,
//! so /proc cannot be read at report time. Mappings are read at attach,
//! exec and executable mmap, and each file is opened through
//! /proc/PID/map_files, which works for deleted files and for files that
//! exist only in the process's mount namespace.

mod container;
mod files;

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use faulthandler_common::Vma;

pub use self::container::{cgroup_path_by_id, cgroup2_root, container_id};
#[cfg(test)]
pub(crate) use self::files::build_id;
pub(crate) use self::files::{FileStamp, file_stamp, parse_maps_line};
use self::files::{MAX_OPEN_FILES, OpenFile, find_by_identity, strip_deleted};
use crate::{
    decode::c_str,
    modules::Module,
    python::{
        PyError,
        discover::{MappedElf, PyTarget, discover_with, probe_file},
        kernel::py_proc,
    },
};
use faulthandler_common::PyProc;
use faulthandler_common::VM_EXEC;

/// The process (thread group) a thread id belongs to, from
/// /proc/TID/status (which exists for every thread, listed or not).
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// `root` and every process descended from it, from the parent links in
/// /proc (one pass, then children found level by level).
pub fn tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    out
}

#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub pid: u32,
    pub ns_pid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    pub uid: Option<u32>,
    pub cgroup: Option<String>,
    pub modules: Vec<Module>,
    /// The process's CPython, when it runs one: `Err` says why its frames
    /// cannot be read (an unsupported version, say).
    pub(crate) python: Option<Result<PyTarget, String>>,
    /// The `Tracker.files` keys `modules` were opened through, each once.
    file_keys: Vec<(u64, u64)>,
}

/// How long a process that has just exec'd or forked must live before
/// its mappings are read from /proc.
const SETTLE: Duration = Duration::from_millis(5);

pub struct Tracker {
    procs: HashMap<u32, ProcInfo>,
    /// The path each process last exec'd, resolved to an absolute path.
    exec_paths: HashMap<u32, PathBuf>,
    /// Mappings the kernel resolved while a process's threads exited.
    exit_vmas: HashMap<u32, Vec<Vma>>,
    /// Processes whose mappings changed since they were last read.
    stale: Vec<u32>,
    /// When each process was seen to exec or fork, until it has lived
    /// `SETTLE` and been read.
    born: HashMap<u32, Instant>,
    /// Processes whose interpreter may have changed since the kernel's
    /// table was last told (`take_python_changes`).
    py_changed: Vec<u32>,
    /// Keyed by (kernel dev, inode): one handle per file across processes.
    /// Files outlive the processes that mapped them (the next process of
    /// the same binary reuses them) until `evict` closes them.
    files: HashMap<(u64, u64), OpenFile>,
    /// `MAX_OPEN_FILES`, smaller in tests.
    file_limit: usize,
    /// Open paths of files closed since `take_released`: what the
    /// unwinder and symbolizer cached for them can go too.
    released: Vec<PathBuf>,
    /// `files.len()` above which the next refresh runs an eviction pass.
    /// Raised past what the last pass kept, so that with more than
    /// `file_limit` files in use a pass runs once per `file_limit / 4` new
    /// files rather than on every refresh.
    evict_above: usize,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::with_file_limit(MAX_OPEN_FILES)
    }
}

impl Tracker {
    fn with_file_limit(file_limit: usize) -> Self {
        Self {
            procs: HashMap::new(),
            exec_paths: HashMap::new(),
            exit_vmas: HashMap::new(),
            stale: Vec::new(),
            born: HashMap::new(),
            py_changed: Vec::new(),
            files: HashMap::new(),
            released: Vec::new(),
            file_limit,
            evict_above: file_limit,
        }
    }

    /// The open paths of the files closed since the last call.
    pub fn take_released(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.released)
    }

    pub fn get(&self, pid: u32) -> Option<&ProcInfo> {
        self.procs.get(&pid)
    }

    /// Keeps mappings the kernel resolved as a thread of `pid` exited.
    pub fn add_vmas(&mut self, pid: u32, vmas: &[Vma]) {
        self.exit_vmas
            .entry(pid)
            .or_default()
            .extend_from_slice(vmas);
    }

    /// Every process known.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.keys().copied().collect()
    }

    /// The path `pid` last exec'd, as resolved when it did.
    pub fn exec_path(&self, pid: u32) -> Option<String> {
        self.exec_paths
            .get(&pid)
            .map(|p| p.to_string_lossy().into_owned())
    }

    pub fn forget(&mut self, pid: u32) {
        let gone = self.procs.remove(&pid);
        if gone.as_ref().is_some_and(|p| p.python.is_some()) {
            self.python_changed(pid);
        }
        self.exec_paths.remove(&pid);
        self.exit_vmas.remove(&pid);
        // Gone: a re-read could only fail.
        self.stale.retain(|&p| p != pid);
        self.born.remove(&pid);
        // Files stay cached: the next process of the same binary reuses
        // them. A deleted file has no next process: once no tracked
        // process maps it, its handle goes (a report being made still
        // holds its own).
        let keys = gone.map(|p| p.file_keys).unwrap_or_default();
        self.release_deleted(&keys);
    }

    /// Closes the files among `keys` that are deleted and that no tracked
    /// process maps.
    fn release_deleted(&mut self, keys: &[(u64, u64)]) {
        for key in keys {
            let deleted = self.files.get(key).is_some_and(|f| f.deleted());
            if deleted
                && !self.procs.values().any(|p| p.file_keys.contains(key))
                && let Some(f) = self.files.remove(key)
            {
                self.released.push(f.open_path());
            }
        }
    }

    /// Closes every cached file that was deleted after its last process
    /// was forgotten (a binary removed once it had run): called now and
    /// then, as nothing else would ever close it.
    pub fn sweep_deleted(&mut self) {
        let keys: Vec<(u64, u64)> = self.files.keys().copied().collect();
        self.release_deleted(&keys);
    }

    /// Records what `pid` exec'd (the path given to execve) and re-reads
    /// its mappings. A relative path is resolved against the process's
    /// working directory, or ours when it has already gone (right for
    /// `-- COMMAND`, which starts in our directory).
    pub fn exec(&mut self, pid: u32, filename: &str) {
        let path = Path::new(filename);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            let cwd =
                fs::read_link(format!("/proc/{pid}/cwd")).or_else(|_| std::env::current_dir());
            cwd.map(|c| c.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        self.exec_paths.insert(pid, path);
        self.born.insert(pid, Instant::now());
        // What was known belongs to the old image (often the parent's,
        // copied at fork); if the new one dies before /proc can be read,
        // stale mappings and exe would be worse than none.
        if self.procs.remove(&pid).is_some_and(|p| p.python.is_some()) {
            self.python_changed(pid);
        }
        self.mark_stale(pid);
    }

    /// A forked child has its parent's mappings until it execs.
    pub fn fork(&mut self, parent: u32, child: u32) {
        self.born.insert(child, Instant::now());
        match self.procs.get(&parent).cloned() {
            Some(mut info) => {
                info.pid = child;
                if info.python.is_some() {
                    self.python_changed(child);
                }
                self.procs.insert(child, info);
            }
            None => self.mark_stale(child),
        }
        // A child that crashes before anything of it is read still ran
        // its parent's program.
        if let Some(path) = self.exec_paths.get(&parent).cloned() {
            self.exec_paths.entry(child).or_insert(path);
        }
    }

    /// `pid`'s mappings changed (an executable mmap). The re-read waits
    /// for `refresh_stale`, so ld.so mapping a dozen libraries costs one
    /// read of /proc, not a dozen.
    pub fn mark_stale(&mut self, pid: u32) {
        if !self.stale.contains(&pid) {
            self.stale.push(pid);
        }
    }

    /// Re-reads every process marked stale that has lived `SETTLE`; one
    /// that has gone keeps what was known. Younger ones wait for a later
    /// call: most processes that exec live less than that (a build's
    /// shell commands), and reading theirs would mostly find them gone;
    /// if one crashes, the mappings the kernel resolved as it died
    /// (`add_vmas`) are there instead.
    pub fn refresh_stale(&mut self) {
        self.refresh_stale_at(Instant::now());
    }

    /// How long until `refresh_stale` has a young process to read: the
    /// caller should not wait for events longer than that.
    pub fn next_refresh_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.stale
            .iter()
            .filter_map(|p| self.born.get(p))
            .map(|&b| (b + SETTLE).saturating_duration_since(now))
            .min()
    }

    fn refresh_stale_at(&mut self, now: Instant) {
        let born = &self.born;
        let (due, young): (Vec<u32>, Vec<u32>) = std::mem::take(&mut self.stale)
            .into_iter()
            .partition(|p| born.get(p).is_none_or(|&b| now.duration_since(b) >= SETTLE));
        self.stale = young;
        for pid in due {
            self.born.remove(&pid);
            let _ = self.refresh(pid);
        }
    }

    /// Re-reads everything about `pid` from /proc. Fails when the process
    /// has already gone (or is going: its maps read empty); what was known
    /// before is kept then.
    pub fn refresh(&mut self, pid: u32) -> io::Result<()> {
        let r = self.read_proc(pid);
        self.evict();
        r
    }

    /// Refreshes every process in /proc but ours, so that processes already
    /// running when `--all` starts are symbolized too. Kernel threads (and
    /// processes exiting or unreadable) have no maps to read and are
    /// skipped. Returns how many processes were read.
    pub fn refresh_all(&mut self) -> usize {
        let own = std::process::id();
        let Ok(dir) = fs::read_dir("/proc") else {
            return 0;
        };
        let pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&p| p != own)
            .collect();
        let read = pids
            .into_iter()
            .filter(|&p| self.read_proc(p).is_ok())
            .count();
        self.evict();
        read
    }

    fn read_proc(&mut self, pid: u32) -> io::Result<()> {
        // A test knob: act as if every process died before /proc could be
        // read, so only the kernel-side mapping capture is left.
        if std::env::var_os("RFH_TRACE_TEST_NO_PROC").is_some() {
            return Err(io::Error::other(
                "/proc reads disabled by RFH_TRACE_TEST_NO_PROC",
            ));
        }

        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let maps = fs::read_to_string(proc_dir.join("maps"))?;
        let mut modules = Vec::new();
        let mut file_keys = Vec::new();
        let mut module_keys = Vec::new();
        for line in maps.lines() {
            let Some(m) = parse_maps_line(line) else {
                continue;
            };
            let Some(f) = self.file_for(&proc_dir, &m) else {
                continue;
            };
            modules.push(m.module(f.open_path(), f.build_id.clone(), Some(f.hold())));
            let key = (m.dev, m.ino);
            module_keys.push(key);
            if !file_keys.contains(&key) {
                file_keys.push(key);
            }
        }
        if modules.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no executable mappings: the process is exiting",
            ));
        }
        let status = fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
        };
        let info = ProcInfo {
            pid,
            ns_pid: field("NSpid:").and_then(|v| v.last()?.parse().ok()),
            comm: fs::read_to_string(proc_dir.join("comm"))
                .ok()
                .map(|c| c.trim_end().to_string()),
            exe: fs::read_link(proc_dir.join("exe"))
                .ok()
                .map(|p| strip_deleted(&p.to_string_lossy()).to_string()),
            cmdline: fs::read(proc_dir.join("cmdline"))
                .ok()
                .filter(|c| !c.is_empty())
                .map(|c| {
                    c.split(|&b| b == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect()
                }),
            uid: field("Uid:").and_then(|v| v.first()?.parse().ok()),
            cgroup: fs::read_to_string(proc_dir.join("cgroup"))
                .ok()
                .and_then(|c| {
                    c.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                }),
            python: self.discover_python(&modules, &module_keys),
            modules,
            file_keys,
        };
        let was_python = self.procs.get(&pid).is_some_and(|p| p.python.is_some());
        if was_python || info.python.is_some() {
            self.python_changed(pid);
        }
        self.procs.insert(pid, info);
        Ok(())
    }

    /// The CPython among `modules` (whose files are `keys`), each file
    /// probed once for all the processes that map it.
    fn discover_python(
        &mut self,
        modules: &[Module],
        keys: &[(u64, u64)],
    ) -> Option<Result<PyTarget, String>> {
        let files = &mut self.files;
        let mapped = modules
            .iter()
            .zip(keys)
            .map(|(m, &k)| (MappedElf::from(m), k));
        let by_path: HashMap<&Path, (u64, u64)> =
            mapped.clone().map(|(m, k)| (m.open_path, k)).collect();
        let probe = |m: MappedElf<'_>| {
            let Some(file) = by_path.get(m.open_path).and_then(|k| files.get_mut(k)) else {
                return Ok(None);
            };
            let known = file
                .python
                .get_or_insert_with(|| probe_file(m.open_path, m.name).map_err(|e| e.to_string()));
            match known {
                Ok(Some(interp)) => interp.target(m).map(Some),
                Ok(None) => Ok(None),
                Err(why) => Err(PyError::Cached(why.clone())),
            }
        };
        match discover_with(mapped.map(|(m, _)| m), probe) {
            Ok(t) => Some(Ok(t)),
            Err(PyError::NotPython) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }

    fn python_changed(&mut self, pid: u32) {
        if !self.py_changed.contains(&pid) {
            self.py_changed.push(pid);
        }
    }

    /// The processes whose entry in the kernel's CPython table is to be
    /// set (`Some`) or removed (`None`) since the last call.
    pub fn take_python_changes(&mut self) -> Vec<(u32, Option<PyProc>)> {
        std::mem::take(&mut self.py_changed)
            .into_iter()
            .map(|pid| {
                let entry = match self.procs.get(&pid).and_then(|p| p.python.as_ref()) {
                    Some(Ok(t)) => py_proc(t).ok(),
                    _ => None,
                };
                (pid, entry)
            })
            .collect()
    }

    /// Where a file named `name` that `pid` mapped too late for /proc may
    /// be: its executable, then beside each file it is known to map, and
    /// for a CPython, in its `lib-dynload` (where `_ctypes` comes from).
    fn hints_for(&self, pid: u32, name: &str) -> Vec<PathBuf> {
        let info = self.procs.get(&pid);
        let mut out: Vec<PathBuf> = info
            .and_then(|p| p.exe.as_ref().map(PathBuf::from))
            .into_iter()
            .chain(self.exec_paths.get(&pid).cloned())
            .collect();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let known = info.map(|p| p.modules.as_slice()).unwrap_or_default();
        let paths = known.iter().map(|m| PathBuf::from(&m.name));
        for p in out.clone().into_iter().chain(paths) {
            if let Some(d) = p.parent()
                && !dirs.iter().any(|k| k == d)
            {
                dirs.push(d.to_path_buf());
            }
        }
        for d in dirs {
            out.push(d.join(name));
            // A CPython's extension modules: <prefix>/lib/python3.N/
            // lib-dynload, beside libpython (<prefix>/lib) or the
            // executable (<prefix>/bin).
            let lib = if d.ends_with("lib") {
                Some(d.clone())
            } else {
                d.parent().map(|up| up.join("lib"))
            };
            let Some(lib) = lib else { continue };
            if lib != d {
                out.push(lib.join(name));
            }
            let Ok(entries) = fs::read_dir(&lib) else {
                continue;
            };
            for e in entries.flatten().take(64) {
                if e.file_name().to_string_lossy().starts_with("python3") {
                    out.push(e.path().join("lib-dynload").join(name));
                }
            }
        }
        out
    }

    /// The modules to unwind and symbolize a capture of `pid` with: what
    /// was read from /proc ahead of time, completed by the mappings the
    /// kernel resolved at signal time for anything that was missed.
    pub fn modules_for(&mut self, pid: u32, vmas: &[Vma]) -> Vec<Module> {
        let mut modules = self
            .procs
            .get(&pid)
            .map(|p| p.modules.clone())
            .unwrap_or_default();
        let at_exit = self.exit_vmas.get(&pid).cloned().unwrap_or_default();
        for v in vmas.iter().chain(&at_exit) {
            if u64::from(v.vm_flags) & VM_EXEC == 0
                || v.ino == 0
                || modules.iter().any(|m| m.contains(v.start))
            {
                continue;
            }
            let key = (v.dev as u64, v.ino);
            if !self.files.contains_key(&key) {
                // Found by name and identity, then held like any mapped
                // file, so the caches that read it let go of it the same
                // way once it is deleted.
                let name = c_str(&v.name);
                let hints = self.hints_for(pid, &name);
                let Some(path) = find_by_identity(&name, key, hints.iter()) else {
                    continue;
                };
                let Some(f) = OpenFile::open(&path, &path.to_string_lossy()) else {
                    continue;
                };
                self.files.insert(key, f);
            }
            if let Some(f) = self.files.get(&key) {
                modules.push(Module {
                    open_path: f.open_path(),
                    name: f.name.clone(),
                    start: v.start,
                    end: v.end,
                    file_offset: v.file_offset,
                    build_id: f.build_id.clone(),
                    hold: Some(f.hold()),
                });
            }
        }
        modules
    }
}

#[cfg(test)]
mod tests;
