//! `rfh-trace agent`, as root with real programs: identity on every report,
//! the stdout (cut under 16 KiB) and rotating file sinks, metrics and
//! health, crash storms, the in-kernel cgroup filter, SIGTERM, dumps
//! through the socket, a capability-only agent, and the deployment
//! manifests. The engines around it (OTLP collector, Prometheus, podman)
//! are in agent_stack.rs.

mod common;
#[path = "agent_support/mod.rs"]
mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Agent, Cgroup, POD_UID, container_id, cpu_and_rss, metric, pod_cgroup, prog_exists, prog_ids_of,
};

/// The kubelet's log tree for one pod: /var/log/pods and /var/log/containers.
fn fake_kubelet_logs(root: &std::path::Path, id: &str) -> std::path::PathBuf {
    let pods = root.join("log/pods");
    let pod = pods.join(format!("shop_cart-7d9f8-x2k4q_{POD_UID}"));
    for c in ["app", "istio-proxy"] {
        std::fs::create_dir_all(pod.join(c)).unwrap();
        std::fs::write(pod.join(c).join("0.log"), "").unwrap();
    }
    let containers = root.join("log/containers");
    std::fs::create_dir_all(&containers).unwrap();
    std::os::unix::fs::symlink(
        pod.join("app/0.log"),
        containers.join(format!("cart-7d9f8-x2k4q_shop_app-{id}.log")),
    )
    .unwrap();
    pods
}

fn crash_of(pid: u32) -> impl Fn(&Value) -> bool {
    move |v| v["kind"] == "crash" && v["process"]["pid"] == pid
}

#[test]
fn reports_carry_node_and_pod_identity_in_every_sink() {
    common::require_root();
    let immediate = common::build("immediate.c", &["-g", "-O0"]);
    let thousand = common::build("thousand.c", &["-g", "-O0", "-pthread"]);
    let work = tempfile::tempdir().unwrap();
    let id = container_id(1);
    let pods = fake_kubelet_logs(work.path(), &id);
    let cg = pod_cgroup("identity", &id);
    let file = work.path().join("reports.jsonl");
    let agent = Agent::start(
        &[],
        &[
            "--stdout",
            "--file",
            file.to_str().unwrap(),
            "--pods-dir",
            pods.to_str().unwrap(),
        ],
        &[("NODE_NAME", "node-test-1")],
    );
    let socket_mode = std::fs::metadata(&agent.socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(socket_mode.unwrap(), 0o600, "the dump socket is root-only");
    assert_eq!(agent.get("/readyz").0, 200);
    assert_eq!(agent.get("/healthz").0, 200);
    let progs = prog_ids_of(agent.pid());
    assert!(!progs.is_empty(), "the agent holds its programs");

    // A process that crashes at once, in a pod's container cgroup.
    let out = cg.command(&immediate.exe, &[]).output().unwrap();
    assert!(!out.status.success());
    let report = agent
        .wait_for(Duration::from_secs(15), |v| {
            v["kind"] == "crash"
                && v["process"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("/immediate"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no crash report on stdout; stderr:\n{}",
                agent.stderr_text()
            )
        });
    common::validate(&report);
    assert_eq!(report["node"], "node-test-1");
    assert_eq!(report["process"]["container_id"], id.as_str());
    assert_eq!(report["process"]["cgroup"], cg.rel.as_str());
    let k8s = &report["process"]["k8s"];
    assert_eq!(k8s["namespace"], "shop");
    assert_eq!(k8s["pod"], "cart-7d9f8-x2k4q");
    assert_eq!(k8s["pod_uid"], POD_UID);
    assert_eq!(k8s["container"], "app", "named through /var/log/containers");
    assert!(
        report["signature"]
            .as_str()
            .is_some_and(|s| s.starts_with("v1-"))
    );
    assert_eq!(report["signal"]["name"], "SIGSEGV");
    let top = common::current_thread(&report);
    assert_eq!(top["frames"][0]["function"], "main");
    assert_eq!(
        top["frames"][0]["line"],
        common::line_of(&immediate.source, "main")
    );
    let crashed = report["process"]["pid"].as_u64().unwrap() as u32;

    // 200 threads: a report far over 16 KiB; stdout cuts it, the file has it whole.
    let out = cg.command(&thousand.exe, &["200"]).output().unwrap();
    assert!(!out.status.success());
    let is_big = |v: &Value| {
        v["kind"] == "crash"
            && v["process"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/thousand"))
    };
    let cut = agent
        .wait_for(Duration::from_secs(20), is_big)
        .expect("the 200-thread crash on stdout");
    let line = agent.raw_line(is_big).unwrap();
    assert!(
        line.len() + 1 < 16 * 1024,
        "stdout line of {} bytes",
        line.len()
    );
    assert_eq!(cut["truncated_report"], true);
    assert_eq!(cut["threads"][0]["current"], true);
    assert_eq!(cut["process"]["container_id"], id.as_str());
    common::validate(&cut);

    // Metrics: reports by kind and signal, watched processes, RSS.
    let (status, text) = agent.get("/metrics");
    assert_eq!(status, 200);
    let crashes = metric(
        &text,
        "rfh_trace_reports_total{kind=\"crash\",signal=\"SIGSEGV\"}",
    );
    assert!(crashes.is_some_and(|n| n >= 2.0), "{text}");
    assert!(metric(&text, "rfh_trace_watched_processes").is_some_and(|n| n > 0.0));
    let rss = metric(&text, "rfh_trace_resident_memory_bytes").unwrap();
    assert!(rss > 0.0 && rss < 256.0 * 1024.0 * 1024.0, "RSS {rss}");
    assert!(text.contains("rfh_trace_report_latency_seconds_bucket"));

    // SIGTERM: exit 0 well within 5 s, a final loss record, programs gone.
    let (status, took, records, stderr) = agent.stop();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let last = records.last().expect("records");
    assert_eq!(
        last["kind"], "loss",
        "the last record is the final loss record"
    );
    assert_eq!(last["node"], "node-test-1");
    common::validate(last);
    // The kernel frees a program once its last descriptor is closed and
    // an RCU grace period has passed.
    let deadline = Instant::now() + Duration::from_secs(3);
    while progs.iter().any(|&id| prog_exists(id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for id in progs {
        assert!(!prog_exists(id), "program {id} still loaded after exit");
    }

    // The file sink: every report in full.
    let text = std::fs::read_to_string(&file).unwrap();
    let in_file: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let full = in_file
        .iter()
        .find(|v| is_big(v))
        .expect("200-thread crash in the file");
    assert!(full.get("truncated_report").is_none());
    assert!(
        full["threads"].as_array().unwrap().len() > cut["threads"].as_array().unwrap().len(),
        "the file keeps the threads stdout cut"
    );
    let same = in_file
        .iter()
        .find(|v| crash_of(crashed)(v))
        .expect("the first crash in the file");
    assert_eq!(same["signature"], report["signature"]);
    assert_eq!(in_file.last().unwrap()["kind"], "loss");
}

#[test]
fn a_crash_storm_is_reported_or_counted_and_filtered_by_cgroup_in_the_kernel() {
    common::require_root();
    let storm = common::build("storm.c", &["-g", "-O1"]);
    let immediate = common::build("immediate.c", &["-g", "-O0"]);
    let cg = Cgroup::new(&format!(
        "rfhtest-storm-{}.slice/workload",
        std::process::id()
    ));
    let agent = Agent::start(
        &[],
        &[
            "--stdout",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--storm-reports",
            "5",
            "--storm-window",
            "4s",
            "--rate-limit",
            "20",
            "--rate-burst",
            "50",
        ],
        &[("NODE_NAME", "node-storm")],
    );
    // Outside the subtree: not watched, not reported.
    let outside = Command::new(&immediate.exe).status().unwrap();
    assert!(!outside.success());
    let (cpu0, _) = cpu_and_rss(agent.pid());
    let t = Instant::now();
    let out = cg
        .command(&storm.exe, &["1000", "10"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let storm_time = t.elapsed();
    let died: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(died, 1000, "the storm program's children all crashed");
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, rss) = cpu_and_rss(agent.pid());
    let (_, text) = agent.get("/metrics");
    let suppressed_metric = metric(&text, "rfh_trace_crashes_suppressed_total").unwrap();
    let (status, took, records, stderr) = agent.stop();
    assert!(status.success(), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let reports: Vec<&Value> = records.iter().filter(|v| v["kind"] == "crash").collect();
    let outsiders: Vec<&&Value> = reports
        .iter()
        .filter(|r| r["process"]["comm"] != "storm")
        .collect();
    assert!(
        outsiders.is_empty(),
        "only the subtree's crashes are reported: {outsiders:?}"
    );
    let no_exe = reports
        .iter()
        .filter(|r| {
            !r["process"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/storm"))
        })
        .count();
    assert_eq!(no_exe, 0, "every storm report names the program");
    let signatures: std::collections::BTreeSet<&str> = reports
        .iter()
        .filter_map(|r| r["signature"].as_str())
        .collect();
    assert_eq!(
        signatures.len(),
        1,
        "one bug, one signature: {signatures:?}"
    );
    let carried: u64 = reports
        .iter()
        .filter_map(|r| r["suppressed"].as_u64())
        .sum();
    let mut lost = std::collections::BTreeMap::<String, u64>::new();
    for l in records.iter().filter(|v| v["kind"] == "loss") {
        common::validate(l);
        for (k, v) in l["lost"].as_object().unwrap() {
            *lost.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
    }
    // Whole crashes lost before the hub, by cause.
    let whole = [
        "ring_full",
        "queue_full",
        "dying_map_full",
        "watch_map_full",
    ]
    .iter()
    .map(|k| lost.get(*k).copied().unwrap_or(0))
    .sum::<u64>();
    let counted = reports.len() as u64
        + carried
        + lost.get("suppressed").copied().unwrap_or(0)
        + lost.get("rate_limited").copied().unwrap_or(0)
        + whole;
    eprintln!(
        "storm: 1000 crashes in {storm_time:?}: {} reported, {carried} carried as suppressed, \
         lost {lost:?}; agent CPU {:.2}s, RSS {} MiB",
        reports.len(),
        cpu1 - cpu0,
        rss >> 20
    );
    assert_eq!(counted, 1000, "every crash reported or counted");
    assert!(
        reports.len() >= 10,
        "the first of each 4 s window are reported"
    );
    assert!(
        carried > 0,
        "a later window's first report carries the count"
    );
    assert!(storm_time < Duration::from_secs(15), "{storm_time:?}");
    assert!(
        suppressed_metric >= (carried + lost.get("suppressed").copied().unwrap_or(0)) as f64 - 0.5
    );
}

#[test]
fn dumps_go_through_the_agent_socket_and_only_for_root() {
    common::require_root();
    let agent = Agent::start(&[], &[], &[]);
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = sleeper.id().to_string();
    let dump = |socket: &std::path::Path| {
        let t = Instant::now();
        let out = Command::new(common::rfh_trace())
            .args(["dump", &pid, "--format", "json"])
            .env("RFH_TRACE_SOCKET", socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
        assert_eq!(v["kind"], "on_demand");
        assert!(
            common::functions(&v["threads"][0])
                .iter()
                .any(|f| f.contains("nanosleep")),
            "{v:#}"
        );
        t.elapsed()
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let warm = median((0..5).map(|_| dump(&agent.socket)).collect());
    let cold = median(
        (0..3)
            .map(|_| dump(std::path::Path::new("/nonexistent/agent.sock")))
            .collect(),
    );
    eprintln!("dump of a 1-thread process: warm agent {warm:?}, cold {cold:?}");
    assert!(warm * 2 < cold, "warm {warm:?} vs cold {cold:?}");

    // Loosened permissions still let no one else in: the peer's uid is checked.
    use std::os::unix::fs::PermissionsExt;
    let run_dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::rfh_trace(),
            "dump",
            &pid,
        ])
        .env("RFH_TRACE_SOCKET", &agent.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused: uid 65534"), "{stderr}");
    assert!(out.stdout.is_empty());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let (status, ..) = agent.stop();
    assert!(status.success());
}

#[test]
fn a_capability_only_agent_runs_as_an_unprivileged_user() {
    common::require_root();
    let immediate = common::build("immediate.c", &["-g", "-O0"]);
    let id = container_id(4);
    let cg = pod_cgroup("caps", &id);
    let caps = "+bpf,+perfmon,+sys_ptrace,+checkpoint_restore,+dac_read_search";
    let inh = format!("--inh-caps={caps}");
    let amb = format!("--ambient-caps={caps}");
    let bnd = format!("--bounding-set={caps}");
    let wrap = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        inh.as_str(),
        amb.as_str(),
        bnd.as_str(),
    ];
    let agent = Agent::start(&wrap, &[], &[("NODE_NAME", "node-caps")]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    let child = cg.command(&immediate.exe, &[]).spawn().unwrap();
    let pid = child.id();
    let _ = child.wait_with_output();
    let r = agent
        .wait_for(Duration::from_secs(15), crash_of(pid))
        .unwrap_or_else(|| panic!("no report; stderr:\n{}", agent.stderr_text()));
    assert_eq!(r["node"], "node-caps");
    assert_eq!(
        r["process"]["container_id"],
        id.as_str(),
        "identity from the kernel's cgroup id"
    );
    assert_eq!(common::current_thread(&r)["frames"][0]["function"], "main");
    assert_eq!(agent.get("/readyz").0, 200);
    let (status, took, records, stderr) = agent.stop();
    assert!(status.success(), "{stderr}");
    assert!(took < Duration::from_secs(5));
    assert_eq!(records.last().unwrap()["kind"], "loss");
}

#[test]
fn deployment_manifests_validate_against_the_kubernetes_schemas() {
    let validate = support::py_tool("kubernetes-validate");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "manifests in {}", dir.display());
    let out = Command::new(validate)
        .args(["--strict", "--kubernetes-version", "1.33"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The DaemonSet's promises, checked in its text.
    let ds = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    for needle in [
        "hostPID: true",
        "readOnlyRootFilesystem: true",
        "fieldPath: spec.nodeName",
        "operator: Exists",
        "livenessProbe",
        "readinessProbe",
        "/var/log/pods",
    ] {
        assert!(ds.contains(needle), "daemonset.yaml lacks {needle}");
    }
}

/// Ten minutes (`RFH_TRACE_CHURN_SECS` to change) of short-lived processes,
/// crash bursts and dumps under one agent: its RSS and held files stay
/// bounded, and every crash is reported or counted.
#[test]
#[ignore = "long run: cargo test --release --test agent -- --ignored churn"]
fn churn_keeps_memory_and_files_bounded_and_counts_every_crash() {
    common::require_root();
    let secs: u64 = std::env::var("RFH_TRACE_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let storm = common::build("storm.c", &["-g", "-O1"]);
    let cg = Cgroup::new(&format!("rfhtest-churn-{}.slice/work", std::process::id()));
    let agent = Agent::start(
        &[],
        &[
            "--stdout",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--storm-window",
            "10s",
        ],
        &[],
    );
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let start = Instant::now();
    let (mut crashes, mut dumps, mut samples) = (0u64, 0u64, Vec::new());
    while start.elapsed() < Duration::from_secs(secs) {
        // 200 short-lived processes, 20 crashes in a second, one dump.
        let churn = cg
            .command(
                std::path::Path::new("/bin/sh"),
                &[
                    "-c",
                    "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done",
                ],
            )
            .status()
            .unwrap();
        assert!(churn.success());
        let out = cg.command(&storm.exe, &["20", "1"]).output().unwrap();
        crashes += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap();
        let mut sleeper = cg
            .command(std::path::Path::new("/bin/sleep"), &["5"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let dump = Command::new(common::rfh_trace())
            .args(["dump", &sleeper.id().to_string()])
            .env("RFH_TRACE_SOCKET", &agent.socket)
            .output()
            .unwrap();
        assert!(
            dump.status.success(),
            "{}",
            String::from_utf8_lossy(&dump.stderr)
        );
        dumps += 1;
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let (_, rss) = cpu_and_rss(agent.pid());
        samples.push((start.elapsed().as_secs(), rss >> 20, fds(agent.pid())));
    }
    let (status, took, records, stderr) = agent.stop();
    assert!(status.success(), "{stderr}");
    assert!(took < Duration::from_secs(5));
    let reports = records.iter().filter(|v| v["kind"] == "crash").count() as u64;
    let carried: u64 = records
        .iter()
        .filter_map(|v| v["suppressed"].as_u64())
        .sum();
    let mut lost = 0u64;
    for l in records.iter().filter(|v| v["kind"] == "loss") {
        for k in [
            "suppressed",
            "rate_limited",
            "ring_full",
            "queue_full",
            "dying_map_full",
        ] {
            lost += l["lost"][k].as_u64().unwrap_or(0);
        }
    }
    let first: Vec<_> = samples.iter().take(5).collect();
    let last = samples.last().unwrap();
    eprintln!(
        "churn {secs}s: {crashes} crashes, {dumps} dumps; {reports} reported, {carried} carried, \
         {lost} in loss records; (s, RSS MiB, fds) first {first:?} last {last:?}"
    );
    assert_eq!(
        reports + carried + lost,
        crashes,
        "every crash reported or counted"
    );
    let (rss0, fds0) = first
        .iter()
        .fold((0, 0), |(r, f), s| (r.max(s.1), f.max(s.2)));
    assert!(
        last.1 <= rss0 + 32,
        "RSS grew from {rss0} to {} MiB",
        last.1
    );
    assert!(
        last.2 <= fds0 + 64,
        "held files grew from {fds0} to {}",
        last.2
    );
}
