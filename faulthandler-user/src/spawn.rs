//! `-- COMMAND`: the child process, started under watch and, under
//! sudo, as the invoking user.

use std::{
    ffi::{CString, OsStr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    sync::OnceLock,
};

use crate::{run::RunError, watch::Watcher};

/// Why the sudo environment cannot be trusted to name the invoking user.
/// Guessing would mean running COMMAND, or opening files, as root.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SudoError {
    #[error(
        "{set} is set but {unset} is not, so the invoking user is unknown; run rfh-trace through sudo, or set both or neither"
    )]
    Half {
        set: &'static str,
        unset: &'static str,
    },
    #[error(
        "{var}={value:?} is not a user or group id; run rfh-trace through sudo, or unset SUDO_UID and SUDO_GID"
    )]
    NotAnId { var: &'static str, value: String },
    #[error(
        "SUDO_UID is 0 but SUDO_GID is {gid}: refusing to run as root with another group; unset SUDO_UID and SUDO_GID to run as root"
    )]
    RootWithGroup { gid: libc::gid_t },
}

/// The user sudo was invoked by: COMMAND runs as this user, and output
/// files are opened as this user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoker {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<libc::gid_t>,
}

/// The user to act for, if we are root because of sudo: `None` when not
/// root, or when neither SUDO_UID nor SUDO_GID is set, or when root itself
/// ran sudo. Computed once; every later call gives the same answer.
pub fn invoker() -> Result<Option<&'static Invoker>, SudoError> {
    static INVOKER: OnceLock<Result<Option<Invoker>, SudoError>> = OnceLock::new();
    INVOKER
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Ok(None);
            }
            let uid = std::env::var_os("SUDO_UID");
            let gid = std::env::var_os("SUDO_GID");
            Ok(
                sudo_ids(uid.as_deref(), gid.as_deref())?.map(|(uid, gid)| Invoker {
                    uid,
                    gid,
                    groups: supplementary_groups(uid, gid),
                }),
            )
        })
        .as_ref()
        .map(Option::as_ref)
        .map_err(Clone::clone)
}

/// Reads SUDO_UID and SUDO_GID as sudo sets them: both or neither, each a
/// plain decimal id. Root's own ids (both 0) mean there is nobody to
/// switch to.
fn sudo_ids(
    uid: Option<&OsStr>,
    gid: Option<&OsStr>,
) -> Result<Option<(libc::uid_t, libc::gid_t)>, SudoError> {
    let (uid, gid) = match (uid, gid) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(SudoError::Half {
                set: "SUDO_UID",
                unset: "SUDO_GID",
            });
        }
        (None, Some(_)) => {
            return Err(SudoError::Half {
                set: "SUDO_GID",
                unset: "SUDO_UID",
            });
        }
        (Some(u), Some(g)) => (parse_id("SUDO_UID", u)?, parse_id("SUDO_GID", g)?),
    };
    match (uid, gid) {
        (0, 0) => Ok(None),
        (0, gid) => Err(SudoError::RootWithGroup { gid }),
        ids => Ok(Some(ids)),
    }
}

/// A decimal id without sign, spaces or leading `+`. `u32::MAX` is
/// refused too: to setresuid and friends it means "leave unchanged".
fn parse_id(var: &'static str, value: &OsStr) -> Result<u32, SudoError> {
    let bytes = value.as_bytes();
    let bad = || SudoError::NotAnId {
        var,
        value: value.to_string_lossy().into_owned(),
    };
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&id| id != u32::MAX)
        .ok_or_else(bad)
}

/// Starts `command` as a watched child: it is in the watch map before
/// it execs, so even a crash on its first instruction is caught. Under
/// sudo it runs as the invoking user, never as root by default.
pub fn spawn(w: &mut Watcher, command: &[String]) -> Result<libc::pid_t, RunError> {
    let name = command.first().map(String::as_str).unwrap_or_default();
    let spawn_err = |source| RunError::Spawn {
        cmd: name.to_string(),
        source,
    };
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| spawn_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    if args.is_empty() {
        return Err(spawn_err(std::io::ErrorKind::InvalidInput.into()));
    }
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // Everything exec needs is prepared before fork: the worker thread is
    // already running, so the child may only make async-signal-safe calls,
    // and execvp's PATH search (which may allocate) is not one.
    let candidates = exec_candidates(name);
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // Looked up before fork (getgrouplist is not async-signal-safe); run.rs
    // has already refused a bad sudo environment, this only fails closed.
    let invoker = invoker().map_err(|e| spawn_err(std::io::Error::other(e)))?;
    let shown = crate::escape::escape(name);
    let not_found =
        CString::new(format!("rfh-trace: {shown}: command not found\n")).unwrap_or_default();
    let cannot_run =
        CString::new(format!("rfh-trace: {shown}: cannot run it\n")).unwrap_or_default();

    let mut go = [0i32; 2];
    // SAFETY: `go` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors nothing else
    // owns; as OwnedFds they close themselves on every path out of here.
    let (go_read, go_write) = unsafe { (OwnedFd::from_raw_fd(go[0]), OwnedFd::from_raw_fd(go[1])) };
    // SAFETY: the child below calls only async-signal-safe functions on
    // memory prepared before the fork, then execs or exits: safe even
    // though other threads (the worker) run in the parent.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: in the child of fork, only async-signal-safe calls on
        // memory prepared before the fork (argv, groups, messages).
        unsafe {
            libc::close(go_write.as_raw_fd());
            let mut b = 0u8;
            // Wait until the parent has put us in the watch map, so a
            // crash in the first instruction is still caught; without the
            // go byte (the parent failed or died), don't run unwatched.
            if libc::read(go_read.as_raw_fd(), (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(126);
            }
            // Rust ignores SIGPIPE, and an ignored signal stays ignored
            // across exec: give the command the defaults it expects.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            if let Some(inv) = invoker {
                // Groups first: once the uid is dropped, setgroups fails.
                if libc::setgroups(inv.groups.len(), inv.groups.as_ptr()) != 0
                    || libc::setgid(inv.gid) != 0
                    || libc::setuid(inv.uid) != 0
                {
                    libc::_exit(126);
                }
            }
            // execvp's rules: try each PATH entry; a file found but not
            // runnable (EACCES) is "cannot run" unless a later one runs.
            let mut denied = false;
            for c in &candidates {
                libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
                match *libc::__errno_location() {
                    libc::ENOENT | libc::ENOTDIR => {}
                    libc::EACCES => denied = true,
                    _ => {
                        denied = true;
                        break;
                    }
                }
            }
            let (code, msg) = if denied {
                (126, &cannot_run)
            } else {
                (127, &not_found)
            };
            libc::write(2, msg.as_ptr().cast(), msg.as_bytes().len());
            libc::_exit(code);
        }
    }
    drop(go_read);
    if let Err(e) = w.capture.watch(child as u32) {
        // Closing the pipe unwritten makes the child exit without exec.
        drop(go_write);
        // SAFETY: `child` is our own child; a null status pointer is allowed.
        unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        return Err(e.into());
    }
    // SAFETY: writes one byte from a live array to a descriptor we own.
    unsafe { libc::write(go_write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    Ok(child)
}

/// The groups `uid` is a member of (from the user database), with `gid`
/// first; just `gid` when the user has no entry.
fn supplementary_groups(uid: libc::uid_t, gid: libc::gid_t) -> Vec<libc::gid_t> {
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is to live memory of the stated size; the
    // reentrant variant keeps the result in `pw` and `buf`, which outlive
    // its use below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return vec![gid];
    }
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pw_name points into `buf`; `groups` has room for `n` ids.
        let rc = unsafe { libc::getgrouplist(pw.pw_name, gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return groups;
        }
        // Too small: `n` now says how many there are.
        groups.resize(n.max(groups.len() * 2), 0);
    }
    vec![gid]
}

/// The paths exec tries for `name`, in order, as execvp would: `name`
/// itself when it holds a `/`, else each `$PATH` directory (the default
/// search path when `PATH` is unset) joined with it.
fn exec_candidates(name: &str) -> Vec<CString> {
    if name.contains('/') {
        return CString::new(name).into_iter().collect();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .filter_map(|dir| {
            // An empty entry is the current directory.
            let dir = if dir.as_os_str().is_empty() {
                std::path::PathBuf::from(".")
            } else {
                dir
            };
            CString::new(dir.join(name).into_os_string().into_vec()).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{SudoError, sudo_ids};
    use std::ffi::OsStr;

    fn ids(uid: Option<&str>, gid: Option<&str>) -> Result<Option<(u32, u32)>, SudoError> {
        sudo_ids(uid.map(OsStr::new), gid.map(OsStr::new))
    }

    #[test]
    fn both_or_neither() {
        assert_eq!(ids(None, None), Ok(None));
        assert_eq!(ids(Some("1000"), Some("1000")), Ok(Some((1000, 1000))));
        assert_eq!(ids(Some("65534"), Some("100")), Ok(Some((65534, 100))));
        // A user whose primary group is root is still not root.
        assert_eq!(ids(Some("1000"), Some("0")), Ok(Some((1000, 0))));
        let e = ids(Some("1000"), None).unwrap_err();
        assert_eq!(
            e,
            SudoError::Half {
                set: "SUDO_UID",
                unset: "SUDO_GID"
            }
        );
        assert!(
            e.to_string()
                .starts_with("SUDO_UID is set but SUDO_GID is not"),
            "{e}"
        );
        assert!(matches!(
            ids(None, Some("1000")),
            Err(SudoError::Half {
                set: "SUDO_GID",
                ..
            })
        ));
    }

    #[test]
    fn root_invoking_sudo() {
        assert_eq!(ids(Some("0"), Some("0")), Ok(None));
        assert_eq!(
            ids(Some("0"), Some("1000")),
            Err(SudoError::RootWithGroup { gid: 1000 })
        );
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            " 1000",
            "1000 ",
            "+1000",
            "-1",
            "1e3",
            "abc",
            "0x10",
            "4294967295",
            "4294967296",
            "99999999999999999999",
            "１０００",
        ] {
            let e = ids(Some(bad), Some("1000")).unwrap_err();
            assert!(
                matches!(
                    e,
                    SudoError::NotAnId {
                        var: "SUDO_UID",
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
            let e = ids(Some("1000"), Some(bad)).unwrap_err();
            assert!(
                matches!(
                    e,
                    SudoError::NotAnId {
                        var: "SUDO_GID",
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
        }
        let e = ids(Some("x\ny"), Some("1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SUDO_UID=\"x\\ny\" is not a user or group id; run rfh-trace through sudo, or unset SUDO_UID and SUDO_GID"
        );
    }

    #[test]
    fn non_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let e = sudo_ids(Some(OsStr::from_bytes(b"10\xff")), Some(OsStr::new("1"))).unwrap_err();
        assert!(matches!(e, SudoError::NotAnId { .. }));
    }
}
