//! The agent's configuration: flags, then the environment, then an
//! optional TOML file, then defaults (the first that sets a value wins).
//! Resolution is a pure function of the three, so it is unit-tested.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use serde::Deserialize;

use super::AgentError;
use crate::cli::parse_duration;

/// Where the agent listens for `rfh-trace dump` requests by default.
pub const DEFAULT_SOCKET: &str = "/run/rfh-trace/agent.sock";
/// Loopback only: metrics are not for the whole network unless asked.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9410";
pub const DEFAULT_PODS_DIR: &str = "/var/log/pods";

/// `rfh-trace agent`: watch every process on the node (or a cgroup
/// subtree) and ship crash reports to stdout, a rotating file and/or an
/// OpenTelemetry collector. Every option can also be set in the
/// environment (named after each) or in the --config file; flags win over
/// the environment, which wins over the file.
#[derive(Clone, Debug, Default, Args)]
pub struct AgentArgs {
    /// TOML file with any of the settings below (keys as the long flags,
    /// with `_` for `-`) [env: RFH_TRACE_CONFIG].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name on every record [env: NODE_NAME; default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Watch only this cgroup v2 subtree (a path under /sys/fs/cgroup, or
    /// relative to it), filtered in the kernel [env: RFH_TRACE_CGROUP].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// JSON Lines on stdout, every line under 16 KiB (the default sink
    /// when no other is given) [env: RFH_TRACE_STDOUT=1|0].
    #[arg(long)]
    pub stdout: bool,
    /// Full JSON Lines reports to FILE, rotated by size [env: RFH_TRACE_FILE].
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Rotate the --file when it would pass BYTES [default: 10 MiB]
    /// [env: RFH_TRACE_FILE_MAX_BYTES].
    #[arg(long, value_name = "BYTES")]
    pub file_max_bytes: Option<u64>,
    /// Rotated files kept (FILE.1 … FILE.N) [default: 5] [env: RFH_TRACE_FILE_KEEP].
    #[arg(long, value_name = "N")]
    pub file_keep: Option<u32>,
    /// OTLP/HTTP logs endpoint, e.g. http://collector:4318/v1/logs
    /// [env: OTEL_EXPORTER_OTLP_LOGS_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT
    /// with /v1/logs appended].
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Prometheus metrics, /healthz and /readyz on ADDR
    /// [default: 127.0.0.1:9410] [env: RFH_TRACE_METRICS_ADDR].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket for `rfh-trace dump` requests (root only)
    /// [default: /run/rfh-trace/agent.sock] [env: RFH_TRACE_SOCKET].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The kubelet's pod log directory, for namespace, pod and container
    /// names [default: /var/log/pods] [env: RFH_TRACE_PODS_DIR].
    #[arg(long, value_name = "DIR")]
    pub pods_dir: Option<PathBuf>,
    /// Full reports per crash signature per --storm-window; later crashes
    /// of it are counted (`suppressed`) [default: 5].
    #[arg(long, value_name = "N")]
    pub storm_reports: Option<u32>,
    /// The per-signature window [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub storm_window: Option<Duration>,
    /// Full crash reports per second over all signatures [default: 20];
    /// beyond it (and its burst) crashes are counted as `rate_limited`.
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<f64>,
    /// Burst allowed above --rate-limit [default: 100].
    #[arg(long, value_name = "N")]
    pub rate_burst: Option<u32>,
    /// Signals to report [default: SIGSEGV,SIGBUS,SIGFPE,SIGILL,SIGABRT,SIGTRAP,SIGSYS]
    /// [env: RFH_TRACE_SIGNALS].
    #[arg(long, value_delimiter = ',', value_name = "SIG,...")]
    pub signals: Vec<String>,
    /// Most threads captured in one crash report [default: 64].
    #[arg(long, value_name = "N")]
    pub max_threads: Option<u32>,
    /// Write "READY=1\n" to this descriptor once attached (READY=1 also
    /// goes to $NOTIFY_SOCKET).
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<i32>,
}

/// The TOML file: the same settings, flat, named as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node: Option<String>,
    cgroup: Option<PathBuf>,
    stdout: Option<bool>,
    file: Option<PathBuf>,
    file_max_bytes: Option<u64>,
    file_keep: Option<u32>,
    otlp_endpoint: Option<String>,
    metrics_addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    pods_dir: Option<PathBuf>,
    storm_reports: Option<u32>,
    storm_window: Option<String>,
    rate_limit: Option<f64>,
    rate_burst: Option<u32>,
    signals: Option<Vec<String>>,
    max_threads: Option<u32>,
}

/// Everything resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub node: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub stdout: bool,
    pub file: Option<PathBuf>,
    pub file_max_bytes: u64,
    pub file_keep: u32,
    pub otlp_endpoint: Option<String>,
    pub metrics_addr: SocketAddr,
    pub socket: PathBuf,
    pub pods_dir: PathBuf,
    pub storm_reports: u32,
    pub storm_window: Duration,
    pub rate_limit: f64,
    pub rate_burst: u32,
    pub signals: Vec<String>,
    pub max_threads: u32,
    pub ready_fd: Option<i32>,
}

fn parse_env<T: std::str::FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, AgentError> {
    match env(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| AgentError::Config(format!("{name}={v} is not a valid value"))),
    }
}

fn parse_bool(name: &'static str, v: &str) -> Result<bool, AgentError> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(AgentError::Config(format!(
            "{name}={v}: use 1 or 0 (true or false)"
        ))),
    }
}

impl Config {
    /// Flags, then `env`, then the file's text (when a file is named).
    pub fn resolve(
        args: &AgentArgs,
        env: &dyn Fn(&str) -> Option<String>,
        file_text: Option<&str>,
    ) -> Result<Self, AgentError> {
        let file: FileConfig = match file_text {
            Some(t) => toml::from_str(t).map_err(|e| AgentError::Config(format!("{e}")))?,
            None => FileConfig::default(),
        };
        let env_str = |name: &str| env(name).filter(|v| !v.is_empty());
        let env_path = |name: &str| env_str(name).map(PathBuf::from);
        let otlp_env = env_str("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT").or_else(|| {
            env_str("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/logs", base.trim_end_matches('/')))
        });
        let env_stdout = match env_str("RFH_TRACE_STDOUT") {
            Some(v) => Some(parse_bool("RFH_TRACE_STDOUT", &v)?),
            None => None,
        };
        let storm_window = match (args.storm_window, &file.storm_window) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(s).map_err(AgentError::Config)?,
            (None, None) => Duration::from_secs(60),
        };
        let signals = if !args.signals.is_empty() {
            args.signals.clone()
        } else if let Some(s) = env_str("RFH_TRACE_SIGNALS") {
            s.split(',').map(|p| p.trim().to_string()).collect()
        } else {
            file.signals.clone().unwrap_or_default()
        };
        let mut c = Config {
            node: args
                .node
                .clone()
                .or_else(|| env_str("NODE_NAME"))
                .or(file.node),
            cgroup: args
                .cgroup
                .clone()
                .or_else(|| env_path("RFH_TRACE_CGROUP"))
                .or(file.cgroup),
            stdout: args.stdout || env_stdout.or(file.stdout).unwrap_or(false),
            file: args
                .file
                .clone()
                .or_else(|| env_path("RFH_TRACE_FILE"))
                .or(file.file),
            file_max_bytes: args
                .file_max_bytes
                .or(parse_env(env, "RFH_TRACE_FILE_MAX_BYTES")?)
                .or(file.file_max_bytes)
                .unwrap_or(10 << 20),
            file_keep: args
                .file_keep
                .or(parse_env(env, "RFH_TRACE_FILE_KEEP")?)
                .or(file.file_keep)
                .unwrap_or(5),
            otlp_endpoint: args
                .otlp_endpoint
                .clone()
                .or(otlp_env)
                .or(file.otlp_endpoint),
            metrics_addr: match args
                .metrics_addr
                .or(parse_env(env, "RFH_TRACE_METRICS_ADDR")?)
                .or(file.metrics_addr)
            {
                Some(a) => a,
                None => DEFAULT_METRICS_ADDR
                    .parse()
                    .map_err(|_| AgentError::Config("bad default metrics address".into()))?,
            },
            socket: args
                .socket
                .clone()
                .or_else(|| env_path("RFH_TRACE_SOCKET"))
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            pods_dir: args
                .pods_dir
                .clone()
                .or_else(|| env_path("RFH_TRACE_PODS_DIR"))
                .or(file.pods_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PODS_DIR)),
            storm_reports: args.storm_reports.or(file.storm_reports).unwrap_or(5),
            storm_window,
            rate_limit: args.rate_limit.or(file.rate_limit).unwrap_or(20.0),
            rate_burst: args.rate_burst.or(file.rate_burst).unwrap_or(100),
            signals,
            max_threads: args.max_threads.or(file.max_threads).unwrap_or(64),
            ready_fd: args.ready_fd,
        };
        // No sink named: stdout, as `kubectl logs` and log agents expect.
        if !c.stdout && c.file.is_none() && c.otlp_endpoint.is_none() {
            c.stdout = true;
        }
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), AgentError> {
        let bad = |m: &str| Err(AgentError::Config(m.to_string()));
        if !(self.rate_limit > 0.0 && self.rate_limit.is_finite()) {
            return bad("--rate-limit must be a positive number of reports per second");
        }
        if self.max_threads == 0 {
            return bad("--max-threads must be at least 1");
        }
        if self.file_max_bytes < 64 << 10 {
            return bad("--file-max-bytes must be at least 65536 (a report can be that big)");
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(AgentError::Config(format!(
                "OTLP endpoint {e}: give an http:// or https:// URL"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_give_stdout_on_loopback() {
        let c = Config::resolve(&AgentArgs::default(), &env_of(&[]), None).unwrap();
        assert!(c.stdout);
        assert_eq!(c.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
        assert!(c.metrics_addr.ip().is_loopback());
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.storm_window, Duration::from_secs(60));
        assert_eq!(c.node, None);
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = r#"
            node = "from-file"
            file = "/var/log/file.jsonl"
            otlp_endpoint = "http://file:4318/v1/logs"
            storm_window = "10s"
            storm_reports = 2
            metrics_addr = "127.0.0.1:1"
        "#;
        let env = env_of(&[
            ("NODE_NAME", "from-env"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/"),
            ("RFH_TRACE_METRICS_ADDR", "127.0.0.1:2"),
        ]);
        let c = Config::resolve(&AgentArgs::default(), &env, Some(file)).unwrap();
        assert_eq!(c.node.as_deref(), Some("from-env"));
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://env:4318/v1/logs"));
        assert_eq!(c.metrics_addr.port(), 2);
        assert_eq!(c.file, Some(PathBuf::from("/var/log/file.jsonl")));
        assert_eq!(c.storm_window, Duration::from_secs(10));
        assert_eq!(c.storm_reports, 2);
        // A file sink alone: no stdout unless asked.
        assert!(!c.stdout);
        let args = AgentArgs {
            node: Some("from-flag".into()),
            metrics_addr: Some("127.0.0.1:3".parse().unwrap()),
            ..AgentArgs::default()
        };
        let c = Config::resolve(&args, &env, Some(file)).unwrap();
        assert_eq!(c.node.as_deref(), Some("from-flag"));
        assert_eq!(c.metrics_addr.port(), 3);
        // The logs-specific variable is used as is.
        let env = env_of(&[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://l:1/x")]);
        let c = Config::resolve(&AgentArgs::default(), &env, None).unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://l:1/x"));
    }

    #[test]
    fn bad_values_are_errors() {
        let e = |args: &AgentArgs, env: &[(&str, &str)], file: Option<&str>| {
            Config::resolve(args, &env_of(env), file)
                .unwrap_err()
                .to_string()
        };
        assert!(e(&AgentArgs::default(), &[], Some("nod = 1")).contains("unknown field"));
        assert!(
            e(&AgentArgs::default(), &[("RFH_TRACE_FILE_KEEP", "x")], None)
                .contains("RFH_TRACE_FILE_KEEP")
        );
        assert!(
            e(
                &AgentArgs::default(),
                &[("RFH_TRACE_STDOUT", "maybe")],
                None
            )
            .contains("RFH_TRACE_STDOUT")
        );
        let args = AgentArgs {
            otlp_endpoint: Some("collector:4318".into()),
            ..AgentArgs::default()
        };
        assert!(e(&args, &[], None).contains("http://"));
        let args = AgentArgs {
            rate_limit: Some(0.0),
            ..AgentArgs::default()
        };
        assert!(e(&args, &[], None).contains("rate-limit"));
        assert!(
            e(&AgentArgs::default(), &[], Some("storm_window = \"5x\""))
                .contains("invalid duration")
        );
    }
}
