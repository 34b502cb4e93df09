//! OTLP logs over HTTP (protobuf) to an OpenTelemetry Collector, with the
//! `opentelemetry-otlp` exporter. Each record is one log record: the
//! report's fields as structured attributes (`rfh.*`), a one-line body,
//! and the process's identity as OpenTelemetry semantic-convention
//! resource keys. The exporter is driven directly rather than through a
//! logger provider's processor, so records of different processes carry
//! different resources, and a failed export comes back to be counted.

use std::{
    collections::HashMap,
    io,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    Key, KeyValue,
    logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity},
};
use opentelemetry_otlp::{LogExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider},
};
use serde_json::Value;

use super::{Record, Writer, parse_rfc3339_ns};
use crate::report::Kind;

/// An unanswered export gives up after this, so shutdown stays quick.
const TIMEOUT: Duration = Duration::from_secs(3);

pub struct Otlp {
    exporter: LogExporter,
    logger: SdkLogger,
    scope: opentelemetry::InstrumentationScope,
    /// Records of the batch being built, each with its resource.
    buf: Vec<(Vec<(&'static str, Value)>, SdkLogRecord)>,
    _provider: SdkLoggerProvider,
}

impl Otlp {
    /// `endpoint` is the full URL, e.g. http://127.0.0.1:4318/v1/logs.
    pub fn new(endpoint: &str) -> io::Result<Self> {
        let exporter = LogExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(TIMEOUT)
            .build()
            .map_err(io::Error::other)?;
        // Only a source of log records: no processor, the exporter is ours.
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger("rfh-trace");
        let scope = opentelemetry::InstrumentationScope::builder("rfh-trace")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        Ok(Self {
            exporter,
            logger,
            scope,
            buf: Vec::new(),
            _provider: provider,
        })
    }
}

/// Semantic-convention resource keys of a record.
fn resource_of(v: &Value) -> Vec<(&'static str, Value)> {
    let mut r = vec![("service.name", Value::from("rfh-trace"))];
    let mut put = |k: &'static str, x: Option<&Value>| {
        if let Some(x) = x.filter(|x| !x.is_null()) {
            r.push((k, x.clone()));
        }
    };
    put("host.name", v.get("host"));
    put("k8s.node.name", v.get("node"));
    let p = v.get("process");
    let k8s = p.and_then(|p| p.get("k8s"));
    put("k8s.namespace.name", k8s.and_then(|k| k.get("namespace")));
    put("k8s.pod.name", k8s.and_then(|k| k.get("pod")));
    put("k8s.pod.uid", k8s.and_then(|k| k.get("pod_uid")));
    put("k8s.container.name", k8s.and_then(|k| k.get("container")));
    put("container.id", p.and_then(|p| p.get("container_id")));
    put("process.pid", p.and_then(|p| p.get("pid")));
    put("process.executable.path", p.and_then(|p| p.get("exe")));
    r
}

/// JSON to an OTLP value; nulls are left out, numbers beyond i64 become
/// doubles.
fn any(v: &Value) -> Option<AnyValue> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => AnyValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AnyValue::Int(i),
            None => AnyValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AnyValue::String(s.clone().into()),
        Value::Array(a) => AnyValue::ListAny(Box::new(a.iter().filter_map(any).collect())),
        Value::Object(o) => AnyValue::Map(Box::new(
            o.iter()
                .filter_map(|(k, v)| Some((Key::new(k.clone()), any(v)?)))
                .collect::<HashMap<_, _>>(),
        )),
    })
}

/// `SIGSEGV in crasher (pid 4242): crash_here`, for a reader of raw logs.
fn body(v: &Value) -> String {
    let s = |x: Option<&Value>| x.and_then(Value::as_str).unwrap_or("").to_string();
    let kind = s(v.get("kind"));
    if kind == "loss" {
        return format!("rfh-trace lost {} records", v["lost_events"]);
    }
    let p = &v["process"];
    let sig = s(v.pointer("/signal/name"));
    let top = v
        .pointer("/threads/0/frames/0/function")
        .and_then(Value::as_str)
        .unwrap_or("??");
    format!(
        "{} {sig} in {} (pid {}): {top}",
        kind,
        s(p.get("comm")),
        p["pid"]
    )
}

impl Otlp {
    fn record(&self, v: &Value, kind: Option<Kind>) -> SdkLogRecord {
        let mut rec = self.logger.create_log_record();
        let (name, sev, text) = match kind {
            Some(Kind::Crash) => ("rfh-trace.crash", Severity::Fatal, "FATAL"),
            Some(Kind::Signal) => ("rfh-trace.signal", Severity::Warn, "WARN"),
            Some(Kind::Timeout | Kind::OnDemand) => ("rfh-trace.dump", Severity::Info, "INFO"),
            None => ("rfh-trace.loss", Severity::Warn, "WARN"),
        };
        rec.set_event_name(name);
        rec.set_severity_number(sev);
        rec.set_severity_text(text);
        let t = v
            .get("time")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339_ns)
            .and_then(|ns| u64::try_from(ns).ok())
            .map_or_else(SystemTime::now, |ns| UNIX_EPOCH + Duration::from_nanos(ns));
        rec.set_timestamp(t);
        rec.set_observed_timestamp(SystemTime::now());
        rec.set_body(AnyValue::String(body(v).into()));
        if let Value::Object(o) = v {
            for (k, x) in o {
                if let Some(a) = any(x) {
                    rec.add_attribute(Key::new(format!("rfh.{k}")), a);
                }
            }
        }
        rec
    }
}

impl Writer for Otlp {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        let (v, kind) = match rec {
            Record::Report(r) => (serde_json::to_value(&**r), Some(r.kind)),
            Record::Loss(l) => (serde_json::to_value(&**l), None),
        };
        let v = v.map_err(io::Error::other)?;
        let record = self.record(&v, kind);
        self.buf.push((resource_of(&v), record));
        Ok(())
    }

    /// One request per run of records with the same resource.
    fn flush(&mut self) -> u64 {
        let buf = std::mem::take(&mut self.buf);
        let mut failed = 0;
        let mut i = 0;
        while i < buf.len() {
            let res = &buf[i].0;
            let n = buf[i..].iter().take_while(|(r, _)| r == res).count();
            let resource = Resource::builder_empty()
                .with_attributes(res.iter().map(|(k, v)| match v {
                    Value::Number(n) => KeyValue::new(*k, n.as_i64().unwrap_or(0)),
                    other => KeyValue::new(*k, other.as_str().unwrap_or("").to_string()),
                }))
                .build();
            self.exporter.set_resource(&resource);
            let items: Vec<(&SdkLogRecord, &opentelemetry::InstrumentationScope)> = buf[i..i + n]
                .iter()
                .map(|(_, r)| (r, &self.scope))
                .collect();
            let result = futures_executor::block_on(self.exporter.export(LogBatch::new(&items)));
            if let Err(e) = result {
                crate::diag!("OTLP export of {n} records failed: {e}");
                failed += n as u64;
            }
            i += n;
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantic_convention_resource_keys() {
        let v = serde_json::json!({
            "host": "h1", "node": "n1",
            "process": {"pid": 42, "exe": "/bin/app", "container_id": "abc",
                        "k8s": {"namespace": "shop", "pod": "cart-1", "pod_uid": "u", "container": "app"}}
        });
        let keys: Vec<&str> = resource_of(&v).iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "service.name",
                "host.name",
                "k8s.node.name",
                "k8s.namespace.name",
                "k8s.pod.name",
                "k8s.pod.uid",
                "k8s.container.name",
                "container.id",
                "process.pid",
                "process.executable.path"
            ]
        );
    }

    #[test]
    fn json_becomes_structured_values() {
        let v = serde_json::json!({"a": [1, "x", null, {"b": true}], "n": null, "big": u64::MAX});
        let Some(AnyValue::Map(m)) = any(&v) else {
            panic!("not a map")
        };
        assert!(!m.contains_key(&Key::new("n")));
        assert!(matches!(m.get(&Key::new("big")), Some(AnyValue::Double(_))));
        let Some(AnyValue::ListAny(l)) = m.get(&Key::new("a")) else {
            panic!("not a list")
        };
        assert_eq!(l.len(), 3, "null dropped from the list");
    }
}
