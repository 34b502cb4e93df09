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
