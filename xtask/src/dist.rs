//! `cargo xtask dist`: a Debian package of the agent (the binary, the
//! hardened systemd unit, a default configuration and the examples),
//! built with dpkg-deb from a staged tree; and a container image made
//! without a registry: a root holding the binary and the shared libraries
//! it loads, as a tarball, imported into podman when podman is there.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::util::{cmd, display, find_program, run, target_dir, workspace_root};

/// The package version: faulthandler-user's.
fn version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("faulthandler-user/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("version")?.trim().strip_prefix('=')?.trim();
            Some(v.trim_matches('"').to_string())
        })
        .context("no version in faulthandler-user/Cargo.toml")
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds target/dist/rfh-trace_VERSION_amd64.deb from the release binary
/// `bin`; returns its path.
pub fn deb(bin: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let version = version(&root)?;
    let dist = target_dir().join("dist");
    let stage = dist.join(format!("rfh-trace_{version}_amd64"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let usr_bin = stage.join("usr/bin/rfh-trace");
    copy(bin, &usr_bin, 0o755)?;
    // The release profile keeps line tables for rfh-trace's own panics;
    // the package ships without them (a third of the size).
    if find_program("objcopy").is_some() {
        run(cmd("objcopy").arg("--strip-debug").arg(&usr_bin))?;
    }
    copy(
        &deploy.join("systemd/rfh-trace.service"),
        &stage.join("usr/lib/systemd/system/rfh-trace.service"),
        0o644,
    )?;
    copy(
        &deploy.join("examples/agent.toml"),
        &stage.join("etc/rfh-trace/agent.toml"),
        0o644,
    )?;
    let doc = stage.join("usr/share/doc/rfh-trace");
    for example in ["agent.toml", "prometheus.yml", "otel-collector.yaml"] {
        copy(
            &deploy.join("examples").join(example),
            &doc.join("examples").join(example),
            0o644,
        )?;
    }
    copy(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &deploy.join("debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    fs::write(debian.join("conffiles"), "/etc/rfh-trace/agent.toml\n")?;
    let size_kib = dir_size(&stage)? / 1024;
    fs::write(
        debian.join("control"),
        format!(
            "Package: rfh-trace\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: rfh-trace developers <rfh-trace@localhost>\n\
             Depends: libc6 (>= 2.34)\n\
             Section: admin\n\
             Priority: optional\n\
             Installed-Size: {size_kib}\n\
             Description: crash reports for any process, from the outside\n \
             rfh-trace captures the user stacks of fatal signals with eBPF and\n \
             unwinds and symbolizes them. This package runs it as a node agent\n \
             (rfh-trace.service): JSON Lines reports in /var/log/rfh-trace,\n \
             Prometheus metrics on 127.0.0.1:9410, optional OTLP export.\n"
        ),
    )?;
    if find_program("dpkg-deb").is_none() {
        bail!("dpkg-deb is missing (Debian package dpkg)");
    }
    let deb = dist.join(format!("rfh-trace_{version}_amd64.deb"));
    let mut build = cmd("dpkg-deb");
    build
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb);
    eprintln!("xtask: {}", display(&build));
    run(&mut build)?;
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

/// Builds target/dist/rfh-trace-image_VERSION.tar (a root file system:
/// /usr/bin/rfh-trace and its libraries) and, with podman, imports it as
/// `localhost/rfh-trace:VERSION`. Returns the tarball and the image name.
pub fn image(bin: &Path) -> Result<(PathBuf, Option<String>)> {
    let root = workspace_root();
    let version = version(&root)?;
    let dist = target_dir().join("dist");
    let stage = dist.join("image-root");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let usr_bin = stage.join("usr/bin/rfh-trace");
    copy(bin, &usr_bin, 0o755)?;
    if find_program("objcopy").is_some() {
        run(cmd("objcopy").arg("--strip-debug").arg(&usr_bin))?;
    }
    let ldd = crate::util::output(cmd("ldd").arg(bin))?;
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let lib = Path::new(lib);
        copy(lib, &stage.join(lib.strip_prefix("/")?), 0o755)?;
    }
    // The socket's directory and a writable /tmp, for a read-only root.
    for dir in ["run/rfh-trace", "tmp"] {
        fs::create_dir_all(stage.join(dir))?;
    }
    let tar = dist.join(format!("rfh-trace-image_{version}.tar"));
    let mut pack = cmd("tar");
    pack.args(["--owner=0", "--group=0", "-C"])
        .arg(&stage)
        .arg("-cf")
        .arg(&tar)
        .arg(".");
    run(&mut pack)?;
    if find_program("podman").is_none() {
        eprintln!("xtask: podman is missing: {} not imported", tar.display());
        return Ok((tar, None));
    }
    let name = format!("localhost/rfh-trace:{version}");
    let mut import = cmd("podman");
    import
        .arg("import")
        .args(["--change", "ENTRYPOINT [\"/usr/bin/rfh-trace\"]"])
        .args(["--change", "CMD [\"agent\", \"--stdout\"]"])
        .arg(&tar)
        .arg(&name);
    eprintln!("xtask: {}", display(&import));
    run(&mut import)?;
    Ok((tar, Some(name)))
}
