//! `rfh-trace agent` with the engines it feeds: reports into the rotel
//! OTLP collector with semantic-convention resources, counters scraped by
//! Prometheus, a real podman container's id, and the agent itself in a
//! container with host pids and capabilities only.

mod common;
#[path = "agent_support/mod.rs"]
mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Agent, POD_UID, container_id, pod_cgroup};

#[test]
fn reports_reach_an_otlp_collector_with_semantic_convention_resources() {
    common::require_root();
    let rotel = support::rotel_agent();
    let immediate = common::build("immediate.c", &["-g", "-O0"]);
    let work = tempfile::tempdir().unwrap();
    let (http, grpc) = (support::free_port(), support::free_port());
    let collector = support::KillOnDrop(
        Command::new(&rotel)
            .args(["start", "--exporter", "blackhole", "--debug-log", "logs"])
            .args(["--debug-log-verbosity", "detailed"])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .arg("--pid-file")
            .arg(work.path().join("rotel.pid"))
            .arg("--log-file")
            .arg(work.path().join("rotel.log"))
            .stdout(std::fs::File::create(work.path().join("rotel.out")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let id = container_id(3);
    let cg = pod_cgroup("otlp", &id);
    let endpoint = format!("http://127.0.0.1:{http}");
    let agent = Agent::start(
        &[],
        &[],
        &[
            ("NODE_NAME", "node-otlp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let child = cg.command(&immediate.exe, &[]).spawn().unwrap();
    let pid = child.id();
    let _ = child.wait_with_output();
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = [
        "EventName: rfh-trace.crash".to_string(),
        "k8s.node.name: Str(node-otlp)".to_string(),
        format!("container.id: Str({id})"),
        format!("k8s.pod.uid: Str({POD_UID})"),
        format!("process.pid: Int({pid})"),
        "process.executable.path: Str(".to_string(),
        "host.name: Str(".to_string(),
        "rfh.signature: Str(v1-".to_string(),
        "SeverityText: FATAL".to_string(),
    ];
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = std::fs::read_to_string(work.path().join("rotel.out")).unwrap_or_default();
        if want.iter().all(|w| seen.contains(w.as_str())) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, ..) = agent.stop();
    // The final loss record goes out at exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !seen.contains("EventName: rfh-trace.loss") {
        std::thread::sleep(Duration::from_millis(100));
        seen = std::fs::read_to_string(work.path().join("rotel.out")).unwrap_or_default();
    }
    drop(collector);
    for w in &want {
        assert!(
            seen.contains(w.as_str()),
            "{w} not received by the collector:\n{seen}"
        );
    }
    assert!(
        seen.contains("EventName: rfh-trace.loss"),
        "the final loss record reached it too"
    );
    assert!(status.success());
}

#[test]
fn prometheus_scrapes_the_agent() {
    common::require_root();
    let immediate = common::build("immediate.c", &["-g", "-O0"]);
    let work = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[], &[], &[("NODE_NAME", "node-prom")]);
    let out = Command::new(&immediate.exe).status().unwrap();
    assert!(!out.success());
    agent
        .wait_for(Duration::from_secs(15), |v| v["kind"] == "crash")
        .expect("a crash report");
    let port = support::free_port();
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rfh-trace\n    static_configs:\n      - targets: ['{}']\n",
            agent.metrics
        ),
    )
    .unwrap();
    let prom = support::KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package; cargo xtask setup --with-test-tools)"),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let query = |q: &str| {
        std::net::TcpStream::connect(addr)
            .ok()
            .map(|_| support::http_get(addr, &format!("/api/v1/query?query={q}")).1)
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut body = String::new();
    while Instant::now() < deadline {
        body = query("rfh_trace_reports_total");
        if body.contains("\"kind\":\"crash\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let up = query("up");
    drop(prom);
    let (status, ..) = agent.stop();
    assert!(status.success());
    assert!(
        body.contains("\"kind\":\"crash\"") && body.contains("\"signal\":\"SIGSEGV\""),
        "Prometheus did not scrape the crash counter: {body}"
    );
    assert!(up.contains("\"job\":\"rfh-trace\""), "{up}");
}

#[test]
fn a_podman_container_is_identified_by_its_runtime_id() {
    common::require_root();
    // Lives 100 ms, so the agent reads it while it runs: a program that
    // dies at once inside a container keeps its identity (the kernel's
    // cgroup id) but, its files being only in the container's mount
    // namespace, may lose its names (docs/agent.md, "Limitations").
    let late = common::build("late.c", &["-g", "-O0"]);
    let work = tempfile::tempdir().unwrap();
    let tag = format!("rfh-test-{}", std::process::id());
    let image = support::podman_image(work.path(), &late.exe, &tag);
    let agent = Agent::start(&[], &[], &[("NODE_NAME", "node-podman")]);
    let run = support::podman(work.path())
        .args(["run", "--name", &tag, &image, "/late"])
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(139),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let inspect = support::podman(work.path())
        .args(["inspect", "--format", "{{.Id}}", &tag])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
    assert_eq!(id.len(), 64, "podman inspect: {id}");
    let r = agent.wait_for(Duration::from_secs(15), |v| {
        v["kind"] == "crash" && v["process"]["comm"] == "late"
    });
    let _ = support::podman(work.path())
        .args(["rm", "-f", &tag])
        .output();
    let _ = support::podman(work.path())
        .args(["rmi", "-f", &image])
        .output();
    let (status, ..) = agent.stop();
    let r = r.expect("a report of the crash in the container");
    assert_eq!(
        r["process"]["container_id"],
        id.as_str(),
        "the runtime's own id"
    );
    assert_eq!(r["process"]["ns_pid"], 1, "pid 1 in its own PID namespace");
    // The binary exists only in the container's mount namespace.
    assert_eq!(
        common::current_thread(&r)["frames"][0]["function"],
        "crash_late"
    );
    assert!(status.success());
}

#[test]
fn the_agent_runs_in_a_container_with_host_pids_and_capabilities_only() {
    common::require_root();
    // Lives 100 ms: long enough for the agent to read it while alive (a
    // process that dies at once is found by path, in the agent's own mount
    // namespace or the host's via /proc/1/root where pid 1 allows it).
    let late = common::build("late.c", &["-g", "-O0"]);
    let work = tempfile::tempdir().unwrap();
    let tag = format!("rfh-agent-test-{}", std::process::id());
    let image = support::podman_image(work.path(), std::path::Path::new(common::rfh_trace()), &tag);
    let port = support::free_port();
    let mut ctr = support::podman(work.path())
        .args([
            "run",
            "--rm",
            "--name",
            &tag,
            "--pid=host",
            "--network=host",
            "--read-only",
        ])
        .args(["--tmpfs", "/run/rfh-trace", "--cap-drop=all"])
        .arg("--cap-add=BPF,PERFMON,SYS_PTRACE,CHECKPOINT_RESTORE,DAC_READ_SEARCH")
        // podman's default seccomp profile allows bpf() with CAP_SYS_ADMIN only.
        .args([
            "--security-opt",
            "seccomp=unconfined",
            "-e",
            "NODE_NAME=node-ctr",
        ])
        .args([&image, "/rfh-trace", "agent", "--stdout"])
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = false;
    while !ready && Instant::now() < deadline && matches!(ctr.try_wait(), Ok(None)) {
        ready = std::net::TcpStream::connect(addr).is_ok()
            && support::http_get(addr, "/readyz").0 == 200;
        std::thread::sleep(Duration::from_millis(200));
    }
    if ready {
        let child = Command::new(&late.exe).spawn().unwrap();
        let _ = child.wait_with_output();
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = support::podman(work.path())
        .args(["stop", "-t", "5", &tag])
        .output();
    let out = ctr.wait_with_output().unwrap();
    let _ = support::podman(work.path())
        .args(["rmi", "-f", &image])
        .output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        ready,
        "the containerized agent never got ready: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let r = reports
        .iter()
        .find(|v| {
            v["kind"] == "crash"
                && v["process"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("/late"))
        })
        .unwrap_or_else(|| panic!("no report from the container: {stdout}"));
    assert_eq!(r["node"], "node-ctr");
    assert_eq!(
        common::current_thread(r)["frames"][0]["function"],
        "crash_late"
    );
    assert_eq!(
        reports.last().unwrap()["kind"],
        "loss",
        "stopped cleanly, final record written"
    );
}
