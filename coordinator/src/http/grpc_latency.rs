//! A tower layer in front of both gRPC services that times every request to its response headers
//! into `xvlm_grpc_request_duration_seconds{service, method}`. For the streaming calls (Heartbeat,
//! Watch) that is the time to open the stream, not its life. Refused calls (a wrong token) are
//! timed too: the layer sits outside the interceptors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{Request, Response};
use tower::{Layer, Service};

use super::metrics::Metrics;

/// Wraps a service in [`GrpcLatency`].
#[derive(Clone, Debug)]
pub struct GrpcLatencyLayer {
    metrics: Arc<Metrics>,
}

impl GrpcLatencyLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        GrpcLatencyLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcLatencyLayer {
    type Service = GrpcLatency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcLatency {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The timing service (see the module docs).
#[derive(Clone, Debug)]
pub struct GrpcLatency<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// `/xvlm.v1.Jobs/Submit` as (`xvlm.v1.Jobs`, `Submit`); any other path, or a method name that is
/// not a short identifier, is one `unknown` pair, so a client sending odd paths cannot grow the label
/// set much (tonic answers those UNIMPLEMENTED).
pub fn service_and_method(path: &str) -> (&str, &str) {
    let identifier = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    };
    let parsed = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(service, method)| {
            service.starts_with("xvlm.v1.") && identifier(service) && identifier(method)
        });
    parsed.unwrap_or(("unknown", "unknown"))
}

impl<S, B, R> Service<Request<B>> for GrpcLatency<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (service, method) = service_and_method(req.uri().path());
        let (service, method) = (service.to_string(), method.to_string());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            metrics.grpc_request(&service, &method, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths of our services split into service and method; anything else is `unknown`, so a
    /// client sending random paths cannot add label values.
    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            service_and_method("/xvlm.v1.Jobs/Submit"),
            ("xvlm.v1.Jobs", "Submit")
        );
        assert_eq!(
            service_and_method("/xvlm.v1.Workers/Heartbeat"),
            ("xvlm.v1.Workers", "Heartbeat")
        );
        let long = format!("/xvlm.v1.Jobs/{}", "A".repeat(65));
        for odd in [
            "/",
            "",
            "/grpc.health.v1.Health/Check",
            "/xvlm.v1.Jobs",
            "/xvlm.v1.Jobs/Sub mit",
            "/xvlm.v1.Jobs/",
            &long,
        ] {
            assert_eq!(service_and_method(odd), ("unknown", "unknown"), "{odd}");
        }
    }
}
