//! The request socket: `rfh-trace dump PID` asks a running agent, whose
//! programs are loaded and whose caches are warm, instead of loading its
//! own. Root only, twice over: the socket is 0600 in a 0700 directory,
//! and the peer's credentials (SO_PEERCRED) are checked on every
//! connection, so loosened permissions still let no one else in.
//!
//! Protocol: one request line, `{"op":"dump","pid":N,"format":"text"|"json"}`;
//! the answer is one status line, `{"ok":true}` or `{"ok":false,"error":…}`,
//! then the rendered report until the end of the stream.

use std::{
    fs::File,
    io::{self, BufRead, Read, Seek, Write},
    os::{
        fd::FromRawFd,
        unix::{
            fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::{AgentError, runtime::Control};
use crate::{
    report::Report,
    sink::{self, Out},
};

#[derive(Debug, Serialize, Deserialize)]
struct DumpRequest {
    op: String,
    pid: u32,
    format: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Status {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// How long a dump may take before the requester is told it failed.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket path a client uses: `$RFH_TRACE_SOCKET`, else the default.
pub fn client_path() -> PathBuf {
    std::env::var_os("RFH_TRACE_SOCKET")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from(super::config::DEFAULT_SOCKET),
            PathBuf::from,
        )
}

/// Binds the socket: its directory made 0700 if absent, a stale socket
/// of a dead agent replaced, a live agent's left alone (an error).
pub fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another agent is listening there",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Created 0600 from the start: no window where others could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Root only. Not the agent's own uid: a capability-only agent may run as
/// a user that other daemons share (nobody), and a dump shows any
/// process's stacks.
fn allowed(uid: u32) -> bool {
    uid == 0
}

pub async fn serve(listener: tokio::net::UnixListener, ctl: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ctl = Arc::clone(&ctl);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DUMP_TIMEOUT * 2, handle(stream, ctl)).await;
        });
    }
}

async fn handle(stream: tokio::net::UnixStream, ctl: Arc<Control>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let status = |ok: bool, error: Option<String>| {
        let mut s = serde_json::to_vec(&Status { ok, error }).unwrap_or_default();
        s.push(b'\n');
        s
    };
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(4096));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    // Refused after the request is read, so the peer reads the refusal
    // rather than a broken pipe.
    if !allowed(cred.uid()) {
        let msg = format!(
            "refused: uid {} may not ask this agent for dumps (root only)",
            cred.uid()
        );
        crate::diag!("dump request {msg}");
        write.write_all(&status(false, Some(msg))).await?;
        return Ok(());
    }
    let req = match serde_json::from_str::<DumpRequest>(&line) {
        Ok(r) if r.op == "dump" => r,
        _ => {
            write
                .write_all(&status(false, Some("bad request".into())))
                .await?;
            return Ok(());
        }
    };
    let json = req.format == "json";
    let result = tokio::task::spawn_blocking(move || {
        let report = ctl.dump(req.pid, DUMP_TIMEOUT)?;
        render(&report, json).map_err(|e| format!("cannot render the report: {e}"))
    })
    .await
    .unwrap_or_else(|_| Err("the dump task panicked".into()));
    match result {
        Ok(body) => {
            write.write_all(&status(true, None)).await?;
            write.write_all(&body).await?;
        }
        Err(e) => write.write_all(&status(false, Some(e))).await?,
    }
    write.shutdown().await
}

/// The report as `rfh-trace dump` would print it, through the same sinks,
/// into an anonymous memory file.
fn render(report: &Report, json: bool) -> io::Result<Vec<u8>> {
    // SAFETY: a plain syscall with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"rfh-dump".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let format = if json {
        sink::Format::Json
    } else {
        sink::Format::Text { color: false }
    };
    let mut s = sink::new(format, Out::File(file.try_clone()?));
    s.report(report)?;
    drop(s);
    file.rewind()?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

/// Asks the agent at `path` for a dump of `pid`. `Ok(None)` when no agent
/// answers there (the caller loads its own programs then).
pub fn ask_dump(path: &Path, pid: u32, json: bool) -> Result<Option<Vec<u8>>, AgentError> {
    let Ok(mut stream) = UnixStream::connect(path) else {
        return Ok(None);
    };
    let err = |source| AgentError::Ask {
        path: path.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(DUMP_TIMEOUT + Duration::from_secs(5)))
        .map_err(err)?;
    let req = DumpRequest {
        op: "dump".into(),
        pid,
        format: if json { "json" } else { "text" }.into(),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| err(io::Error::other(e)))?;
    line.push(b'\n');
    // A refusal may come before the request is taken: read the answer
    // whatever became of the write.
    let _ = stream.write_all(&line);
    let mut reader = io::BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head).map_err(err)?;
    let status: Status = serde_json::from_str(&head).map_err(|e| err(io::Error::other(e)))?;
    if !status.ok {
        return Err(AgentError::Refused {
            path: path.to_path_buf(),
            message: status.error.unwrap_or_default(),
        });
    }
    let mut body = Vec::new();
    reader.read_to_end(&mut body).map_err(err)?;
    Ok(Some(body))
}

/// What the capture thread hands back for a dump request.
pub type DumpReply = Result<mpsc::Receiver<Report>, String>;
