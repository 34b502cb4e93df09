//! What userspace knows about each watched process, learned while it was
//! alive: identity, and the executable mappings with an open handle on
//! each mapped file.
//!
//! A crashing process is normally gone by the time its event is handled,
//! so /proc cannot be read at report time. Mappings are read at attach,
//! exec and executable mmap, and each file is opened through
//! /proc/PID/map_files, which works for deleted files and for files that
//! exist only in the process's mount namespace.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::{self, Read, Seek, SeekFrom},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use faulthandler_common::Vma;

use crate::{decode::c_str, modules::Module};

/// Kernel-internal device number (`MKDEV`), as in `super_block.s_dev`.
fn mkdev(major: u64, minor: u64) -> u64 {
    (major << 20) | minor
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
    /// The `Tracker.files` keys `modules` were opened through, each once.
    file_keys: Vec<(u64, u64)>,
}

struct OpenFile {
    file: File,
    name: String,
    build_id: Option<Vec<u8>>,
}

impl OpenFile {
    fn open_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Above this many cached open files, the ones no tracked process maps
/// any more are closed.
const MAX_OPEN_FILES: usize = 4096;

pub struct Tracker {
    procs: HashMap<u32, ProcInfo>,
    /// The path each process last exec'd, resolved to an absolute path.
    exec_paths: HashMap<u32, PathBuf>,
    /// Mappings the kernel resolved while a process's threads exited.
    exit_vmas: HashMap<u32, Vec<Vma>>,
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

struct MapsLine<'a> {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    ino: u64,
    path: &'a str,
}

fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let ino: u64 = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start();
    if !perms.contains('x') || ino == 0 || !path.starts_with('/') {
        return None;
    }
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    Some(MapsLine {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        offset,
        dev: mkdev(
            u64::from_str_radix(maj, 16).ok()?,
            u64::from_str_radix(min, 16).ok()?,
        ),
        ino,
        path,
    })
}

impl Tracker {
    fn with_file_limit(file_limit: usize) -> Self {
        Self {
            procs: HashMap::new(),
            exec_paths: HashMap::new(),
            exit_vmas: HashMap::new(),
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
        self.procs.remove(&pid);
        self.exec_paths.remove(&pid);
        self.exit_vmas.remove(&pid);
        // Files stay cached: the next process of the same binary reuses them.
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
        let _ = self.refresh(pid);
    }

    /// Re-reads everything about `pid` from /proc. Fails when the process
    /// has already gone (or is going: its maps read empty); what was known
    /// before is kept then.
    pub fn refresh(&mut self, pid: u32) -> io::Result<()> {
        // A test knob: act as if every process died before /proc could be
        // read, so only the kernel-side mapping capture is left.
        if std::env::var_os("RFH_TRACE_TEST_NO_PROC").is_some() {
            return Err(io::Error::other(
                "/proc reads disabled by RFH_TRACE_TEST_NO_PROC",
            ));
        }
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

    /// With more than `file_limit` files open, closes those no tracked
    /// process maps any more.
    fn evict(&mut self) {
        if self.files.len() <= self.evict_above {
            return;
        }
        let used: HashSet<(u64, u64)> = self
            .procs
            .values()
            .flat_map(|p| p.file_keys.iter().copied())
            .collect();
        self.files.retain(|k, _| used.contains(k));
        self.evict_above = self.file_limit.max(self.files.len() + self.file_limit / 4);
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
            let key = (m.dev, m.ino);
            if !self.files.contains_key(&key) {
                let Some(f) = open_mapped(&proc_dir, &m) else {
                    continue;
                };
                self.files.insert(key, f);
            }
            let f = &self.files[&key];
            if !file_keys.contains(&key) {
                file_keys.push(key);
            }
            modules.push(Module {
                open_path: f.open_path(),
                name: m.path.trim_end_matches(" (deleted)").to_string(),
                start: m.start,
                end: m.end,
                file_offset: m.offset,
                build_id: f.build_id.clone(),
            });
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
            exe: fs::read_link(proc_dir.join("exe")).ok().map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            }),
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
                .map(|f| (f.open_path(), f.name.clone(), f.build_id.clone()))
                .or_else(|| {
                    let exe = self
                        .procs
                        .get(&pid)
                        .and_then(|p| p.exe.as_ref().map(PathBuf::from));
                    let hints = exe.iter().chain(self.exec_paths.get(&pid));
                    let path = find_by_identity(&c_str(&v.name), key, hints)?;
                    let build_id = File::open(&path).ok().and_then(|mut f| build_id(&mut f));
                    Some((path.clone(), path.to_string_lossy().into_owned(), build_id))
                });
            if let Some((open_path, name, build_id)) = found {
                modules.push(Module {
                    open_path,
                    name,
                    start: v.start,
                    end: v.end,
                    file_offset: v.file_offset,
                    build_id,
                });
            }
        }
        modules
    }
}

/// The container id in a cgroup v2 path, from the usual runtime scopes
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`) and cgroupfs's `/docker/<id>`.
pub fn container_id(cgroup: &str) -> Option<String> {
    let is_id = |s: &str| s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup
        .rsplit('/')
        .find_map(|part| {
            let scoped = part.strip_suffix(".scope").and_then(|p| {
                ["docker-", "cri-containerd-", "crio-", "libpod-"]
                    .iter()
                    .find_map(|pre| p.strip_prefix(pre))
            });
            match scoped {
                Some(id) if is_id(id) => Some(id.to_string()),
                _ => None,
            }
        })
        .or_else(|| {
            let mut parts = cgroup.split('/').peekable();
            while let Some(p) = parts.next() {
                if p == "docker" {
                    if let Some(id) = parts.peek().filter(|id| is_id(id)) {
                        return Some(id.to_string());
                    }
                }
            }
            None
        })
}

fn open_mapped(proc_dir: &Path, m: &MapsLine) -> Option<OpenFile> {
    let by_range = proc_dir.join(format!("map_files/{:x}-{:x}", m.start, m.end));
    let name = m.path.trim_end_matches(" (deleted)");
    let mut file = File::open(&by_range)
        .or_else(|_| File::open(proc_dir.join("root").join(name.trim_start_matches('/'))))
        .ok()?;
    let build_id = build_id(&mut file);
    Some(OpenFile {
        file,
        name: name.to_string(),
        build_id,
    })
}

/// Finds a file by the dentry name the kernel saw and its (dev, inode),
/// for mappings of a process that died before /proc could be read.
fn find_by_identity<'a>(
    name: &str,
    (dev, ino): (u64, u64),
    hints: impl Iterator<Item = &'a PathBuf>,
) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let mut candidates: Vec<PathBuf> = hints.cloned().collect();
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        candidates.push(Path::new(dir).join(name));
    }
    candidates.into_iter().find(|p| {
        fs::metadata(p).is_ok_and(|md| {
            let d = md.dev();
            let kdev = mkdev(libc::major(d) as u64, libc::minor(d) as u64);
            md.ino() == ino && kdev == dev
        })
    })
}

/// GNU build-id from the ELF's PT_NOTE segments, without reading the
/// whole file.
pub fn build_id(file: &mut File) -> Option<Vec<u8>> {
    const PT_NOTE: u32 = 4;
    const NT_GNU_BUILD_ID: u32 = 3;
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at =
        |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let u64_at =
        |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let phoff = u64_at(&ehdr, 32);
    let (phentsize, phnum) = (u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 || phnum > 256 {
        return None;
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut phdrs).ok()?;
    for ph in phdrs.chunks_exact(phentsize) {
        if u32_at(ph, 0) != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(ph, 8), u64_at(ph, 32).min(64 * 1024) as usize);
        let mut notes = vec![0u8; size];
        file.seek(SeekFrom::Start(off)).ok()?;
        file.read_exact(&mut notes).ok()?;
        let mut p = 0;
        while p + 12 <= notes.len() {
            let (namesz, descsz, ty) = (
                u32_at(&notes, p) as usize,
                u32_at(&notes, p + 4) as usize,
                u32_at(&notes, p + 8),
            );
            let name_end = p + 12 + namesz.next_multiple_of(4);
            let desc_end = name_end + descsz.next_multiple_of(4);
            if desc_end > notes.len() {
                break;
            }
            if ty == NT_GNU_BUILD_ID && notes[p + 12..p + 12 + namesz].starts_with(b"GNU") {
                return Some(notes[name_end..name_end + descsz].to_vec());
            }
            p = desc_end;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let l = "7f1c2a028000-7f1c2a1bd000 r-xp 00028000 fd:01 1835263                    /usr/lib/x86_64-linux-gnu/libc.so.6";
        let m = parse_maps_line(l).unwrap();
        assert_eq!(
            (m.start, m.end, m.offset, m.ino),
            (0x7f1c2a028000, 0x7f1c2a1bd000, 0x28000, 1835263)
        );
        assert_eq!(m.dev, (0xfd << 20) | 1);
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(parse_maps_line("7ffd-7ffe r-xp 00000000 00:00 0  [vdso]").is_none());
        assert!(parse_maps_line("5555-5556 r--p 00000000 fd:01 12 /bin/x").is_none());
        let d = parse_maps_line("5555-5556 r-xp 00001000 fd:01 12 /tmp/a b (deleted)").unwrap();
        assert_eq!(d.path, "/tmp/a b (deleted)");
    }

    #[test]
    fn container_ids_from_real_cgroup_paths() {
        let id = "3f4c0b8e9a1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b";
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some(id)
        );
        assert_eq!(
            container_id(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{id}.scope")).as_deref(),
            Some(id)
        );
        assert_eq!(
            container_id(&format!(
                "/kubepods.slice/kubepods-pod9.slice/crio-{id}.scope"
            ))
            .as_deref(),
            Some(id)
        );
        assert_eq!(container_id(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope/container")).as_deref(), Some(id));
        assert_eq!(container_id(&format!("/docker/{id}")).as_deref(), Some(id));
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn own_build_id_matches_notes() {
        let mut f = File::open("/proc/self/exe").unwrap();
        let id = build_id(&mut f);
        // Rust test binaries are linked with a build-id by default on Linux.
        assert!(id.as_ref().is_some_and(|i| i.len() >= 16), "{id:?}");
    }

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

    fn file_keys(t: &Tracker) -> HashSet<(u64, u64)> {
        t.files.keys().copied().collect()
    }

    fn keys_of(t: &Tracker, pid: u32) -> HashSet<(u64, u64)> {
        t.get(pid).unwrap().file_keys.iter().copied().collect()
    }

    /// Entries no process references, as a forgotten process leaves.
    fn add_stale(t: &mut Tracker, n: u64) -> HashSet<(u64, u64)> {
        (0..n)
            .map(|i| {
                let key = (u64::MAX, i);
                let file = File::open("/dev/null").unwrap();
                let name = "/dev/null".to_string();
                t.files.insert(
                    key,
                    OpenFile {
                        file,
                        name,
                        build_id: None,
                    },
                );
                key
            })
            .collect()
    }

    #[test]
    fn unused_files_are_closed_above_the_limit() {
        let own = std::process::id();
        let parent = std::os::unix::process::parent_id();

        // At or under the limit nothing is closed.
        let mut t = Tracker::with_file_limit(1000);
        let stale = add_stale(&mut t, 3);
        t.refresh(own).unwrap();
        assert!(stale.is_subset(&file_keys(&t)));

        // Over it, only what no tracked process maps is closed.
        let mut t = Tracker::with_file_limit(0);
        let stale = add_stale(&mut t, 3);
        t.refresh(own).unwrap();
        let own_keys = keys_of(&t, own);
        assert!(!own_keys.is_empty());
        assert_eq!(file_keys(&t), own_keys);
        // Modules still open through live handles of the same files.
        for m in &t.get(own).unwrap().modules {
            let (a, b) = (fs::metadata(&m.open_path).unwrap(), fs::metadata(&m.name));
            assert!(
                b.is_ok_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino())),
                "{m:?}"
            );
        }

        // A forgotten process's files go once another refresh overflows,
        // except those another tracked process maps too.
        t.forget(own);
        add_stale(&mut t, 3);
        t.refresh(parent).unwrap();
        assert_eq!(file_keys(&t), keys_of(&t, parent));
        assert!(file_keys(&t).is_disjoint(&stale));

        // The default limit leaves a small cache alone.
        let mut t = Tracker::default();
        let stale = add_stale(&mut t, 3);
        t.refresh(own).unwrap();
        assert!(stale.is_subset(&file_keys(&t)));
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
