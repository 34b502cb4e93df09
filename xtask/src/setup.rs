//! `cargo xtask setup`: idempotently checks for (and installs) the toolchain
//! pieces needed to build the eBPF program, and optionally the tools the
//! tests and benchmarks use.

use std::path::Path;

use anyhow::{Result, bail};

use crate::util::{cmd, display, find_program, is_root, output, quote, run};

/// LLVM major version bpf-linker is built against.
const LLVM_VERSION: u32 = 22;

/// Tools used by the tests and benchmarks: (program, Debian package).
const TEST_TOOLS: &[(&str, &str)] = &[
    ("cc", "gcc"),
    ("c++", "g++"),
    ("gdb", "gdb"),
    ("eu-stack", "elfutils"),
    ("bpftool", "bpftool"),
];

/// glibc's separate debug info (Debian package): the integration tests
/// expect libc frames to have file:line.
const LIBC_DEBUG: &str = "libc6-dbg";

/// Whether glibc's debug info is installed: by dpkg on Debian, elsewhere
/// by the presence of the build-id debug tree that holds it.
fn libc_debug_present() -> bool {
    if is_debian() {
        dpkg_installed(&[LIBC_DEBUG.to_string()])
    } else {
        Path::new("/usr/lib/debug/.build-id").is_dir()
    }
}

fn llvm_prefix() -> String {
    format!("/usr/lib/llvm-{LLVM_VERSION}")
}

fn llvm_packages() -> Vec<String> {
    vec![
        format!("llvm-{LLVM_VERSION}-dev"),
        format!("libpolly-{LLVM_VERSION}-dev"),
        "libzstd-dev".into(),
        "zlib1g-dev".into(),
    ]
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

/// apt-get wrapper that runs `apt-get update` at most once per xtask run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, what: &str, packages: &[String]) -> Result<()> {
        if !self.updated {
            let mut update = cmd("apt-get");
            update.arg("update");
            eprintln!("setup: {}", display(&update));
            run(&mut update)?;
            self.updated = true;
        }
        let mut install = cmd("apt-get");
        install
            .args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("setup: installing {what}: {}", display(&install));
        run(&mut install)
    }
}

/// Whether every Debian package in `packages` is installed.
fn dpkg_installed(packages: &[String]) -> bool {
    packages.iter().all(|p| {
        output(cmd("dpkg-query").args(["-W", "-f=${Status}", p]))
            .map(|s| s.contains("install ok installed"))
            .unwrap_or(false)
    })
}

pub fn setup(with_test_tools: bool) -> Result<()> {
    let mut apt = Apt::default();
    nightly()?;
    rust_src()?;
    bpf_linker(&mut apt)?;
    if with_test_tools {
        test_tools(&mut apt)?;
    }
    eprintln!("setup: done");
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = output(cmd("rustup").args(["toolchain", "list"]))?;
    let has_nightly = toolchains
        .lines()
        .any(|l| l.trim() == "nightly" || (l.starts_with("nightly-") && !is_dated(l)));
    if has_nightly {
        eprintln!("setup: nightly toolchain ... ok");
        return Ok(());
    }
    let mut install = cmd("rustup");
    install.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
    eprintln!("setup: installing nightly toolchain: {}", display(&install));
    run(&mut install)
}

/// `nightly-2025-01-01-x86_64-...` is a pinned toolchain, not `nightly`.
fn is_dated(line: &str) -> bool {
    let rest = &line["nightly-".len()..];
    rest.len() >= 10 && rest.as_bytes()[..4].iter().all(u8::is_ascii_digit)
}

fn rust_src() -> Result<()> {
    let components =
        output(cmd("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if components
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        eprintln!("setup: rust-src (nightly) ... ok");
        return Ok(());
    }
    let mut add = cmd("rustup");
    add.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    eprintln!("setup: installing rust-src (nightly): {}", display(&add));
    run(&mut add)
}

fn bpf_linker_install_cmd() -> std::process::Command {
    let mut install = cmd("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{LLVM_VERSION}"))
        .env("LLVM_PREFIX", llvm_prefix());
    install
}

fn bpf_linker(apt: &mut Apt) -> Result<()> {
    if let Some(path) = find_program("bpf-linker") {
        eprintln!("setup: bpf-linker ... ok ({})", path.display());
        return Ok(());
    }
    eprintln!("setup: bpf-linker ... missing");
    let packages = llvm_packages();
    let mut install = bpf_linker_install_cmd();
    if !is_debian() {
        bail!(
            "bpf-linker is not installed and this is not a Debian system; install the \
             LLVM {LLVM_VERSION} development files (libLLVM, Polly, zstd, zlib headers) \
             with your package manager, then run:\n    {}\n(set LLVM_PREFIX to your \
             LLVM {LLVM_VERSION} install prefix)",
            display(&install)
        );
    }
    if !dpkg_installed(&packages) {
        if !is_root() {
            bail!(
                "bpf-linker is not installed and installing its LLVM dependencies needs \
                 root; run:\n    sudo apt-get update\n    sudo apt-get install -y {}\n    {}\n\
                 then re-run `cargo xtask setup`",
                packages.join(" "),
                display(&install)
            );
        }
        apt.install(&format!("LLVM {LLVM_VERSION} for bpf-linker"), &packages)?;
    } else {
        eprintln!("setup: LLVM {LLVM_VERSION} packages ... ok");
    }
    eprintln!("setup: installing bpf-linker: {}", display(&install));
    run(&mut install)?;
    match find_program("bpf-linker") {
        Some(path) => eprintln!("setup: bpf-linker ... ok ({})", path.display()),
        None => bail!("`cargo install bpf-linker` succeeded but bpf-linker is not on PATH"),
    }
    Ok(())
}

fn test_tools(apt: &mut Apt) -> Result<()> {
    let mut missing = Vec::new();
    for &(program, package) in TEST_TOOLS {
        match find_program(program) {
            Some(path) => eprintln!("setup: {program} ... ok ({})", path.display()),
            None => {
                eprintln!("setup: {program} ... missing (package {package})");
                if !missing.contains(&package.to_string()) {
                    missing.push(package.to_string());
                }
            }
        }
    }
    if libc_debug_present() {
        eprintln!("setup: {LIBC_DEBUG} ... ok (glibc debug info)");
    } else {
        eprintln!("setup: {LIBC_DEBUG} ... missing (glibc debug info, package {LIBC_DEBUG})");
        missing.push(LIBC_DEBUG.to_string());
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_debian() || !is_root() {
        let why = if is_debian() {
            "installing them needs root"
        } else {
            "this is not a Debian system"
        };
        bail!(
            "test tools are missing and {why}; install the packages {} \
             (Debian: `sudo apt-get install -y {}`), then re-run",
            missing.join(", "),
            missing
                .iter()
                .map(|p| quote(p))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    apt.install(&format!("test tools ({})", missing.join(", ")), &missing)?;
    for &(program, package) in TEST_TOOLS {
        if find_program(program).is_none() {
            bail!("`{program}` is still missing after installing package {package}");
        }
    }
    if !libc_debug_present() {
        bail!("package {LIBC_DEBUG} is still missing after installing it");
    }
    Ok(())
}
