//! One HTTP port: `/metrics` (OpenMetrics text for Prometheus),
//! `/healthz` (the capture loop is turning) and `/readyz` (the programs
//! are attached and the sinks are up).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// The capture loop turns at least every 200 ms; this long without a turn
/// means it is stuck.
const STUCK: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let plain = "text/plain; charset=utf-8";
    match path {
        "/metrics" => text(StatusCode::OK, metrics.encode(), OPENMETRICS),
        "/healthz" => {
            let beat = metrics
                .heartbeat_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            let age = now_ms().saturating_sub(beat);
            if beat == 0 || age < STUCK.as_millis() as u64 {
                text(StatusCode::OK, "ok\n".into(), plain)
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("capture loop stuck for {age} ms\n"),
                    plain,
                )
            }
        }
        "/readyz" => {
            if metrics.ready.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n".into(), plain)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into(), plain)
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
            plain,
        ),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = respond(&metrics, req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // A client that stalls is cut off.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_readiness() {
        let m = Metrics::new();
        assert_eq!(
            respond(&m, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(respond(&m, "/readyz").status(), StatusCode::OK);
        assert_eq!(respond(&m, "/healthz").status(), StatusCode::OK);
        m.heartbeat_ms
            .store(now_ms() - 60_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            respond(&m, "/healthz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = respond(&m, "/metrics");
        assert_eq!(r.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(respond(&m, "/").status(), StatusCode::NOT_FOUND);
    }
}
