//! Who a crashed process was, without the API server (so no RBAC): the
//! node from `NODE_NAME`, the container id and pod UID from its cgroup
//! path, and the namespace, pod and container names from the kubelet's
//! log directories (`/var/log/pods/<namespace>_<pod>_<uid>/<container>/`,
//! and `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`,
//! whose names tie a container id to its container name).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::report::K8s;

/// What a cgroup path says about its process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    pub container_id: Option<String>,
    /// With dashes, as the API and /var/log/pods spell it.
    pub pod_uid: Option<String>,
}

fn is_hex_id(s: &str) -> bool {
    s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as it appears in a cgroup name: `pod<uid>` with dashes
/// (cgroupfs) or underscores (systemd, which reserves `-`).
fn pod_uid_of(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    // systemd: kubepods-burstable-pod<uid>.slice, kubepods-pod<uid>.slice
    let tail = part
        .rsplit_once("-pod")
        .map(|(_, t)| t)
        .or_else(|| part.strip_prefix("pod"))?;
    let uid = tail.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// The container id in one cgroup path component, from the runtimes'
/// systemd scopes (`docker-`, `cri-containerd-`, `crio-`, `libpod-`) or a
/// bare id (cgroupfs layouts: `/docker/<id>`, `/kubepods/…/pod<uid>/<id>`).
fn container_of(part: &str) -> Option<String> {
    let (name, scope) = match part.strip_suffix(".scope") {
        Some(n) => (n, true),
        None => (part, false),
    };
    // crio-conmon-<id>.scope is the monitor, not the container.
    if name.starts_with("crio-conmon-") || name.starts_with("libpod-conmon-") {
        return None;
    }
    let id = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|pre| name.strip_prefix(pre));
    match id {
        // A scope names its unit: a short id is still an id.
        Some(id) if scope && is_hex_id(id) => Some(id.to_string()),
        // Without the scope suffix (podman's cgroupfs `libpod-<id>`), or
        // bare (`/docker/<id>`, `/kubepods/…/pod<uid>/<id>`): a full id only.
        Some(id) if id.len() == 64 && is_hex_id(id) => Some(id.to_string()),
        None if !scope && name.len() == 64 && is_hex_id(name) => Some(name.to_string()),
        _ => None,
    }
}

/// Container id and pod UID from a cgroup v2 path (`/proc/PID/cgroup`'s
/// `0::` line). The innermost container component wins (podman nests a
/// `container` cgroup inside its scope; a pod's sandbox has its own).
pub fn from_cgroup(cgroup: &str) -> CgroupIdentity {
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    CgroupIdentity {
        container_id: parts.iter().rev().find_map(|p| container_of(p)),
        pod_uid: parts.iter().rev().find_map(|p| pod_uid_of(p)),
    }
}

/// Names of one pod, read from its log directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PodNames {
    namespace: String,
    pod: String,
    /// Container names (subdirectories of the pod's log directory).
    containers: Vec<String>,
}

/// Looks pods up in the kubelet's log directories, with a small cache
/// (a storm of crashes in one pod reads the directory once a minute).
pub struct Pods {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    cache: HashMap<String, (Instant, Option<PodNames>)>,
}

const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 1024;

impl Pods {
    /// `pods_dir` is /var/log/pods (or a test's tree); the container
    /// symlinks are looked for in its sibling `containers`.
    pub fn new(pods_dir: &Path) -> Self {
        let containers_dir = pods_dir.parent().map_or_else(
            || PathBuf::from("/var/log/containers"),
            |p| p.join("containers"),
        );
        Self {
            pods_dir: pods_dir.to_path_buf(),
            containers_dir,
            cache: HashMap::new(),
        }
    }

    /// The Kubernetes identity of a process in pod `uid`, in container
    /// `container_id` when known. None when the pod has no log directory
    /// (not a Kubernetes pod, or not on this node).
    pub fn k8s(&mut self, uid: &str, container_id: Option<&str>, now: Instant) -> Option<K8s> {
        let fresh = self
            .cache
            .get(uid)
            .is_some_and(|(t, _)| now.duration_since(*t) < CACHE_TTL);
        if !fresh {
            if self.cache.len() >= CACHE_MAX {
                self.cache
                    .retain(|_, (t, _)| now.duration_since(*t) < CACHE_TTL);
                if self.cache.len() >= CACHE_MAX {
                    self.cache.clear();
                }
            }
            let names = self.read_pod(uid);
            self.cache.insert(uid.to_string(), (now, names));
        }
        let names = self.cache.get(uid)?.1.clone()?;
        let container = container_id
            .and_then(|id| self.container_name(&names, id))
            .or_else(|| match names.containers.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            });
        Some(K8s {
            namespace: Some(names.namespace),
            pod: Some(names.pod),
            pod_uid: Some(uid.to_string()),
            container,
        })
    }

    fn read_pod(&self, uid: &str) -> Option<PodNames> {
        let dir = std::fs::read_dir(&self.pods_dir).ok()?;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((namespace, pod, entry_uid)) = split_pod_dir(&name) else {
                continue;
            };
            if entry_uid != uid {
                continue;
            }
            let mut containers: Vec<String> = std::fs::read_dir(entry.path())
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            containers.sort();
            return Some(PodNames {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                containers,
            });
        }
        None
    }

    /// `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`.
    fn container_name(&self, names: &PodNames, id: &str) -> Option<String> {
        let prefix = format!("{}_{}_", names.pod, names.namespace);
        let suffix = format!("-{id}.log");
        let dir = std::fs::read_dir(&self.containers_dir).ok()?;
        dir.flatten().find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let c = n.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            Some(c.to_string())
        })
    }
}

/// `<namespace>_<pod>_<uid>`: neither a namespace nor a pod name can hold
/// `_` (DNS-1123), so the split is exact.
fn split_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut it = name.splitn(3, '_');
    let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
    (!ns.is_empty() && !pod.is_empty() && !uid.contains('_')).then_some((ns, pod, uid))
}

/// `NODE_NAME` (or the configured name), else the host name.
pub fn node_name(configured: Option<&str>) -> String {
    configured
        .map(str::to_string)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(crate::watch::host_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4c0b8e9a1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b";
    const UID: &str = "0d7a9e3c-51b2-4c8e-9f6a-2b1d3e4f5a6b";

    fn id(path: &str) -> CgroupIdentity {
        from_cgroup(path)
    }

    #[test]
    fn kubernetes_systemd_layouts() {
        let uid_ = UID.replace('-', "_");
        // containerd, burstable QoS.
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
        // CRI-O, guaranteed QoS (no QoS slice); conmon is not the container.
        let p = format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope");
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
        let p = format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope");
        assert_eq!(id(&p).container_id, None);
        // kind / k3s style: kubelet under its own slice.
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
    }

    #[test]
    fn kubernetes_cgroupfs_layouts() {
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
        let p = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
        // The pod's own cgroup (no container yet).
        let p = format!("/kubepods/besteffort/pod{UID}");
        assert_eq!(id(&p).container_id, None);
        assert_eq!(id(&p).pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn docker_and_podman_layouts() {
        let p = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(
            id(&p),
            CgroupIdentity {
                container_id: Some(ID.into()),
                pod_uid: None
            }
        );
        assert_eq!(
            id(&format!("/docker/{ID}")).container_id.as_deref(),
            Some(ID)
        );
        // Rootless podman nests the payload in `container`.
        let p = format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        );
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        let p = format!("/machine.slice/libpod-{ID}.scope");
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        let p = format!("/machine.slice/libpod-conmon-{ID}.scope");
        assert_eq!(id(&p).container_id, None);
        // podman with the cgroupfs manager.
        let p = format!("/libpod_parent/libpod-{ID}");
        assert_eq!(id(&p).container_id.as_deref(), Some(ID));
        assert_eq!(
            id("/libpod_parent/libpod-conmon-abc"),
            CgroupIdentity::default()
        );
        // containerd without Kubernetes (`ctr run`, cgroupfs).
        assert_eq!(
            id(&format!("/default/{ID}")).container_id.as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn not_containers() {
        for p in [
            "/",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/sshd.service",
            "/init.scope",
            "/system.slice/pod-cleanup.service",
            "/kubepods.slice/kubepods-podnotauid.slice",
        ] {
            assert_eq!(id(p), CgroupIdentity::default(), "{p}");
        }
    }

    #[test]
    fn pod_names_from_log_dirs() {
        let root = tempfile::tempdir().unwrap();
        let pods = root.path().join("pods");
        let pod_dir = pods.join(format!("shop_cart-7d9f8-x2k4q_{UID}"));
        for c in ["app", "sidecar"] {
            std::fs::create_dir_all(pod_dir.join(c)).unwrap();
            std::fs::write(pod_dir.join(c).join("0.log"), "").unwrap();
        }
        std::fs::create_dir_all(pods.join("other_pod_1b4e28ba-2fa1-11d2-883f-0016d3cca427/x"))
            .unwrap();
        let containers = root.path().join("containers");
        std::fs::create_dir_all(&containers).unwrap();
        std::os::unix::fs::symlink(
            pod_dir.join("app/0.log"),
            containers.join(format!("cart-7d9f8-x2k4q_shop_app-{ID}.log")),
        )
        .unwrap();
        let mut p = Pods::new(&pods);
        let now = Instant::now();
        let k = p.k8s(UID, Some(ID), now).unwrap();
        assert_eq!(k.namespace.as_deref(), Some("shop"));
        assert_eq!(k.pod.as_deref(), Some("cart-7d9f8-x2k4q"));
        assert_eq!(k.pod_uid.as_deref(), Some(UID));
        assert_eq!(k.container.as_deref(), Some("app"));
        // Two containers and an unknown id: the container stays unnamed.
        let k = p.k8s(UID, Some("ffff"), now).unwrap();
        assert_eq!(k.container, None);
        assert_eq!(
            p.k8s("00000000-0000-0000-0000-000000000000", None, now),
            None
        );
        // One container: it is the one.
        let k = p
            .k8s("1b4e28ba-2fa1-11d2-883f-0016d3cca427", None, now)
            .unwrap();
        assert_eq!(
            (k.namespace.as_deref(), k.container.as_deref()),
            (Some("other"), Some("x"))
        );
    }

    #[test]
    fn node_name_falls_back_to_host() {
        assert_eq!(node_name(Some("n1")), "n1");
        assert_eq!(node_name(Some("")), crate::watch::host_name());
        assert_eq!(node_name(None), crate::watch::host_name());
    }
}
