//! Developer tasks for rfh-trace: `cargo xtask <setup|build|run|test|bench|examples|dist>`.

mod dist;
mod examples;
mod setup;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::util::{ExitWith, cmd, display, exit_code, is_root, run, status, sudo_runner_args};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for rfh-trace"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check for and install the build prerequisites (nightly, rust-src, bpf-linker).
    Setup {
        /// Also install the tools the tests and benchmarks use
        /// (cc, c++, gdb, eu-stack, bpftool, libc6-dbg, py-spy, pystack, and a
        /// Debian sid chroot with CPython 3.13-3.15).
        #[arg(long)]
        with_test_tools: bool,
    },
    /// Run setup, then build rfh-trace (faulthandler-user).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run setup, build rfh-trace and run it (through `sudo -E` when not root).
    Run(RunArgs),
    /// Run setup (with test tools), build release and run the workspace tests.
    Test {
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- some_test -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup (with test tools), build release and run the `crash`, `dump`, `cost`, `python` and
    /// `agent` benchmarks.
    Bench {
        /// Extra arguments passed to each benchmark (after `cargo bench ... --`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release, run rfh-trace on test programs and write the redacted
    /// report examples to docs/examples/ (rfh-trace runs through `sudo -E`
    /// when not root).
    Examples,
    /// Build release and package the agent in target/dist/: a .deb (binary,
    /// hardened systemd unit, default config) and a container image root
    /// (imported into podman as localhost/rfh-trace:VERSION when present).
    Dist,
}

#[derive(Args)]
struct RunArgs {
    /// Use the release profile (the default).
    #[arg(long, conflicts_with = "debug")]
    release: bool,
    /// Use the debug profile instead of release.
    #[arg(long)]
    debug: bool,
    /// Arguments for rfh-trace (put them after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => match err.downcast_ref::<ExitWith>() {
            Some(ExitWith(code)) => ExitCode::from((*code).clamp(1, 255) as u8),
            None => {
                eprintln!("xtask: error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn dispatch(task: Task) -> Result<i32> {
    match task {
        Task::Setup { with_test_tools } => setup::setup(with_test_tools)?,
        Task::Build { release } => {
            setup::setup(false)?;
            let bin = build(release)?;
            println!("{}", bin.display());
        }
        Task::Run(args) => return run_trace(args),
        Task::Test { args } => test(args)?,
        Task::Bench { args } => bench(args)?,
        Task::Examples => examples::examples()?,
        Task::Dist => {
            setup::setup(false)?;
            let bin = build(true)?;
            let deb = dist::deb(&bin)?;
            println!("{}", deb.display());
            let (tar, image) = dist::image(&bin)?;
            println!("{}", tar.display());
            if let Some(image) = image {
                println!("{image}");
            }
        }
    }
    Ok(0)
}

/// `cargo build [--release] -p faulthandler-user`; returns the binary path.
fn build(release: bool) -> Result<PathBuf> {
    let mut build = cmd("cargo");
    build.args(["build", "-p", "faulthandler-user"]);
    if release {
        build.arg("--release");
    }
    eprintln!("xtask: {}", display(&build));
    run(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    let bin = util::target_dir().join(profile).join("rfh-trace");
    eprintln!("xtask: built {}", bin.display());
    Ok(bin)
}

fn run_trace(args: RunArgs) -> Result<i32> {
    setup::setup(false)?;
    let bin = build(!args.debug)?;
    let mut trace = if is_root() {
        cmd(&bin.to_string_lossy())
    } else {
        eprintln!("xtask: not root: running rfh-trace via `sudo -E`");
        let mut sudo = cmd("sudo");
        sudo.arg("-E").arg(&bin);
        sudo
    };
    // Run in the caller's directory so relative paths in the args work.
    trace.current_dir(std::env::current_dir()?).args(&args.args);
    eprintln!("xtask: {}", display(&trace));
    Ok(exit_code(status(&mut trace)?))
}

fn test(extra: Vec<String>) -> Result<()> {
    setup::setup(true)?;
    build(true)?;
    let mut test = cmd("cargo");
    test.arg("test")
        .args(sudo_runner_args()?)
        .args(["--release", "--workspace", "--exclude", "faulthandler-ebpf"])
        .args(extra);
    eprintln!("xtask: {}", display(&test));
    // cargo's last "test result" line is a crate's empty doc-test run;
    // close with the totals so a reader of the last line sees them.
    let mut child = test.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(word)?
                                .trim()
                                .rsplit(' ')
                                .next()?
                                .parse::<u64>()
                                .ok()
                        })
                        .unwrap_or(0)
                };
                passed += count("passed");
                failed += count("failed");
                ignored += count("ignored");
            }
        }
    }
    let status = child.wait()?;
    println!("total: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        eprintln!("xtask: `{}` failed ({status})", display(&test));
        return Err(ExitWith(exit_code(status)).into());
    }
    Ok(())
}

/// The benchmarks `bench` runs, in this order, one `cargo bench` each.
const BENCHES: [&str; 5] = ["crash", "dump", "cost", "python", "agent"];

fn bench(extra: Vec<String>) -> Result<()> {
    setup::setup(true)?;
    build(true)?;
    let runner = sudo_runner_args()?;
    for name in BENCHES {
        let mut bench = cmd("cargo");
        bench
            .arg("bench")
            .args(&runner)
            .args(["-p", "faulthandler-user", "--bench", name, "--"])
            .args(&extra);
        eprintln!("xtask: {}", display(&bench));
        run(&mut bench)?;
    }
    Ok(())
}
