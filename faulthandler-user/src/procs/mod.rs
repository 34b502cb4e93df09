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
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use faulthandler_common::Vma;

pub use self::container::{cgroup_path_by_id, cgroup2_root, container_id};
pub use self::files::build_id;
pub(crate) use self::files::{FileStamp, file_stamp, parse_maps_line};
use self::files::{MAX_OPEN_FILES, OpenFile, find_by_identity, strip_deleted};
use crate::{decode::c_str, modules::Module};

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
    /// The `Tracker.files` keys `modules` were opened through, each once.
    file_keys: Vec<(u64, u64)>,
}

pub struct Tracker {
    procs: HashMap<u32, ProcInfo>,
    /// The path each process last exec'd, resolved to an absolute path.
    exec_paths: HashMap<u32, PathBuf>,
    /// Mappings the kernel resolved while a process's threads exited.
    exit_vmas: HashMap<u32, Vec<Vma>>,
    /// Processes whose mappings changed since they were last read.
    stale: Vec<u32>,
    /// Keyed by (kernel dev, inode): one handle per file across processes.
    /// Files outlive the processes that mapped them (the next process of
    /// the same binary reuses them) until `evict` closes them.
    files: HashMap<(u64, u64), OpenFile>,
    /// `MAX_OPEN_FILES`, smaller in tests.
    file_limit: usize,
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
            files: HashMap::new(),
            file_limit,
            evict_above: file_limit,
        }
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
        self.exec_paths.remove(&pid);
        self.exit_vmas.remove(&pid);
        // Files stay cached: the next process of the same binary reuses
        // them. A deleted file has no next process: once no tracked
        // process maps it, its handle goes (a report being made still
        // holds its own).
        for key in gone.map(|p| p.file_keys).unwrap_or_default() {
            let deleted = self.files.get(&key).is_some_and(|f| f.deleted());
            if deleted && !self.procs.values().any(|p| p.file_keys.contains(&key)) {
                self.files.remove(&key);
            }
        }
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
        // What was known belongs to the old image (often the parent's,
        // copied at fork); if the new one dies before /proc can be read,
        // stale mappings and exe would be worse than none.
        self.procs.remove(&pid);
        self.mark_stale(pid);
    }

    /// A forked child has its parent's mappings until it execs.
    pub fn fork(&mut self, parent: u32, child: u32) {
        match self.procs.get(&parent).cloned() {
            Some(mut info) => {
                info.pid = child;
                self.procs.insert(child, info);
            }
            None => self.mark_stale(child),
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

    /// Re-reads every process marked stale; one that has gone keeps what
    /// was known.
    pub fn refresh_stale(&mut self) {
        for pid in std::mem::take(&mut self.stale) {
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
        for line in maps.lines() {
            let Some(m) = parse_maps_line(line) else {
                continue;
            };
            let Some(f) = self.file_for(&proc_dir, &m) else {
                continue;
            };
            modules.push(m.module(f.open_path(), f.build_id.clone(), Some(f.hold())));
            let key = (m.dev, m.ino);
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
            modules,
            file_keys,
        };
        self.procs.insert(pid, info);
        Ok(())
    }

    /// The modules to unwind and symbolize a capture of `pid` with: what
    /// was read from /proc ahead of time, completed by the mappings the
    /// kernel resolved at signal time for anything that was missed.
    pub fn modules_for(&self, pid: u32, vmas: &[Vma]) -> Vec<Module> {
        let mut modules = self
            .procs
            .get(&pid)
            .map(|p| p.modules.clone())
            .unwrap_or_default();
        let at_exit = self
            .exit_vmas
            .get(&pid)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for v in vmas.iter().chain(at_exit) {
            const VM_EXEC: u32 = 4;
            if v.vm_flags & VM_EXEC == 0
                || v.ino == 0
                || modules.iter().any(|m| m.contains(v.start))
            {
                continue;
            }
            let key = (v.dev as u64, v.ino);
            let found = self
                .files
                .get(&key)
                .map(|f| {
                    let hold = Some(f.hold());
                    (f.open_path(), f.name.clone(), f.build_id.clone(), hold)
                })
                .or_else(|| {
                    let exe = self
                        .procs
                        .get(&pid)
                        .and_then(|p| p.exe.as_ref().map(PathBuf::from));
                    let hints = exe.iter().chain(self.exec_paths.get(&pid));
                    let path = find_by_identity(&c_str(&v.name), key, hints)?;
                    let build_id = File::open(&path).ok().and_then(|mut f| build_id(&mut f));
                    Some((
                        path.clone(),
                        path.to_string_lossy().into_owned(),
                        build_id,
                        None,
                    ))
                });
            if let Some((open_path, name, build_id, hold)) = found {
                modules.push(Module {
                    open_path,
                    name,
                    start: v.start,
                    end: v.end,
                    file_offset: v.file_offset,
                    build_id,
                    hold,
                });
            }
        }
        modules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_itself() {
        let mut t = Tracker::default();
        let pid = std::process::id();
        t.refresh(pid).unwrap();
        let info = t.get(pid).unwrap();
        let here = tracks_itself as *const () as usize as u64;
        let m = crate::modules::find(&info.modules, here).expect("own text mapping");
        assert!(info.exe.as_deref().is_some_and(|e| m.name == e));
    }

    #[test]
    fn refresh_all_reads_running_processes() {
        let mut t = Tracker::default();
        let n = t.refresh_all();
        let parent = std::os::unix::process::parent_id();
        assert!(n >= 1, "{n}");
        let info = t.get(parent).expect("parent process read");
        assert!(!info.modules.is_empty());
        assert!(t.get(std::process::id()).is_none(), "own pid skipped");
        // Kernel threads (kthreadd is pid 2 on a host) are skipped.
        let kthreadd = fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
        assert!(!kthreadd || t.get(2).is_none());
    }
}
