//! Where reports go: stderr, or the `--output` file opened defensively.
//!
//! rfh-trace runs as root and the output path is often in a shared
//! directory, so opening it must not be a way to make root clobber or
//! create files elsewhere. [`open_for`] is the one opener for every file
//! rfh-trace writes (`--output`, `--flamegraph`, later sinks):
//! - under sudo the whole open runs as the invoking user, so the kernel's
//!   own permission checks apply and a new file belongs to that user;
//! - every component is resolved by [`crate::paths`], which refuses a
//!   symlink planted by another user in a sticky world-writable directory,
//!   and a file another user owns there;
//! - the final component is never followed if it is a symlink, only
//!   regular files are accepted, never on procfs, sysfs or another kernel
//!   pseudo file system, and an existing file is appended to, never
//!   truncated;
//! - a file we create is private, 0600 (crash reports carry stack bytes,
//!   which may hold secrets).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::{
    paths::{self, WalkError},
    spawn::{Invoker, SudoError},
};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "refusing to write to {}: it is a symbolic link; pass the link's target as {flag}",
        path.display()
    )]
    Symlink { path: PathBuf, flag: &'static str },
    #[error(
        "refusing to write to {}: it is {kind}, not a regular file; choose a file path for {flag}",
        path.display()
    )]
    NotRegular {
        path: PathBuf,
        kind: &'static str,
        flag: &'static str,
    },
    #[error(
        "refusing to write to {}: it is on {fs}, a kernel interface, not a file system; choose a file path for {flag}",
        path.display()
    )]
    PseudoFs {
        path: PathBuf,
        fs: &'static str,
        flag: &'static str,
    },
    #[error(
        "refusing to write to {}: {} is a symbolic link owned by uid {owner} in a sticky world-writable directory, which only its owner should follow",
        path.display(), String::from_utf8_lossy(link)
    )]
    PlantedSymlink {
        path: PathBuf,
        link: Vec<u8>,
        owner: libc::uid_t,
    },
    #[error(
        "refusing to write to {}: it belongs to uid {owner} and lies in a sticky directory others can write to; choose another path for {flag}",
        path.display()
    )]
    ForeignFile {
        path: PathBuf,
        owner: libc::uid_t,
        flag: &'static str,
    },
    #[error("cannot write to {} (choose a writable {flag} path)", path.display())]
    Open {
        path: PathBuf,
        flag: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Sudo(#[from] SudoError),
}

/// Opens `path` for `--output`: see [`open_for`].
pub fn open(path: &Path) -> Result<File, OutputError> {
    open_for(path, "--output")
}

/// Opens `path` for appending, creating it with mode 0600 if it is absent,
/// as the invoking user under sudo. `flag` names the option the path came
/// from, for the error messages.
pub fn open_for(path: &Path, flag: &'static str) -> Result<File, OutputError> {
    match crate::spawn::invoker()? {
        None => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            open_as(path, flag, me)
        }
        Some(user) => {
            let owned = path.to_path_buf();
            as_user(user, move || open_as(&owned, flag, user.uid)).unwrap_or_else(|source| {
                Err(OutputError::Open {
                    path: path.into(),
                    flag,
                    source,
                })
            })
        }
    }
}

/// Runs `f` on a thread of its own that has taken on `user`'s ids and
/// groups, and so has none of root's powers over files. Raw syscalls
/// change the credentials of the calling thread alone (glibc's wrappers
/// would change every thread's), and the thread ends with `f`.
fn as_user<T: Send>(user: &Invoker, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    // Changing a thread's ids marks the process non-dumpable; put back
    // what it was once the thread is gone.
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    let result = std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("rfh-open-as-user".into())
            .spawn_scoped(s, || {
                let n = user.groups.len();
                // SAFETY: raw setgroups/setresgid/setresuid on this thread
                // only; `groups` is live for the call. Groups go first:
                // once the uid is dropped, changing them is refused.
                let switched = unsafe {
                    libc::syscall(libc::SYS_setgroups, n, user.groups.as_ptr()) == 0
                        && libc::syscall(libc::SYS_setresgid, user.gid, user.gid, user.gid) == 0
                        && libc::syscall(libc::SYS_setresuid, user.uid, user.uid, user.uid) == 0
                };
                if switched {
                    Ok(f())
                } else {
                    Err(io::Error::last_os_error())
                }
            })?;
        worker
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the file-opening thread panicked")))
    });
    if dumpable >= 0 {
        // SAFETY: PR_SET_DUMPABLE takes a plain integer.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong) };
    }
    result
}

/// The opener proper, running with the credentials that should apply;
/// `me` is the uid those credentials stand for.
fn open_as(path: &Path, flag: &'static str, me: libc::uid_t) -> Result<File, OutputError> {
    let io_err = |source: io::Error| OutputError::Open {
        path: path.into(),
        flag,
        source,
    };
    let (dir, name) = paths::walk_to_parent(path, me).map_err(|e| match e {
        WalkError::Planted { link, owner } => OutputError::PlantedSymlink {
            path: path.into(),
            link,
            owner,
        },
        WalkError::Directory => OutputError::NotRegular {
            path: path.into(),
            kind: "a directory",
            flag,
        },
        WalkError::Io(source) => io_err(source),
    })?;
    let pseudo = |fs| OutputError::PseudoFs {
        path: path.into(),
        fs,
        flag,
    };
    if let Some(fs) = paths::pseudo_fs_of(dir.as_fd()).map_err(io_err)? {
        return Err(pseudo(fs));
    }
    // Creating and opening are separate attempts so that a new file is born
    // 0600 while an existing one keeps its owner's mode; retrying covers the
    // file being removed or created by someone else between the two.
    for _ in 0..3 {
        let created = paths::open_at_mode(
            Some(dir.as_fd()),
            &name,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        );
        match created {
            Ok(fd) => return Ok(File::from(fd)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e)),
        }
        // Look before opening: opening a device or FIFO can have effects
        // of its own, and an O_PATH descriptor opens nothing.
        let found = match paths::open_at(Some(dir.as_fd()), &name, libc::O_PATH | libc::O_NOFOLLOW)
        {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        };
        let st = paths::fstat(found.as_fd()).map_err(io_err)?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFLNK {
            return Err(OutputError::Symlink {
                path: path.into(),
                flag,
            });
        }
        if kind != libc::S_IFREG {
            return Err(OutputError::NotRegular {
                path: path.into(),
                kind: describe(kind),
                flag,
            });
        }
        // A procfs file bind-mounted onto an ordinary directory.
        if let Some(fs) = paths::pseudo_fs_of(found.as_fd()).map_err(io_err)? {
            return Err(pseudo(fs));
        }
        let parent = paths::fstat(dir.as_fd()).map_err(io_err)?;
        if !paths::may_open_existing(&parent, &st, me) {
            return Err(OutputError::ForeignFile {
                path: path.into(),
                owner: st.st_uid,
                flag,
            });
        }
        // O_NONBLOCK: should a FIFO be swapped in meanwhile, the open fails
        // (ENXIO) instead of waiting for a reader; the check below then
        // sees it is not the file we looked at.
        let opened = paths::open_at(
            Some(dir.as_fd()),
            &name,
            libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        );
        let fd = match opened {
            Ok(fd) => fd,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::ENXIO)
                ) =>
            {
                continue;
            }
            Err(e) => return Err(io_err(e)),
        };
        let now = paths::fstat(fd.as_fd()).map_err(io_err)?;
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) {
            return Ok(File::from(fd));
        }
    }
    Err(io_err(io::Error::other(
        "it keeps being created and removed by someone else",
    )))
}

fn describe(kind: libc::mode_t) -> &'static str {
    match kind {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "a special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// The opener as the user running the tests, whatever SUDO_UID says
    /// (`sudo cargo test` sets it): acting for the invoking user is
    /// covered by tests/hostile.rs, as root.
    fn open(path: &Path) -> Result<File, OutputError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        open_as(path, "--output", unsafe { libc::geteuid() })
    }

    #[test]
    fn new_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.txt");
        let mut sink = open(&path).unwrap();
        sink.write_all(b"crash\n").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "crash\n");
    }

    #[test]
    fn existing_file_is_appended_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.txt");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut sink = open(&path).unwrap();
        sink.write_all(b"new\n").unwrap();
        let mut again = open(&path).unwrap();
        again.write_all(b"newer\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\nnewer\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn symlink_is_refused_and_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        symlink(&target, &link).unwrap();
        let err = open(&link).unwrap_err();
        assert!(matches!(err, OutputError::Symlink { .. }), "{err:?}");
        let expected = format!(
            "refusing to write to {}: it is a symbolic link",
            link.display()
        );
        assert!(err.to_string().starts_with(&expected), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");

        // A dangling link must not be a way to create the file it names.
        let missing = dir.path().join("missing");
        let dangling = dir.path().join("dangling");
        symlink(&missing, &dangling).unwrap();
        assert!(matches!(open(&dangling), Err(OutputError::Symlink { .. })));
        assert!(!missing.exists());
    }

    #[test]
    fn directory_and_fifo_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("it is a directory"), "{err}");
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("skipping the FIFO case: mkfifo is unavailable");
            return;
        }
        // Must fail at once rather than wait for a reader.
        let err = open(&fifo).unwrap_err();
        assert!(
            matches!(err, OutputError::NotRegular { kind: "a FIFO", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_directory_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("report.txt");
        let err = open(&path).unwrap_err();
        let expected = format!(
            "cannot write to {} (choose a writable --output path)",
            path.display()
        );
        assert_eq!(err.to_string(), expected);
        let cause = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(
            cause.as_deref(),
            Some("No such file or directory (os error 2)")
        );
    }

    #[test]
    fn kernel_interfaces_are_refused() {
        for (path, fs) in [
            ("/proc/sys/kernel/domainname", "procfs"),
            ("/proc/self/fd/2", "procfs"),
            ("/proc/rfh-trace-new-file", "procfs"),
            ("/sys/kernel/rfh-trace-new-file", "sysfs"),
        ] {
            let err = open_for(Path::new(path), "--flamegraph").unwrap_err();
            assert!(
                matches!(err, OutputError::PseudoFs { fs: f, .. } if f == fs),
                "{path}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "refusing to write to {path}: it is on {fs}, a kernel interface, not a file system; choose a file path for --flamegraph"
                )
            );
        }
        assert!(!Path::new("/proc/rfh-trace-new-file").exists());
    }

    #[test]
    fn links_in_parents_are_followed_in_private_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        symlink("real", dir.path().join("via")).unwrap();
        let mut sink = open(&dir.path().join("via/report.txt")).unwrap();
        sink.write_all(b"x\n").unwrap();
        let text = std::fs::read_to_string(dir.path().join("real/report.txt")).unwrap();
        assert_eq!(text, "x\n");
    }

    #[test]
    fn trailing_slash_names_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = format!("{}/", dir.path().display());
        let err = open(Path::new(&path)).unwrap_err();
        assert!(err.to_string().contains("it is a directory"), "{err}");
    }
}
