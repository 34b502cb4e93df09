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
    // The agent's tests: Prometheus scrapes it; setpriv runs it with
    // capabilities only; ip builds the simulated cluster's namespaces.
    ("prometheus", "prometheus"),
    ("setpriv", "util-linux"),
    ("ip", "iproute2"),
    // A real container for the agent's identity test.
    ("podman", "podman"),
    ("runc", "runc"),
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
        python_root(&mut apt)?;
        python_tools()?;
        otlp_collector()?;
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

/// The Debian sid chroot holding the CPython builds the host lacks (3.13
/// to 3.15, as Debian builds them: static, non-PIE). The Python tests read
/// `RFH_TRACE_PYROOT`, else this path.
const PYROOT: &str = "/var/cache/rfh-trace/pyroot-sid";

/// What the chroot gets: the interpreters, and their -dbg packages, whose
/// debug info names the eval loop's split-off parts
/// (`_PyEval_EvalFrameDefault.cold`) for the tests' native cross-checks.
const PYROOT_PACKAGES: &[&str] = &[
    "python3.13",
    "python3.14",
    "python3.15",
    "python3.13-dbg",
    "python3.14-dbg",
    "python3.15-dbg",
];

/// The sid mirror's Release file may be past its Valid-Until date.
const APT_NO_VALID_UNTIL: &str = "Acquire::Check-Valid-Until=false";

fn pyroot_path() -> std::path::PathBuf {
    std::env::var_os("RFH_TRACE_PYROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| PYROOT.into())
}

/// Creates the sid chroot with `PYROOT_PACKAGES` when missing.
fn python_root(apt: &mut Apt) -> Result<()> {
    let root = pyroot_path();
    let root_s = root.to_string_lossy().into_owned();
    let installed = |p: &str| {
        root.join("usr/bin/dpkg-query").exists()
            && output(cmd("chroot").args([root_s.as_str(), "dpkg-query", "-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
    };
    let missing: Vec<&str> = PYROOT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: python 3.13-3.15 chroot ... ok ({root_s})");
        return Ok(());
    }
    eprintln!(
        "setup: python 3.13-3.15 chroot ... missing {} ({root_s})",
        missing.join(", ")
    );
    if !is_debian() || !is_root() {
        bail!(
            "the Python 3.13-3.15 test interpreters are missing; as root on Debian run:\n    \
             debootstrap --variant=minbase sid {root_s}\n    \
             chroot {root_s} apt-get -o {APT_NO_VALID_UNTIL} update\n    \
             chroot {root_s} apt-get -o {APT_NO_VALID_UNTIL} install -y --no-install-recommends {}",
            PYROOT_PACKAGES.join(" ")
        );
    }
    if !root.join("usr/bin/apt-get").exists() {
        if find_program("debootstrap").is_none() {
            apt.install("debootstrap", &["debootstrap".to_string()])?;
        }
        std::fs::create_dir_all(&root)?;
        let mut boot = cmd("debootstrap");
        boot.args(["--variant=minbase", "sid", root_s.as_str()]);
        eprintln!(
            "setup: creating a Debian sid chroot (~100 MB): {}",
            display(&boot)
        );
        run(&mut boot)?;
    }
    let mut update = cmd("chroot");
    update.args([
        root_s.as_str(),
        "apt-get",
        "-o",
        APT_NO_VALID_UNTIL,
        "update",
    ]);
    eprintln!("setup: {}", display(&update));
    run(&mut update)?;
    let mut install = cmd("chroot");
    install
        .args([
            root_s.as_str(),
            "apt-get",
            "-o",
            APT_NO_VALID_UNTIL,
            "install",
            "-y",
        ])
        .arg("--no-install-recommends")
        .args(PYROOT_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive");
    eprintln!(
        "setup: installing CPython 3.13-3.15 and their debug info in the chroot (~300 MB to download, ~1 GB on disk): {}",
        display(&install)
    );
    run(&mut install)?;
    // The downloaded .debs are not needed any more.
    let _ = run(cmd("chroot").args([root_s.as_str(), "apt-get", "clean"]));
    if let Some(p) = PYROOT_PACKAGES.iter().find(|p| !installed(p)) {
        bail!("{p} is still missing from {root_s} after installing it");
    }
    Ok(())
}

/// A virtualenv for the Python tools the tests compare against (Debian's
/// system Python refuses `pip install` outside one).
const PY_TOOLS_VENV: &str = "/var/cache/rfh-trace/pytools";

/// (program, PyPI package) the tests and benchmarks compare against.
const PIP_TOOLS: &[(&str, &str)] = &[
    ("py-spy", "py-spy"),
    ("pystack", "pystack"),
    // The agent's tests validate the Kubernetes manifests offline.
    ("kubernetes-validate", "kubernetes-validate"),
];

/// The rotel OTLP collector (PyPI `rotel`) for the agent's tests, in
/// `PY_TOOLS_VENV`: it ships its collector binary inside the package, not
/// on PATH, so its presence is an import of the package.
fn otlp_collector() -> Result<()> {
    let python = Path::new(PY_TOOLS_VENV).join("bin/python3");
    let has = |p: &Path| {
        cmd(&p.to_string_lossy())
            .args(["-c", "import rotel"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&python) {
        eprintln!("setup: rotel ... ok (in {PY_TOOLS_VENV})");
        return Ok(());
    }
    if !is_root() {
        bail!("the rotel collector is missing; run as root `cargo xtask setup --with-test-tools`");
    }
    let mut pip = cmd(&Path::new(PY_TOOLS_VENV).join("bin/pip").to_string_lossy());
    pip.args(["install", "--disable-pip-version-check", "rotel"]);
    eprintln!("setup: installing rotel: {}", display(&pip));
    run(&mut pip)?;
    if !has(&python) {
        bail!("rotel is still missing after installing it");
    }
    Ok(())
}

/// Installs py-spy and pystack into `PY_TOOLS_VENV`, linked into
/// /usr/local/bin, when missing from `PATH`.
fn python_tools() -> Result<()> {
    let missing: Vec<(&str, &str)> = PIP_TOOLS
        .iter()
        .copied()
        .filter(|(program, _)| match find_program(program) {
            Some(path) => {
                eprintln!("setup: {program} ... ok ({})", path.display());
                false
            }
            None => {
                eprintln!("setup: {program} ... missing");
                true
            }
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    if !is_root() {
        bail!(
            "{} missing; run as root `cargo xtask setup --with-test-tools`, or `pip install {}`",
            packages.join(", "),
            packages.join(" ")
        );
    }
    let venv = Path::new(PY_TOOLS_VENV);
    if !venv.join("bin/pip").exists() {
        // The system interpreter: pyenv's shims may come first on PATH.
        let python = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|p| Path::new(p).exists() || find_program(p).is_some())
            .unwrap_or("python3");
        let mut create = cmd(python);
        create.args(["-m", "venv", PY_TOOLS_VENV]);
        eprintln!("setup: {}", display(&create));
        if run(&mut create).is_err() && is_debian() {
            // Debian splits venv (and its bundled pip) out of python3.
            Apt::default().install("python3-venv", &["python3-venv".to_string()])?;
            run(&mut create)?;
        }
    }
    let mut pip = cmd(&venv.join("bin/pip").to_string_lossy());
    pip.args(["install", "--disable-pip-version-check"])
        .args(&packages);
    eprintln!(
        "setup: installing {}: {}",
        packages.join(", "),
        display(&pip)
    );
    run(&mut pip)?;
    for (program, _) in missing {
        let link = Path::new("/usr/local/bin").join(program);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(venv.join("bin").join(program), &link)?;
        match find_program(program) {
            Some(path) => eprintln!("setup: {program} ... ok ({})", path.display()),
            None => bail!("{program} is still missing after installing it"),
        }
    }
    Ok(())
}
