//! Which container a process runs in, from its cgroup path.

/// The container id in a cgroup v2 path, from the usual runtime scopes
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`) and cgroupfs's `/docker/<id>`.
pub fn container_id(cgroup: &str) -> Option<String> {
    let is_id = |s: &str| s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup
        .rsplit('/')
        .find_map(|part| {
            let scoped = part.strip_suffix(".scope").and_then(|p| {
                ["docker-", "cri-containerd-", "crio-", "libpod-"]
                    .iter()
                    .find_map(|pre| p.strip_prefix(pre))
            });
            match scoped {
                Some(id) if is_id(id) => Some(id.to_string()),
                _ => None,
            }
        })
        .or_else(|| {
            let mut parts = cgroup.split('/').peekable();
            while let Some(p) = parts.next() {
                if p == "docker"
                    && let Some(id) = parts.peek().filter(|id| is_id(id))
                {
                    return Some(id.to_string());
                }
            }
            None
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_real_cgroup_paths() {
        let id = "3f4c0b8e9a1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b";
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some(id)
        );
        assert_eq!(
            container_id(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{id}.scope")).as_deref(),
            Some(id)
        );
        assert_eq!(
            container_id(&format!(
                "/kubepods.slice/kubepods-pod9.slice/crio-{id}.scope"
            ))
            .as_deref(),
            Some(id)
        );
        assert_eq!(container_id(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope/container")).as_deref(), Some(id));
        assert_eq!(container_id(&format!("/docker/{id}")).as_deref(), Some(id));
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }
}

/// The cgroup v2 path (as /proc/PID/cgroup writes it) of cgroup `id`, the
/// kernel's id of a process that may be gone by now: cgroupfs hands out
/// file handles that are the id itself (`FILEID_KERNFS`), so the directory
/// opens by handle and its path reads back from /proc/self/fd. Needs
/// CAP_DAC_READ_SEARCH; None when the cgroup is gone too, or for id 0.
pub fn cgroup_path_by_id(id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const FILEID_KERNFS: i32 = 0xfe;
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    if id == 0 {
        return None;
    }
    let root = cgroup2_root()?;
    let dir = std::fs::File::open(&root).ok()?;
    let mut h = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `h` has the layout of a `struct file_handle` with 8 bytes of
    // f_handle; the descriptor returned is owned below.
    let fd = unsafe {
        libc::open_by_handle_at(
            dir.as_raw_fd(),
            (&raw mut h).cast::<libc::file_handle>(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned to us, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let rel = path.strip_prefix(&root).ok()?;
    Some(format!("/{}", rel.display()))
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified
/// on a hybrid (v1 + v2) host.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

#[cfg(test)]
mod by_id_tests {
    #[test]
    fn own_cgroup_resolves_from_its_id() {
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        let root = super::cgroup2_root().expect("cgroup2 mounted");
        let dir = root.join(own.trim_start_matches('/'));
        let id = std::fs::metadata(&dir).unwrap().ino();
        // Root here, and in the test suite: open_by_handle_at needs
        // CAP_DAC_READ_SEARCH, so without it there is nothing to check.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(super::cgroup_path_by_id(id).as_deref(), Some(own.as_str()));
        }
        assert_eq!(super::cgroup_path_by_id(0), None);
    }
}
