//! Report stage: the typed report model, the JSON contract of
//! report.schema.json. Rendering is the sinks' business (sink/).

mod frame;

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

pub use self::frame::{Frame, NativeFrame, PythonFrame, hex};
pub use crate::profile::ProfileSummary;

pub const SCHEMA: &str = "rfh-trace.report.v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A fatal signal.
    Crash,
    /// `--timeout` ran out.
    Timeout,
    /// `rfh-trace dump`.
    OnDemand,
    /// An `--on-signal` signal arrived.
    Signal,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Thread {
    pub tid: u32,
    pub ns_tid: Option<u32>,
    pub name: String,
    pub current: bool,
    pub truncated: bool,
    pub unwind: Option<&'static str>,
    pub error: Option<String>,
    pub frames: Vec<Frame>,
    /// `threading.Thread.name`, for threads running Python.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_name: Option<String>,
    /// Why this thread's Python frames are missing, incomplete or not
    /// merged, as one line ("Python frames unavailable: ...").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct K8s {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Process {
    pub pid: u32,
    pub ns_pid: Option<u32>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    pub uid: Option<u32>,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Signal {
    pub number: i32,
    pub name: String,
    pub description: Option<&'static str>,
    pub code: i32,
    pub code_name: Option<&'static str>,
    pub code_description: Option<&'static str>,
    #[serde(serialize_with = "opt_hex")]
    pub address: Option<u64>,
    pub sender_pid: Option<i32>,
    pub handled: bool,
    /// The fault address sits just below the stack pointer.
    pub stack_overflow: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub kind: Kind,
    pub time: String,
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub process: Process,
    pub signal: Option<Signal>,
    /// The kernel's OOM killer ended the process.
    pub oom_kill: bool,
    pub threads: Vec<Thread>,
    /// Threads not captured because of `--max-threads`.
    pub threads_omitted: u32,
    /// Threads whose records did not fit in the ring buffer.
    pub threads_lost: u32,
    /// Threads the process had when the report was taken, when known:
    /// captured + omitted + lost add up to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads_total: Option<u32>,
    /// Why this report is incomplete, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial: Option<String>,
    /// Timeout reports: where the CPU time went since the watch began or
    /// the previous dump.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSummary>,
    /// Records lost (of any cause) since the previous report.
    pub lost_events: u64,
    /// The process runs a CPython whose frames cannot be read, and why
    /// (an unsupported version, a free-threaded build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_error: Option<String>,
    /// Agent: the crash's fingerprint, the same on every host for the
    /// same bug (agent/signature.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Agent: crashes of this signature counted, not reported, since its
    /// previous report (crash storms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

/// `kind: "loss"`: what was dropped since the previous loss record, by
/// cause, when it could not be pinned to one report.
#[derive(Clone, Debug, Serialize)]
pub struct LossRecord {
    pub schema: &'static str,
    pub kind: &'static str,
    pub time: String,
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub lost: BTreeMap<&'static str, u64>,
    pub lost_events: u64,
}

impl LossRecord {
    pub fn new(time: String, host: String, lost: BTreeMap<&'static str, u64>) -> Self {
        let lost_events = lost.values().sum();
        Self {
            schema: SCHEMA,
            kind: "loss",
            time,
            host,
            node: None,
            lost,
            lost_events,
        }
    }
}

fn opt_hex<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&hex(*v)),
        None => s.serialize_none(),
    }
}

/// RFC 3339 UTC with microseconds, from nanoseconds since the epoch.
pub fn rfc3339(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn kinds_and_addresses_serialize_as_the_schema_says() {
        assert_eq!(serde_json::to_value(Kind::OnDemand).unwrap(), "on_demand");
        let s = Signal {
            address: Some(0x40),
            ..Signal::default()
        };
        assert_eq!(serde_json::to_value(&s).unwrap()["address"], "0x40");
    }
}
