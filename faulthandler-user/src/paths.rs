//! Resolving an output path the way the kernel would for an unprivileged
//! user, one component at a time.
//!
//! rfh-trace runs as root, and the paths it writes to are typed by a user
//! and often lie in shared directories such as /tmp. Each component is
//! opened with `O_PATH | O_NOFOLLOW` relative to the directory before it, so
//! every symbolic link is seen and judged before it is followed: one in a
//! sticky, world-writable directory is followed only if the follower or the
//! directory's owner owns it (the kernel's `fs.protected_symlinks` rule,
//! which may be off on the host). The final component is opened relative to
//! the directory descriptor the walk ends on, so nothing can be swapped in
//! between the checks and the open.

use std::{
    collections::VecDeque,
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// Symbolic links followed in one path before giving up, as the kernel's
/// MAXSYMLINKS.
const MAX_LINKS: u32 = 40;

/// Why a component of the path was not followed.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// A symlink another user planted in a sticky world-writable directory.
    Planted {
        link: Vec<u8>,
        owner: libc::uid_t,
    },
    /// The path ends in `/`, `.` or `..`: it names a directory.
    Directory,
    Io(io::Error),
}

impl From<io::Error> for WalkError {
    fn from(e: io::Error) -> Self {
        WalkError::Io(e)
    }
}

/// The directory that holds the last component of `path`, and that
/// component. `follower` is the uid whose links may be followed anywhere.
pub(crate) fn walk_to_parent(
    path: &Path,
    follower: libc::uid_t,
) -> Result<(OwnedFd, Vec<u8>), WalkError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(io::Error::from(io::ErrorKind::NotFound).into());
    }
    let mut parts = components(bytes);
    let last = match parts.pop_back() {
        Some(name) if !bytes.ends_with(b"/") && name != b"." && name != b".." => name,
        _ => return Err(WalkError::Directory),
    };
    let start: &[u8] = if bytes.starts_with(b"/") { b"/" } else { b"." };
    let mut dir = open_at(None, start, libc::O_PATH | libc::O_DIRECTORY)?;
    let mut shown = if bytes.starts_with(b"/") {
        Vec::new()
    } else {
        b".".to_vec()
    };
    let mut links = 0;
    while let Some(part) = parts.pop_front() {
        if part == b"." {
            continue;
        }
        // `..` is never a link; the kernel resolves it (and mount points).
        let fd = open_at(Some(dir.as_fd()), &part, libc::O_PATH | libc::O_NOFOLLOW)?;
        shown.push(b'/');
        shown.extend_from_slice(&part);
        let st = fstat(fd.as_fd())?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => dir = fd,
            libc::S_IFLNK => {
                let parent = fstat(dir.as_fd())?;
                if !may_follow(&parent, &st, follower) {
                    return Err(WalkError::Planted {
                        link: shown,
                        owner: st.st_uid,
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP).into());
                }
                let target = read_link(fd.as_fd())?;
                if target.is_empty() {
                    return Err(io::Error::from(io::ErrorKind::NotFound).into());
                }
                if target.starts_with(b"/") {
                    dir = open_at(None, b"/", libc::O_PATH | libc::O_DIRECTORY)?;
                }
                for p in components(&target).into_iter().rev() {
                    parts.push_front(p);
                }
            }
            _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR).into()),
        }
    }
    Ok((dir, last))
}

/// The non-empty components of a path, `.` and `..` included.
fn components(bytes: &[u8]) -> VecDeque<Vec<u8>> {
    bytes
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn sticky_and_writable_by_others(dir: &libc::stat, group_too: bool) -> bool {
    let others = libc::S_IWOTH | if group_too { libc::S_IWGRP } else { 0 };
    dir.st_mode & libc::S_ISVTX != 0 && dir.st_mode & others != 0
}

/// The kernel's `protected_symlinks` rule: in a sticky world-writable
/// directory, a link is followed only if the follower or the directory's
/// owner owns it.
pub(crate) fn may_follow(dir: &libc::stat, link: &libc::stat, follower: libc::uid_t) -> bool {
    !sticky_and_writable_by_others(dir, false)
        || link.st_uid == follower
        || link.st_uid == dir.st_uid
}

/// The kernel's `protected_regular` rule at its stricter level 2: in a
/// sticky directory that others (or the group) can write to, an existing
/// file is opened only if the opener or the directory's owner owns it, so
/// nobody can make rfh-trace append to a file they planted under the
/// name it will use.
pub(crate) fn may_open_existing(dir: &libc::stat, file: &libc::stat, opener: libc::uid_t) -> bool {
    !sticky_and_writable_by_others(dir, true) || file.st_uid == opener || file.st_uid == dir.st_uid
}

/// Kernel interfaces that look like file systems. Writing a report to one
/// of them reconfigures the machine (`/proc/sys`, `/sys`, cgroups, ...)
/// instead of storing text.
const PSEUDO_FS: &[(u32, &str)] = &[
    (0x0000_9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x0027_e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7365_6366, "securityfs"),
    (0xcafe_4a11, "bpffs"),
    (0x6265_6570, "configfs"),
    (0x0000_1cd1, "devpts"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
    (0x6573_5543, "fusectl"),
    (0x1980_0202, "mqueue"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4341_5d53, "smackfs"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6e73_6673, "nsfs"),
    (0x5049_5045, "pipefs"),
    (0x534f_434b, "sockfs"),
    (0x0904_1934, "anon_inodefs"),
    (0x6759_6969, "rpc_pipefs"),
    (0x6e66_7364, "nfsd"),
    (0x0000_0187, "autofs"),
    (0x6c6f_6f70, "binderfs"),
    (0xabba_1974, "xenfs"),
];

/// The name of the pseudo file system with this `f_type`, if it is one.
pub(crate) fn pseudo_fs(f_type: u32) -> Option<&'static str> {
    PSEUDO_FS
        .iter()
        .find(|&&(magic, _)| magic == f_type)
        .map(|&(_, name)| name)
}

/// The pseudo file system `fd` lies on, if any.
pub(crate) fn pseudo_fs_of(fd: BorrowedFd<'_>) -> io::Result<Option<&'static str>> {
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (borrowed) and `st` is a live statfs.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a signed long holding a 32-bit magic number.
    Ok(pseudo_fs(st.f_type as u32))
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`; `None` is the current
/// directory (and is ignored for absolute names).
pub(crate) fn open_at(
    dir: Option<BorrowedFd<'_>>,
    name: &[u8],
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    open_at_mode(dir, name, flags, 0)
}

pub(crate) fn open_at_mode(
    dir: Option<BorrowedFd<'_>>,
    name: &[u8],
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is NUL-terminated and outlives the call; `dirfd` is
    // open (borrowed) or AT_FDCWD.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (borrowed; O_PATH descriptors allow fstat) and
    // `st` is a live stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The target of the symlink `fd` (opened with O_PATH | O_NOFOLLOW).
fn read_link(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path makes readlinkat read the link `fd` itself
    // refers to; `buf` is live and its length is passed.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn stat_with(mode: u32, uid: u32) -> libc::stat {
        // SAFETY: an all-zero stat is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = mode;
        st.st_uid = uid;
        st
    }

    #[test]
    fn protected_symlinks_rule() {
        let tmp = stat_with(libc::S_IFDIR | 0o1777, 0);
        let link = |uid| stat_with(libc::S_IFLNK | 0o777, uid);
        // Another user's link in root's /tmp: not for root, not for 1000.
        assert!(!may_follow(&tmp, &link(65534), 0));
        assert!(!may_follow(&tmp, &link(65534), 1000));
        // The follower's own link, or the directory owner's: followed.
        assert!(may_follow(&tmp, &link(1000), 1000));
        assert!(may_follow(&tmp, &link(0), 1000));
        // Not sticky, or sticky but not world-writable: the rule is off.
        let shared = stat_with(libc::S_IFDIR | 0o777, 0);
        assert!(may_follow(&shared, &link(65534), 0));
        let group = stat_with(libc::S_IFDIR | 0o1770, 0);
        assert!(may_follow(&group, &link(65534), 0));
        // A user's own sticky world-writable directory: their links count.
        let users = stat_with(libc::S_IFDIR | 0o1777, 1000);
        assert!(may_follow(&users, &link(1000), 0));
        assert!(!may_follow(&users, &link(65534), 0));
    }

    #[test]
    fn protected_regular_rule() {
        let tmp = stat_with(libc::S_IFDIR | 0o1777, 0);
        let file = |uid| stat_with(libc::S_IFREG | 0o666, uid);
        assert!(!may_open_existing(&tmp, &file(65534), 0));
        assert!(!may_open_existing(&tmp, &file(65534), 1000));
        assert!(may_open_existing(&tmp, &file(1000), 1000));
        assert!(may_open_existing(&tmp, &file(0), 1000));
        // Level 2: group-writable sticky directories are covered too.
        let group = stat_with(libc::S_IFDIR | 0o1770, 0);
        assert!(!may_open_existing(&group, &file(65534), 0));
        let plain = stat_with(libc::S_IFDIR | 0o777, 0);
        assert!(may_open_existing(&plain, &file(65534), 0));
    }

    #[test]
    fn pseudo_fs_names() {
        assert_eq!(pseudo_fs(0x9fa0), Some("procfs"));
        assert_eq!(pseudo_fs(0x6265_6572), Some("sysfs"));
        assert_eq!(pseudo_fs(0xcafe_4a11), Some("bpffs"));
        // ext4, tmpfs, xfs, btrfs, overlay are real file systems.
        for real in [0xef53, 0x0102_1994, 0x5846_5342, 0x9123_683e, 0x794c_7630] {
            assert_eq!(pseudo_fs(real), None, "{real:#x}");
        }
    }

    #[test]
    fn pseudo_fs_of_proc_and_tmp() {
        let proc = open_at(None, b"/proc/self", libc::O_PATH).unwrap();
        assert_eq!(pseudo_fs_of(proc.as_fd()).unwrap(), Some("procfs"));
        let tmp = tempfile::tempdir().unwrap();
        let fd = open_at(None, tmp.path().as_os_str().as_bytes(), libc::O_PATH).unwrap();
        assert_eq!(pseudo_fs_of(fd.as_fd()).unwrap(), None);
    }

    /// The directory `walk_to_parent` ends on, as a path.
    fn walked(path: &Path) -> (std::path::PathBuf, String) {
        let (dir, name) = walk_to_parent(path, 0).unwrap_or_else(|e| panic!("{path:?}: {e:?}"));
        let link = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let dir = std::fs::read_link(link).unwrap();
        (dir, String::from_utf8(name).unwrap())
    }

    #[test]
    fn walks_components_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("a/b", root.join("rel")).unwrap();
        symlink(root.join("a"), root.join("abs")).unwrap();
        symlink("..", root.join("a/b/up")).unwrap();
        symlink("rel", root.join("chain")).unwrap();
        assert_eq!(walked(&root.join("a/b/f")), (root.join("a/b"), "f".into()));
        assert_eq!(walked(&root.join("rel/f")), (root.join("a/b"), "f".into()));
        assert_eq!(
            walked(&root.join("abs/b/f")),
            (root.join("a/b"), "f".into())
        );
        assert_eq!(walked(&root.join("a/b/up/f")), (root.join("a"), "f".into()));
        assert_eq!(
            walked(&root.join("chain/./f")),
            (root.join("a/b"), "f".into())
        );
        assert_eq!(walked(&root.join("a/b/../f")), (root.join("a"), "f".into()));
        assert_eq!(
            walked(&root.join("a//b///f")),
            (root.join("a/b"), "f".into())
        );
        // The final component is not resolved: it may be a link or absent.
        assert_eq!(walked(&root.join("a/rel")), (root.join("a"), "rel".into()));
    }

    #[test]
    fn walk_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("file"), "").unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let errno = |p: &Path| match walk_to_parent(p, 0) {
            Err(WalkError::Io(e)) => e.raw_os_error(),
            other => panic!("{p:?}: {other:?}"),
        };
        assert_eq!(errno(&root.join("file/x")), Some(libc::ENOTDIR));
        assert_eq!(errno(&root.join("loop/x")), Some(libc::ELOOP));
        assert_eq!(errno(&root.join("missing/x")), Some(libc::ENOENT));
        for dir in ["", "/", "x/", "x/.", "x/.."] {
            let p = root.join(dir);
            let p = if dir.is_empty() { Path::new("") } else { &p };
            assert!(
                matches!(
                    walk_to_parent(p, 0),
                    Err(WalkError::Directory | WalkError::Io(_))
                ),
                "{p:?}"
            );
        }
        assert!(matches!(
            walk_to_parent(&root.join("x/"), 0),
            Err(WalkError::Directory)
        ));
    }
}
