//! Small helpers shared by the xtask subcommands: locating the workspace,
//! building child commands with a sane `PATH`, running them and reporting
//! their exit status.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// Error carrying the exit code `main` should exit with, without printing
/// anything more (the child process already reported its own failure).
#[derive(Debug)]
pub struct ExitWith(pub i32);

impl fmt::Display for ExitWith {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// Workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// The current `PATH` with the cargo bin directory prepended if missing, so
/// that freshly installed tools (bpf-linker) are found by child processes.
pub fn path_env() -> OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.insert(0, bin);
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// Finds `name` as an executable in `PATH`, the cargo bin directory, or the
/// sbin directories (which are often missing from a non-root `PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = path_env();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command running in the workspace root with the augmented `PATH`.
pub fn cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).env("PATH", path_env());
    cmd
}

/// Human-readable rendering of a command line (env overrides except `PATH`,
/// program and arguments), for logging.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            parts.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// Shell-quotes `s` if it contains anything beyond a safe character set.
pub fn quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Exit code for a finished child: its code, or 128+N when killed by signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(1)
}

/// Runs `cmd` (inheriting stdio) and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))
}

/// Runs `cmd` (inheriting stdio); a non-zero exit becomes `ExitWith`.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        eprintln!("xtask: `{}` failed ({status})", display(cmd));
        return Err(ExitWith(exit_code(status)).into());
    }
    Ok(())
}

/// Runs `cmd` capturing stdout; fails on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the effective user id is 0.
pub fn is_root() -> bool {
    // Field 2 of the `Uid:` line in /proc/self/status is the effective uid.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
        && let Some(euid) = line.split_whitespace().nth(2)
    {
        return euid == "0";
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The host target triple (`rustc -vV`).
pub fn host_triple() -> Result<String> {
    let out = output(cmd("rustc").arg("-vV"))?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("`rustc -vV` printed no host triple")
}

/// When not root, extra cargo arguments that make `cargo test`/`cargo bench`
/// run the compiled test binaries through `sudo -E` (building stays
/// unprivileged, so `target/` keeps its owner). Empty when already root.
/// SUDO_UID/SUDO_GID are dropped: rfh-trace would act for the developer
/// (run COMMAND and open --output as them), which tests set up explicitly
/// where they test it.
pub fn sudo_runner_args() -> Result<Vec<String>> {
    if is_root() {
        return Ok(Vec::new());
    }
    if find_program("sudo").is_none() {
        bail!(
            "the integration tests need root and `sudo` is not installed; \
             run this command as root instead"
        );
    }
    let triple = host_triple()?;
    let path = path_env();
    let path = path
        .to_string_lossy()
        .replace('\\', r"\\")
        .replace('"', "\\\"");
    eprintln!("xtask: not root: test binaries will run via `sudo -E`");
    Ok(vec![
        "--config".into(),
        format!(
            "target.{triple}.runner = [\"sudo\", \"-E\", \"env\", \"-u\", \"SUDO_UID\", \"-u\", \"SUDO_GID\", \"PATH={path}\"]"
        ),
    ])
}
