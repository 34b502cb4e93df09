//! The mapped files behind the modules: parsing /proc/PID/maps, the cache
//! of open handles (one per file across processes) and its eviction, and
//! finding a file again for a mapping only the kernel saw.

use std::{
    collections::{HashSet, hash_map::Entry},
    fs::{self, File},
    io::{Read, Seek},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use object::elf::FileHeader64;
use object::read::elf::FileHeader as _;
use object::{Endianness, ReadCache};

use super::Tracker;
use crate::modules::{FileHold, Module};
use crate::python::discover::FileInterp;

/// Above this many cached open files, the ones no tracked process maps
/// any more are closed.
pub(super) const MAX_OPEN_FILES: usize = 4096;

pub(super) struct OpenFile {
    file: Arc<File>,
    pub(super) name: String,
    pub(super) build_id: Option<Vec<u8>>,
    /// What the file says about a CPython runtime in it, once probed
    /// (`Err`: it has one that cannot be read, and why).
    pub(super) python: Option<Result<Option<FileInterp>, String>>,
}

impl OpenFile {
    pub(super) fn open_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    pub(super) fn hold(&self) -> FileHold {
        FileHold(Arc::clone(&self.file))
    }

    /// The file has been deleted: nobody can map it again, so once no
    /// tracked process maps it, its handle is only a leak.
    pub(super) fn deleted(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.nlink() == 0)
    }
}

impl Tracker {
    /// The cached handle on the file `m` maps, opened through `proc_dir`
    /// when first seen.
    pub(super) fn file_for(&mut self, proc_dir: &Path, m: &MapsLine) -> Option<&OpenFile> {
        match self.files.entry((m.dev, m.ino)) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(e) => Some(e.insert(open_mapped(proc_dir, m)?)),
        }
    }

    /// With more than `file_limit` files open, closes those no tracked
    /// process maps any more.
    pub(super) fn evict(&mut self) {
        if self.files.len() <= self.evict_above {
            return;
        }
        let used: HashSet<(u64, u64)> = self
            .procs
            .values()
            .flat_map(|p| p.file_keys.iter().copied())
            .collect();
        let released = &mut self.released;
        self.files.retain(|k, f| {
            let keep = used.contains(k);
            if !keep {
                released.push(f.open_path());
            }
            keep
        });
        self.evict_above = self.file_limit.max(self.files.len() + self.file_limit / 4);
    }
}

/// A file's identity for caches keyed by it: dev, inode, size and mtime
/// (s, ns). A path alone may name a different file by the next report (a
/// package upgrade), and several paths may name one file (`/proc/PID/root`
/// and `/proc/self/fd` aliases).
pub(crate) type FileStamp = [i64; 5];

pub(crate) fn file_stamp(path: &Path) -> Option<FileStamp> {
    let md = fs::metadata(path).ok()?;
    Some([
        md.dev() as i64,
        md.ino() as i64,
        md.size() as i64,
        md.mtime(),
        md.mtime_nsec(),
    ])
}

/// Kernel-internal device number (`MKDEV`), as in `super_block.s_dev`, so
/// that keys from /proc match the `dev` the kernel captures in a `Vma`.
fn mkdev(major: u64, minor: u64) -> u64 {
    (major << 20) | minor
}

/// The kernel appends this to the path of a file unlinked since it was
/// mapped or exec'd; reports show the path the process used.
pub(super) fn strip_deleted(path: &str) -> &str {
    path.trim_end_matches(" (deleted)")
}

/// An executable file mapping in /proc/PID/maps.
pub(crate) struct MapsLine<'a> {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) offset: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) path: &'a str,
}

impl MapsLine<'_> {
    pub(crate) fn module(
        &self,
        open_path: PathBuf,
        build_id: Option<Vec<u8>>,
        hold: Option<FileHold>,
    ) -> Module {
        Module {
            open_path,
            name: strip_deleted(self.path).to_string(),
            start: self.start,
            end: self.end,
            file_offset: self.offset,
            build_id,
            hold,
        }
    }
}

/// None for lines that are not executable file mappings.
pub(crate) fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
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

fn open_mapped(proc_dir: &Path, m: &MapsLine) -> Option<OpenFile> {
    let by_range = proc_dir.join(format!("map_files/{:x}-{:x}", m.start, m.end));
    let name = strip_deleted(m.path);
    OpenFile::open(&by_range, name).or_else(|| {
        OpenFile::open(
            &proc_dir.join("root").join(name.trim_start_matches('/')),
            name,
        )
    })
}

impl OpenFile {
    /// Opens `path`, a file the process knew as `name`.
    pub(super) fn open(path: &Path, name: &str) -> Option<Self> {
        let file = File::open(path).ok()?;
        let build_id = build_id(&file);
        Some(OpenFile {
            file: Arc::new(file),
            name: name.to_string(),
            build_id,
            python: None,
        })
    }
}

/// Finds a file by the dentry name the kernel saw and its (dev, inode),
/// for mappings of a process that died before /proc could be read.
pub(super) fn find_by_identity<'a>(
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
    let same = |p: &PathBuf| {
        fs::metadata(p).is_ok_and(|md| {
            let d = md.dev();
            let kdev = mkdev(libc::major(d) as u64, libc::minor(d) as u64);
            md.ino() == ino && kdev == dev
        })
    };
    if let Some(found) = candidates.iter().find(|p| same(p)) {
        return Some(found.clone());
    }
    // rfh-trace in a container that shares the host's pids (the agent's
    // DaemonSet, `podman run --pid=host`): the host's files are under
    // pid 1's root.
    candidates
        .iter()
        .filter_map(|p| Some(Path::new("/proc/1/root").join(p.strip_prefix("/").ok()?)))
        .find(same)
}

/// GNU build-id from the ELF's PT_NOTE segments, reading only the header,
/// the program headers and the notes, never the whole file. Takes `&File`
/// or `&mut File` alike.
pub(crate) fn build_id(file: impl Read + Seek) -> Option<Vec<u8>> {
    let data = ReadCache::new(file);
    let header = FileHeader64::<Endianness>::parse(&data).ok()?;
    crate::modules::elf_build_id(header, header.endian().ok()?, &data)
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
    fn own_build_id_matches_notes() {
        let f = File::open("/proc/self/exe").unwrap();
        let id = build_id(&f);
        // Rust test binaries are linked with a build-id by default on Linux.
        assert!(id.as_ref().is_some_and(|i| i.len() >= 16), "{id:?}");
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
                        file: Arc::new(file),
                        name,
                        build_id: None,
                        python: None,
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
}
