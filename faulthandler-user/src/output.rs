//! Where reports go: stderr, or the `--output` file opened defensively.
//!
//! rfh-trace runs as root and the output path is often in a shared
//! directory, so opening it must not be a way to make root clobber or
//! create files elsewhere: the final component is never followed if it is a
//! symlink, only regular files are accepted, and a file we create is private
//! (crash reports carry stack bytes, which may hold secrets).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "refusing to write to {}: it is a symbolic link; pass the link's target as --output",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "refusing to write to {}: it is {kind}, not a regular file; choose a file path for --output",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("cannot write to {} (choose a writable --output path)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Opens `path` for appending, creating it with mode 0600 if it is absent.
pub fn open(path: &Path) -> Result<File, OutputError> {
    // Creating and opening are separate attempts so that a new file is born
    // 0600 while an existing one keeps its owner's mode; retrying covers the
    // file being removed or created by someone else between the two.
    for _ in 0..3 {
        let created = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        match created {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(classify(path, e)),
        }
        // O_NONBLOCK keeps a FIFO without a reader from hanging the open
        // (it fails with ENXIO instead); on a regular file it does nothing.
        let existing = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        match existing {
            Ok(file) => return check_regular(path, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(classify(path, e)),
        }
    }
    Err(OutputError::Open {
        path: path.into(),
        source: io::Error::other("it keeps being created and removed by someone else"),
    })
}

fn check_regular(path: &Path, file: File) -> Result<File, OutputError> {
    let meta = file.metadata().map_err(|source| OutputError::Open {
        path: path.into(),
        source,
    })?;
    if meta.file_type().is_file() {
        return Ok(file);
    }
    Err(OutputError::NotRegular {
        path: path.into(),
        kind: describe(meta.file_type()),
    })
}

/// Turns the errno of a refused open into the error that says why.
fn classify(path: &Path, source: io::Error) -> OutputError {
    let lstat = std::fs::symlink_metadata(path).map(|m| m.file_type());
    match (source.raw_os_error(), lstat) {
        // ELOOP also means a symlink loop in a parent directory; only a link
        // at the final component is the case O_NOFOLLOW refused.
        (Some(libc::ELOOP), Ok(ft)) if ft.is_symlink() => {
            OutputError::Symlink { path: path.into() }
        }
        (Some(libc::EISDIR | libc::ENXIO), Ok(ft)) if !ft.is_file() => OutputError::NotRegular {
            path: path.into(),
            kind: describe(ft),
        },
        _ => OutputError::Open {
            path: path.into(),
            source,
        },
    }
}

fn describe(ft: std::fs::FileType) -> &'static str {
    match ft {
        _ if ft.is_dir() => "a directory",
        _ if ft.is_fifo() => "a FIFO",
        _ if ft.is_socket() => "a socket",
        _ if ft.is_char_device() => "a character device",
        _ if ft.is_block_device() => "a block device",
        _ if ft.is_symlink() => "a symbolic link",
        _ => "a special file",
    }
}

/// The destination of rendered reports.
#[derive(Debug)]
pub enum Sink {
    Stderr,
    File(File),
}

impl Sink {
    /// Writes one report. It goes out as a single `write_all` so that with
    /// O_APPEND, reports from several rfh-trace instances sharing a file do
    /// not interleave, and stderr is locked so log lines cannot cut in.
    pub fn write_report(&mut self, text: &str) -> io::Result<()> {
        match self {
            Sink::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(text.as_bytes())?;
                err.flush()
            }
            Sink::File(file) => {
                file.write_all(text.as_bytes())?;
                file.flush()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn new_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.txt");
        let mut sink = Sink::File(open(&path).unwrap());
        sink.write_report("crash\n").unwrap();
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
        let mut sink = Sink::File(open(&path).unwrap());
        sink.write_report("new\n").unwrap();
        let mut again = Sink::File(open(&path).unwrap());
        again.write_report("newer\n").unwrap();
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
}
