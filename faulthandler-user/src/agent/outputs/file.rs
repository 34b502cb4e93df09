//! Full reports as JSON Lines in a file rotated by size: FILE, then
//! FILE.1 (newest) … FILE.N; the oldest goes. Every open goes through
//! `output::open_for`, the project's one safe opener.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
};

use super::{Record, Writer};
use crate::output;

pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<Self, output::OutputError> {
        let file = output::open_for(path, "--file")?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file: Some(file),
            size,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                match std::fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        let file = output::open_for(&self.path, "--file").map_err(io::Error::other)?;
        self.size = 0;
        self.file = Some(file);
        Ok(())
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        if self.file.is_none() {
            // A failed rotation left no file: try again now.
            self.file = Some(output::open_for(&self.path, "--file").map_err(io::Error::other)?);
            self.size = 0;
        }
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no file"))?;
        f.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

impl Writer for RotatingFile {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        let mut line = match rec {
            Record::Report(r) => serde_json::to_vec(&**r),
            Record::Loss(l) => serde_json::to_vec(&**l),
        }
        .map_err(io::Error::other)?;
        line.push(b'\n');
        self.write_line(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reports.jsonl");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        let line = [b'x'; 39];
        for i in 0..10u8 {
            let mut l = line.to_vec();
            l[0] = b'0' + i;
            l.push(b'\n');
            f.write_line(&l).unwrap();
        }
        // 40-byte lines, 100-byte files: two lines each; lines 8, 9 current.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&path).lines().map(|l| &l[..1]).collect::<String>(),
            "89"
        );
        assert_eq!(
            read(&numbered(&path, 1))
                .lines()
                .map(|l| &l[..1])
                .collect::<String>(),
            "67"
        );
        assert_eq!(
            read(&numbered(&path, 2))
                .lines()
                .map(|l| &l[..1])
                .collect::<String>(),
            "45"
        );
        assert!(!numbered(&path, 3).exists(), "only two old files kept");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn keep_zero_truncates_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let mut f = RotatingFile::open(&path, 10, 0).unwrap();
        f.write_line(b"12345678\n").unwrap();
        f.write_line(b"abcdefgh\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abcdefgh\n");
        assert!(!numbered(&path, 1).exists());
    }
}
