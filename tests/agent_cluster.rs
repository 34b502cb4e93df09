//! A simulated three-node cluster on one kernel: three network namespaces
//! joined by veth pairs to a bridge on the host, each with its own agent
//! (its own NODE_NAME and workload cgroup, filtered in the kernel), all
//! shipping OTLP to one central collector on the bridge's address. A crash
//! storm on one node must be reported or counted there, leave the other
//! nodes' reports alone, and sign the same bug the same on every node.

mod common;
#[path = "agent_support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Agent, Cgroup};

/// Private addresses on links that exist only inside this test.
const NET: &str = "10.231.77";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bridge, the namespaces and their links; all removed on drop.
struct Network {
    bridge: String,
    namespaces: Vec<String>,
}

impl Network {
    fn new(nodes: usize) -> Network {
        let tag = std::process::id() % 100_000;
        let bridge = format!("rfhbr{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut net = Network {
            bridge: bridge.clone(),
            namespaces: Vec::new(),
        };
        ip(&["addr", "add", &format!("{NET}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..nodes {
            let ns = format!("rfh{tag}n{i}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (host, peer) = (format!("rfh{tag}h{i}"), format!("rfh{tag}p{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &host, "master", &bridge]);
            ip(&["link", "set", &host, "up"]);
            ip(&["link", "set", &peer, "netns", &ns]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{NET}.{}/24", 10 + i),
                "dev",
                &peer,
            ]);
            ip(&["-n", &ns, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Deleting a namespace deletes its veth end, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// Counts of one node's records on its own stdout.
#[derive(Debug, Default)]
struct Tally {
    reports: u64,
    carried: u64,
    lost: BTreeMap<String, u64>,
    signatures: Vec<String>,
}

fn tally(records: &[Value], node: &str) -> Tally {
    let mut t = Tally::default();
    for r in records {
        assert_eq!(r["node"], node, "{r}");
        match r["kind"].as_str() {
            Some("crash") => {
                t.reports += 1;
                t.carried += r["suppressed"].as_u64().unwrap_or(0);
                if let Some(s) = r["signature"].as_str()
                    && !t.signatures.iter().any(|x| x == s)
                {
                    t.signatures.push(s.to_string());
                }
            }
            Some("loss") => {
                for (k, v) in r["lost"].as_object().unwrap() {
                    *t.lost.entry(k.clone()).or_default() += v.as_u64().unwrap();
                }
            }
            _ => {}
        }
    }
    t
}

#[test]
fn three_nodes_one_collector_a_storm_on_one_node() {
    common::require_root();
    let storm = common::build("storm.c", &["-g", "-O1"]);
    let rotel = support::rotel_agent();
    let net = Network::new(3);
    let work = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let collector = support::KillOnDrop(
        Command::new(&rotel)
            .args(["start", "--exporter", "blackhole", "--debug-log", "logs"])
            .args(["--debug-log-verbosity", "detailed"])
            .args(["--otlp-http-endpoint", &format!("{NET}.1:{port}")])
            .args([
                "--otlp-grpc-endpoint",
                &format!("{NET}.1:{}", support::free_port()),
            ])
            .arg("--pid-file")
            .arg(work.path().join("rotel.pid"))
            .arg("--log-file")
            .arg(work.path().join("rotel.log"))
            .stdout(std::fs::File::create(work.path().join("rotel.out")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let endpoint = format!("http://{NET}.1:{port}/v1/logs");
    let tag = std::process::id();
    let mut nodes = Vec::new();
    for (i, ns) in net.namespaces.iter().enumerate() {
        let cg = Cgroup::new(&format!("rfhtest-cluster-{tag}-n{i}.slice/workload"));
        let node = format!("node-{i}");
        // nsenter, not `ip netns exec`, which mounts a sysfs of its own
        // over /sys and so hides the cgroup mount.
        let netns = format!("--net=/run/netns/{ns}");
        let wrap = ["nsenter", netns.as_str()];
        let agent = Agent::start(
            &wrap,
            &[
                "--stdout",
                "--cgroup",
                cg.path.to_str().unwrap(),
                "--otlp-endpoint",
                &endpoint,
                "--storm-reports",
                "5",
                "--storm-window",
                "60s",
                "--rate-limit",
                "50",
                "--rate-burst",
                "20",
            ],
            &[("NODE_NAME", node.as_str())],
        );
        nodes.push((node, cg, agent));
    }
    // One crash of the bug on nodes 0 and 2; a storm of it on node 1.
    let run = |cg: &Cgroup, n: &str, secs: &str| {
        let out = cg
            .command(&storm.exe, &[n, secs])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(run(&nodes[0].1, "1", "0.1"), 1);
    let t = Instant::now();
    assert_eq!(run(&nodes[1].1, "300", "3"), 300);
    let storm_time = t.elapsed();
    assert_eq!(run(&nodes[2].1, "1", "0.1"), 1);
    std::thread::sleep(Duration::from_secs(2));
    let mut tallies = Vec::new();
    for (node, _cg, agent) in nodes.drain(..) {
        let (status, took, records, stderr) = agent.stop();
        assert!(status.success(), "{node}: {stderr}");
        assert!(took < Duration::from_secs(5), "{node}: {took:?}");
        tallies.push((node.clone(), tally(&records, &node)));
    }
    // The collector has the final records too.
    std::thread::sleep(Duration::from_millis(500));
    let seen = std::fs::read_to_string(work.path().join("rotel.out")).unwrap_or_default();
    drop(collector);
    drop(net);

    eprintln!("cluster: storm of 300 in {storm_time:?}; {tallies:#?}");
    let (_, quiet0) = &tallies[0];
    let (_, stormy) = &tallies[1];
    let (_, quiet2) = &tallies[2];
    for quiet in [quiet0, quiet2] {
        assert_eq!(quiet.reports, 1, "the other nodes' reports are unaffected");
        assert_eq!(quiet.carried, 0);
        assert!(quiet.lost.values().all(|&n| n == 0), "{:?}", quiet.lost);
    }
    let whole: u64 = [
        "ring_full",
        "queue_full",
        "dying_map_full",
        "watch_map_full",
    ]
    .iter()
    .map(|k| stormy.lost.get(*k).copied().unwrap_or(0))
    .sum();
    let counted = stormy.reports
        + stormy.carried
        + stormy.lost.get("suppressed").copied().unwrap_or(0)
        + stormy.lost.get("rate_limited").copied().unwrap_or(0)
        + whole;
    assert_eq!(counted, 300, "every crash of the storm reported or counted");
    assert_eq!(stormy.reports, 5, "the window's first five");
    // The same bug, the same signature on every node.
    assert_eq!(quiet0.signatures, stormy.signatures);
    assert_eq!(quiet2.signatures, stormy.signatures);
    assert_eq!(stormy.signatures.len(), 1);

    // At the collector: each node's crash records under its own resource.
    let mut at_collector = BTreeMap::<String, u64>::new();
    for block in seen.split("ResourceLog #").skip(1) {
        let Some(node) = block.lines().find_map(|l| {
            l.trim()
                .strip_prefix("-> k8s.node.name: Str(")?
                .strip_suffix(')')
        }) else {
            continue;
        };
        *at_collector.entry(node.to_string()).or_default() +=
            block.matches("EventName: rfh-trace.crash").count() as u64;
    }
    for (node, t) in &tallies {
        assert_eq!(
            at_collector.get(node).copied().unwrap_or(0),
            t.reports,
            "{node}: crash records at the collector vs on stdout; collector saw {at_collector:?}"
        );
    }
    assert!(seen.contains(&format!("rfh.signature: Str({})", stormy.signatures[0])));
}
