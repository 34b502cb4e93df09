//! Saying when rfh-trace is attached, so whoever started it (a test, a
//! script, systemd) can act then instead of sleeping and hoping.

use std::{
    fs::File,
    io::Write,
    os::{fd::FromRawFd, unix::net::UnixDatagram},
};

/// Keeps `--ready-fd` out of the commands rfh-trace starts, which would
/// otherwise hold it open; fails when it is not an open descriptor.
pub fn claim(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on an arbitrary number is harmless: it fails with
    // EBADF when the number is not an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `READY=1\n` to `fd` and closes it, and sends `READY=1` to
/// `$NOTIFY_SOCKET` when it is set (the systemd protocol; a leading `@`
/// names an abstract socket). Failures are not fatal: the watch works
/// the same without anyone told.
pub fn notify(fd: Option<i32>) {
    if let Some(fd) = fd {
        // SAFETY: the caller passed this descriptor to us for exactly this
        // use (`--ready-fd`), and nothing else in rfh-trace owns it.
        let mut f = unsafe { File::from_raw_fd(fd) };
        let _ = f.write_all(b"READY=1\n");
    }
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let _ = send_notify(&path.to_string_lossy(), "READY=1");
    }
}

fn send_notify(path: &str, msg: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(msg.as_bytes(), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_gets_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send_notify(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 16];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
