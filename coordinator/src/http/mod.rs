//! The coordinator's HTTP listener (`--http-listen`): `GET /metrics` in the Prometheus (OpenMetrics)
//! text format now; a read-only dashboard is meant to share it. It is protected as the Jobs API is
//! (README: Security): TLS with the coordinator's certificate when it has one, the user token as
//! `authorization: Bearer <token>` when one is configured (checked by [`Token::check_bearer`], the
//! gRPC guard's check), and the same loopback rule ([`Security::check_listen`]).
//!
//! - `metrics`: the collector and the event families.
//! - `grpc_latency`: the tower layer timing the gRPC services into `metrics`.
//! - `tls`: handshakes off the accept path.
//! - `mod.rs` (this file): routing, the token check and the server.

pub mod grpc_latency;
pub mod metrics;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::Router;
use tokio::net::TcpListener;
use tracing::warn;
use xvlm_proto::security::Token;

use crate::dashboard::{committed_steps, render_job, render_overview, PageSource};
use crate::error::CoordError;
use crate::security::Security;
use metrics::Metrics;

/// The OpenMetrics text format's content type (what Prometheus asks for first).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct App {
    metrics: Arc<Metrics>,
    /// The dashboard's content.
    pages: Arc<dyn PageSource>,
    /// The user token every request must carry; none: open (loopback, or `--insecure`).
    token: Option<Arc<Token>>,
}

/// The client's address, for the refusal's log line (plain and TLS connections alike).
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, tls::TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tls::TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Refuses requests without the user token (401, logged with the peer, never the token).
async fn require_token(
    State(app): State<App>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &app.token {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(reason) = token.check_bearer(authorization) {
            warn!(%peer, path = req.uri().path(), %reason, "refused an unauthenticated HTTP request");
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{reason}\n"),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// The dashboard's front page.
async fn get_overview(State(app): State<App>) -> Response {
    Html(render_overview(&app.pages.overview())).into_response()
}

/// A job's dashboard page; 404 naming an unknown job.
async fn get_job(State(app): State<App>, Path(id): Path<String>) -> Response {
    let Some(mut page) = app.pages.job_page(&id) else {
        return (StatusCode::NOT_FOUND, format!("no job {id:?}\n")).into_response();
    };
    page.checkpoints = committed_steps(&page.status.output).await;
    Html(render_job(&page)).into_response()
}

async fn get_metrics(State(app): State<App>) -> Response {
    match app.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// The routes with the token check in front of every one of them.
fn router(metrics: Arc<Metrics>, pages: Arc<dyn PageSource>, token: Option<Token>) -> Router {
    let app = App {
        metrics,
        pages,
        token: token.map(Arc::new),
    };
    Router::new()
        .route("/", get(get_overview))
        .route("/jobs/{id}", get(get_job))
        .route("/metrics", get(get_metrics))
        .layer(middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app)
}

/// Serves the HTTP listener until `shutdown`: TLS when `security` has a certificate, the user token
/// when it has one; a non-loopback address without them is refused as on the gRPC port.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pages: Arc<dyn PageSource>,
    security: &Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    let addr = listener
        .local_addr()
        .map_err(|e| CoordError::Server(format!("HTTP listener address: {e}")))?;
    security.check_listen(addr)?;
    let app = router(metrics, pages, security.user_token.clone())
        .into_make_service_with_connect_info::<Peer>();
    let result = match &security.tls {
        Some(server_tls) => {
            let tls_listener = tls::TlsListener::new(listener, server_tls)?;
            axum::serve(tls_listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    result.map_err(|e| CoordError::Server(format!("HTTP listener {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Snapshot;

    use crate::dashboard::Overview;

    /// A request to the running server; returns the status line and body.
    async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    async fn start(security: Security) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new(Snapshot::default));
        metrics.grpc_request("xvlm.v1.Jobs", "Get", std::time::Duration::from_millis(1));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(
                listener,
                metrics,
                Arc::new(Overview::default()),
                &security,
                async {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
        });
        (addr, tx)
    }

    /// With a user token, /metrics answers 401 without it or with a wrong one, and the metrics with
    /// it; without a token (loopback) it is open; unknown paths are 404.
    #[tokio::test]
    async fn metrics_need_the_user_token_when_one_is_set() {
        let security = Security {
            user_token: Some(Token::new("u-token", "test").unwrap()),
            ..Security::default()
        };
        let (addr, _stop) = start(security).await;
        let (status, _) = get(addr, "/metrics", None).await;
        assert!(status.contains(" 401 "), "{status}");
        let (status, body) = get(addr, "/metrics", Some("other")).await;
        assert!(
            status.contains(" 401 ") && body.contains("wrong token"),
            "{status} {body}"
        );
        let (status, body) = get(addr, "/metrics", Some("u-token")).await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            body.contains("xvlm_grpc_request_duration_seconds_count"),
            "{body}"
        );
        let (open, _stop) = start(Security::default()).await;
        let (status, body) = get(open, "/metrics", None).await;
        assert!(
            status.contains(" 200 ") && body.contains("xvlm_jobs"),
            "{status}"
        );
        let (status, _) = get(open, "/nothing", None).await;
        assert!(status.contains(" 404 "), "{status}");
    }

    /// A non-loopback address without TLS and tokens is refused, as on the gRPC port.
    #[tokio::test]
    async fn non_loopback_needs_protection() {
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let metrics = Arc::new(Metrics::new(Snapshot::default));
        let err = serve(
            listener,
            metrics,
            Arc::new(Overview::default()),
            &Security::default(),
            async {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CoordError::Insecure { .. }), "{err}");
    }
}
