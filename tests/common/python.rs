//! The CPython interpreters the Python tests run on, and scripts placed
//! where each can read them.
//!
//! Interpreters: pyenv's (`$PYENV_ROOT` or ~/.pyenv, 3.8+), the system's
//! `/usr/bin/python3.N`, and Debian sid's 3.13–3.15 in the chroot that
//! `cargo xtask setup --with-test-tools` makes (`RFH_TRACE_PYROOT` or
//! /var/cache/rfh-trace/pyroot-sid). Each missing one is skipped with a
//! printed reason; finding none at all is a failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const DEFAULT_PYROOT: &str = "/var/cache/rfh-trace/pyroot-sid";

#[derive(Clone, Debug)]
pub struct Interp {
    pub label: String,
    pub minor: u32,
    /// The program's path as the target sees it.
    pub program: String,
    /// Set for interpreters run inside a chroot.
    pub root: Option<PathBuf>,
}

/// A script written for one interpreter: where the host sees it (for
/// `line_of`) and where the interpreter does.
pub struct Script {
    pub host: PathBuf,
    pub target: String,
    /// The copy inside a chroot, removed with the script.
    in_chroot: bool,
    _dir: tempfile::TempDir,
}

impl Drop for Script {
    fn drop(&mut self) {
        if self.in_chroot {
            let _ = std::fs::remove_file(&self.host);
        }
    }
}

impl Interp {
    /// The command line that runs `args` (the script first) with this
    /// interpreter, chroot included.
    pub fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(root) = &self.root {
            v.push("chroot".to_string());
            v.push(root.to_string_lossy().into_owned());
        }
        v.push(self.program.clone());
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// Writes `text` as `name` where this interpreter can read it.
    pub fn script(&self, name: &str, text: &str) -> Script {
        let dir = tempfile::Builder::new()
            .prefix("rfh-py-")
            .tempdir()
            .expect("tempdir");
        let host = match &self.root {
            None => dir.path().join(name),
            Some(root) => {
                let inside = format!(
                    "tmp/rfh-trace-test-{}-{}-{name}",
                    std::process::id(),
                    self.minor
                );
                root.join(inside)
            }
        };
        std::fs::write(&host, text).expect("write script");
        let target = match &self.root {
            None => host.to_string_lossy().into_owned(),
            Some(root) => format!("/{}", host.strip_prefix(root).unwrap().to_string_lossy()),
        };
        Script {
            host,
            target,
            in_chroot: self.root.is_some(),
            _dir: dir,
        }
    }
}

/// Every interpreter found, printing why each expected one is missing.
pub fn interpreters() -> Vec<Interp> {
    let mut found = Vec::new();
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .map(|p| p.join("versions"));
    let mut minors = Vec::new();
    if let Some(dir) = pyenv.as_ref().and_then(|d| std::fs::read_dir(d).ok()) {
        let mut entries: Vec<_> = dir.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(minor) = name
                .strip_prefix("3.")
                .and_then(|r| r.split('.').next())
                .and_then(|m| m.parse::<u32>().ok())
            else {
                continue;
            };
            let program = e.path().join(format!("bin/python3.{minor}"));
            if minor >= 8 && program.exists() && !minors.contains(&minor) {
                minors.push(minor);
                found.push(Interp {
                    label: format!("pyenv {name}"),
                    minor,
                    program: program.to_string_lossy().into_owned(),
                    root: None,
                });
            }
        }
    }
    for minor in 8..=13 {
        if !minors.contains(&minor) {
            println!("skip pyenv 3.{minor}: not installed under {pyenv:?}");
        }
    }
    for minor in 8..=15 {
        let program = format!("/usr/bin/python3.{minor}");
        if Path::new(&program).exists() {
            found.push(Interp {
                label: format!("system python3.{minor}"),
                minor,
                program,
                root: None,
            });
        }
    }
    let root = std::env::var_os("RFH_TRACE_PYROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYROOT));
    for minor in 13..=15 {
        let program = format!("/usr/bin/python3.{minor}");
        let label = format!("debian sid python3.{minor} (chroot)");
        if root.join(program.trim_start_matches('/')).exists() {
            found.push(Interp {
                label,
                minor,
                program,
                root: Some(root.clone()),
            });
        } else {
            println!(
                "skip {label}: {} has no {program} (run `cargo xtask setup --with-test-tools`)",
                root.display()
            );
        }
    }
    assert!(
        !found.is_empty(),
        "no CPython 3.8+ interpreter found at all"
    );
    found
}

/// pyenv's 3.7, which rfh-trace does not support.
pub fn unsupported() -> Option<Interp> {
    let versions = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))?
        .join("versions");
    let dir = std::fs::read_dir(&versions).ok()?;
    let mut names: Vec<String> = dir
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("3.7."))
        .collect();
    names.sort();
    let name = names.pop()?;
    let program = versions.join(&name).join("bin/python3.7");
    program.exists().then(|| Interp {
        label: format!("pyenv {name}"),
        minor: 7,
        program: program.to_string_lossy().into_owned(),
        root: None,
    })
}

/// faulthandler's own frames of the thread it calls current, from the
/// target's stderr: (file, line, function), innermost first.
pub fn faulthandler_frames(stderr: &str) -> Vec<(String, u32, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in stderr.lines() {
        if l.starts_with("Current thread") {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        let Some(rest) = l.strip_prefix("  File \"") else {
            break;
        };
        let Some((file, rest)) = rest.split_once("\", line ") else {
            break;
        };
        let Some((line, func)) = rest.split_once(" in ") else {
            break;
        };
        out.push((
            file.to_string(),
            line.trim().parse().unwrap_or(0),
            func.to_string(),
        ));
    }
    out
}
