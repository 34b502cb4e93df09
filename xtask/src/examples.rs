//! `cargo xtask examples`: the report examples in docs/examples/, made by
//! running the release rfh-trace on programs from tests/programs/ and
//! redacting what differs between machines and runs (see `redact`), so
//! that running this again gives the same files on any host.
//!
//! Markdown files (README.md, docs/*.md) can show an example inline: the
//! fenced block between `<!-- example: NAME -->` and `<!-- /example -->`
//! is rewritten with docs/examples/NAME.

mod redact;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use regex::{Captures, Regex};

use self::redact::{Format, Redact};
use crate::util::{self, cmd, display, is_root};

/// Compiler flags for every example program, as the tests build them.
const CFLAGS: &[&str] = &["-g", "-O2", "-pthread"];
/// 128 + SIGSEGV: rfh-trace passes on COMMAND's death by signal.
const SEGV_STATUS: i32 = 139;
/// timeout(1)'s status, which `--timeout ... --exit` gives.
const TIMED_OUT: i32 = 124;

/// How an example is made.
enum How {
    /// `rfh-trace ARGS -- PROGRAM`, which must exit with this status.
    Command(&'static [&'static str], i32),
    /// The same, run again (30 times at most) until the report holds each
    /// of these texts: the program races with itself or with rfh-trace's
    /// reads of /proc, and the example shows one outcome.
    CommandUntil(&'static [&'static str], i32, &'static [&'static str]),
    /// `rfh-trace dump PID ARGS` of the running program.
    Dump(&'static [&'static str], Started),
    /// `rfh-trace --on-signal SIGUSR1 --pid PID`, then `kill -USR1 PID`.
    OnSignal,
}

/// docs/examples/NAME, the program from tests/programs, and how.
const EXAMPLES: &[(&str, &str, How)] = &[
    ("crash.txt", "threads.c", How::Command(&[], SEGV_STATUS)),
    (
        "crash.json",
        "threads.c",
        How::Command(&["--format", "json"], SEGV_STATUS),
    ),
    ("reraise.txt", "reraise.c", How::Command(&[], SEGV_STATUS)),
    (
        "null-call.txt",
        "null_call.c",
        How::Command(&[], SEGV_STATUS),
    ),
    (
        "stack-overflow.txt",
        "overflow.c",
        How::Command(&["--max-frames", "6"], SEGV_STATUS),
    ),
    (
        "hostile-names.txt",
        "hostile_name.c",
        // The second thread has reached pause(), and rfh-trace read /proc
        // (with the name main had then) before the crash.
        How::CommandUntil(
            &[],
            SEGV_STATUS,
            &["in __libc_pause", "Process 4242 \"hostile_name\""],
        ),
    ),
    (
        "timeout.txt",
        "busy.c",
        How::Command(&["--timeout", "1s", "--exit"], TIMED_OUT),
    ),
    (
        "dump.txt",
        "deadlock.c",
        How::Dump(&[], Started::Threads(&["ab", "ba"])),
    ),
    (
        "dump.json",
        "deadlock.c",
        How::Dump(&["--format", "json"], Started::Threads(&["ab", "ba"])),
    ),
    (
        "signal-frame.txt",
        "in_handler.c",
        How::Dump(&[], Started::ReadyLine),
    ),
    ("on-signal.txt", "reload.c", How::OnSignal),
];

pub fn examples() -> Result<()> {
    crate::setup::setup(false)?;
    let bin = crate::build(true)?;
    let root = util::workspace_root();
    let work = util::target_dir().join("examples");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let docs = root.join("docs").join("examples");
    fs::create_dir_all(&docs)?;
    let g = Gen {
        bin,
        work: work.clone(),
        redact: Redact::new(&work, &root)?,
    };
    let mut made = Vec::new();
    for &(name, source, ref how) in EXAMPLES {
        let text = match how {
            How::Command(args, status) => g.command(name, source, args, *status)?,
            How::CommandUntil(args, status, wanted) => {
                let mut tries = 0;
                loop {
                    let text = g.command(name, source, args, *status)?;
                    tries += 1;
                    let shown = wanted.iter().all(|w| text.contains(w));
                    ensure!(shown || tries < 30, "{name}: no run showed {wanted:?}");
                    if shown {
                        break text;
                    }
                }
            }
            How::Dump(args, started) => g.dump(name, source, args, started)?,
            How::OnSignal => g.on_signal(name, source)?,
        };
        made.push((name, text));
    }
    for (name, text) in &made {
        let path = docs.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("examples: wrote {}", path.display());
    }
    let mut pages = vec![root.join("README.md")];
    if let Ok(dir) = fs::read_dir(root.join("docs")) {
        pages.extend(
            dir.filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "md")),
        );
    }
    pages.sort();
    for page in pages {
        embed(&page, &made)?;
    }
    Ok(())
}

/// How a program says it is ready to be dumped.
enum Started {
    /// It prints "ready" on stdout.
    ReadyLine,
    /// Threads with these names exist (and have had a moment to block).
    Threads(&'static [&'static str]),
}

struct Gen {
    bin: PathBuf,
    work: PathBuf,
    redact: Redact,
}

impl Gen {
    /// Compiles tests/programs/`source` into the work directory.
    fn compile(&self, source: &str) -> Result<PathBuf> {
        let src = util::workspace_root()
            .join("tests")
            .join("programs")
            .join(source);
        let stem = Path::new(source)
            .file_stem()
            .and_then(|s| s.to_str())
            .context("program name")?;
        let exe = self.work.join(stem);
        let mut cc = cmd("cc");
        cc.args(CFLAGS).arg(&src).arg("-o").arg(&exe);
        util::output(&mut cc)?;
        Ok(exe)
    }

    /// rfh-trace itself, through `sudo -E` when not root (as
    /// `cargo xtask run` does): COMMAND then runs as the invoking user.
    fn rfh(&self) -> Command {
        let mut c = if is_root() {
            cmd(&self.bin.to_string_lossy())
        } else {
            let mut sudo = cmd("sudo");
            sudo.arg("-E").arg(&self.bin);
            sudo
        };
        c.current_dir(&self.work).env("NO_COLOR", "1");
        c
    }

    fn format_of(name: &str) -> Format {
        if name.ends_with(".json") {
            Format::Json
        } else {
            Format::Text
        }
    }

    /// `rfh-trace ARGS --output FILE -- PROGRAM`, expecting `status`.
    fn command(&self, name: &str, source: &str, args: &[&str], status: i32) -> Result<String> {
        let exe = self.compile(source)?;
        let out = self.work.join(format!("{name}.out"));
        // rfh-trace appends; a rerun must start from nothing.
        remove(&out)?;
        let mut c = self.rfh();
        c.args(args).arg("--output").arg(&out).arg("--").arg(&exe);
        let run = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", display(&c)))?;
        ensure!(
            run.status.code() == Some(status),
            "`{}` exited with {} instead of {status}: {}",
            display(&c),
            run.status,
            String::from_utf8_lossy(&run.stderr).trim()
        );
        let raw = fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        let text = self.redact.report(&raw, Self::format_of(name))?;
        // A timeout dump catches a busy thread at whichever instruction of
        // its loop it was running.
        let text = if args.contains(&"--timeout") {
            self.redact.innermost_offsets(&text)
        } else {
            text
        };
        Ok(text)
    }

    /// `rfh-trace dump PID` of a program started here, once it is ready.
    fn dump(&self, name: &str, source: &str, args: &[&str], started: &Started) -> Result<String> {
        let exe = self.compile(source)?;
        let mut program = Running(
            Command::new(&exe)
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?,
        );
        let pid = program.0.id();
        match started {
            Started::ReadyLine => {
                let line = first_line(program.0.stdout.take())?;
                ensure!(line == "ready", "{source} printed {line:?}, not \"ready\"");
            }
            Started::Threads(names) => wait_for_threads(pid, names)?,
        }
        let mut c = self.rfh();
        c.arg("dump").arg(pid.to_string()).args(args);
        let run = c
            .output()
            .with_context(|| format!("running {}", display(&c)))?;
        ensure!(
            run.status.success(),
            "`{}` failed ({}): {}",
            display(&c),
            run.status,
            String::from_utf8_lossy(&run.stderr).trim()
        );
        drop(program);
        let raw = String::from_utf8_lossy(&run.stdout);
        self.redact.report(&raw, Self::format_of(name))
    }

    /// `rfh-trace --on-signal SIGUSR1 --pid PID`, then SIGUSR1 to PID.
    fn on_signal(&self, name: &str, source: &str) -> Result<String> {
        let exe = self.compile(source)?;
        let mut program = Running(
            Command::new(&exe)
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?,
        );
        let pid = program.0.id();
        let mut lines = BufReader::new(program.0.stdout.take().context("program stdout")?).lines();
        let mut next_line =
            || -> Result<String> { Ok(lines.next().context("the program closed its stdout")??) };
        ensure!(next_line()? == "ready", "{source} did not print \"ready\"");
        let out = self.work.join(format!("{name}.out"));
        remove(&out)?;
        let mut c = self.rfh();
        // Reports go to the file; stdout carries only READY=1 (sudo passes
        // on descriptors 0-2 alone).
        c.args(["--on-signal", "SIGUSR1", "--ready-fd", "1", "--output"])
            .arg(&out)
            .args(["--pid", &pid.to_string()])
            .stdout(Stdio::piped());
        let mut tracer = Running(
            c.spawn()
                .with_context(|| format!("running {}", display(&c)))?,
        );
        let mut ready = [0u8; 8];
        tracer
            .0
            .stdout
            .take()
            .context("rfh-trace stdout")?
            .read_exact(&mut ready)
            .context("rfh-trace exited before it was ready")?;
        ensure!(&ready == b"READY=1\n", "rfh-trace wrote {ready:?}");
        util::output(Command::new("kill").args(["-USR1", &pid.to_string()]))?;
        ensure!(next_line()? == "reloaded 1", "{source} did not reload");
        wait_until(Duration::from_secs(20), || {
            fs::metadata(&out).is_ok_and(|m| m.len() > 0)
        })
        .context("no report was written")?;
        // The watched process ends; then so does rfh-trace, with status 0.
        drop(program);
        let status = tracer.0.wait()?;
        ensure!(status.success(), "`{}` exited with {status}", display(&c));
        let raw = fs::read_to_string(&out)?;
        self.redact.report(&raw, Format::Text)
    }
}

/// A child that is killed and reaped when dropped, whatever happened.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn first_line(stdout: Option<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    BufReader::new(stdout.context("program stdout")?).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + limit;
    while !done() {
        if Instant::now() > end {
            bail!("gave up after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits for threads named `names` in process `pid`, then a little more,
/// so that they have reached the point where they block.
fn wait_for_threads(pid: u32, names: &[&str]) -> Result<()> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    wait_until(Duration::from_secs(20), || {
        let comms: Vec<String> = fs::read_dir(&task)
            .into_iter()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        names.iter().all(|n| comms.iter().any(|c| c == n))
    })
    .with_context(|| format!("waiting for threads {names:?} of pid {pid}"))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Rewrites the fenced block after each `<!-- example: NAME -->` in `page`
/// with the example of that name.
fn embed(page: &Path, made: &[(&str, String)]) -> Result<()> {
    let Ok(text) = fs::read_to_string(page) else {
        return Ok(());
    };
    let block = Regex::new(r"(?s)<!-- example: (\S+) -->\n```(\w*)\n.*?```\n<!-- /example -->")?;
    let mut missing = Vec::new();
    let new = block.replace_all(&text, |c: &Captures| {
        match made.iter().find(|(n, _)| *n == &c[1]) {
            Some((name, body)) => format!(
                "<!-- example: {name} -->\n```{}\n{body}```\n<!-- /example -->",
                &c[2]
            ),
            None => {
                missing.push(c[1].to_string());
                c[0].to_string()
            }
        }
    });
    ensure!(
        missing.is_empty(),
        "{} shows examples that are not generated: {missing:?}",
        page.display()
    );
    if new != text {
        fs::write(page, new.as_bytes())?;
        eprintln!("examples: updated {}", page.display());
    }
    Ok(())
}
