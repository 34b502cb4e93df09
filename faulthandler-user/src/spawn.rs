//! `-- COMMAND`: the child process, started under watch and, under
//! sudo, as the invoking user.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::{run::RunError, watch::Watcher};

/// The user sudo was invoked by, if we are root because of sudo.
fn sudo_ids() -> Option<(libc::uid_t, libc::gid_t)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    Some((uid, gid))
}

/// Starts `command` as a watched child: it is in the watch map before
/// it execs, so even a crash on its first instruction is caught.
pub fn spawn(w: &mut Watcher, command: &[String]) -> Result<libc::pid_t, RunError> {
    let spawn_err = |source| RunError::Spawn {
        cmd: command[0].clone(),
        source,
    };
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| spawn_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let ids = sudo_ids();
    // Supplementary groups must be looked up before fork: getgrouplist is
    // not async-signal-safe.
    let groups = ids
        .map(|(uid, gid)| supplementary_groups(uid, gid))
        .unwrap_or_default();
    let not_found =
        CString::new(format!("rfh-trace: {}: command not found\n", command[0])).unwrap_or_default();
    let cannot_run =
        CString::new(format!("rfh-trace: {}: cannot run it\n", command[0])).unwrap_or_default();

    let mut go = [0i32; 2];
    if unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    // The ends close themselves on every path out of here.
    let (go_read, go_write) = unsafe { (OwnedFd::from_raw_fd(go[0]), OwnedFd::from_raw_fd(go[1])) };
    // rfh-trace is single-threaded here (the loader threads have been
    // joined), which is what makes execvp after fork safe.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(spawn_err(std::io::Error::last_os_error()));
    }
    if child == 0 {
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
            if let Some((uid, gid)) = ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(126);
                }
            }
            libc::execvp(argv[0], argv.as_ptr());
            let (code, msg) = if *libc::__errno_location() == libc::ENOENT {
                (127, &not_found)
            } else {
                (126, &cannot_run)
            };
            libc::write(2, msg.as_ptr().cast(), msg.as_bytes().len());
            libc::_exit(code);
        }
    }
    drop(go_read);
    if let Err(e) = w.capture.watch(child as u32) {
        // Closing the pipe unwritten makes the child exit without exec.
        drop(go_write);
        unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        return Err(e.into());
    }
    unsafe { libc::write(go_write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    Ok(child)
}

fn supplementary_groups(uid: libc::uid_t, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return vec![gid];
    }
    let mut n: libc::c_int = 64;
    let mut groups = vec![0 as libc::gid_t; n as usize];
    unsafe {
        if libc::getgrouplist((*pw).pw_name, gid, groups.as_mut_ptr(), &mut n) < 0 {
            groups.resize(n as usize, 0);
            libc::getgrouplist((*pw).pw_name, gid, groups.as_mut_ptr(), &mut n);
        }
    }
    groups.truncate(n.max(0) as usize);
    groups
}
