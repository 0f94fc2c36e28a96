//! Who may call: a tonic interceptor in front of each service that checks the caller's
//! `authorization: Bearer <token>` against the service's token (constant time,
//! [`Token::check_bearer`]) and, on the Workers
//! service under mutual TLS, that the connection presented a client certificate. It sits outside the
//! state machine: a refused call never reaches the services.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::warn;
use xvlm_proto::security::Token;

/// The check in front of one service.
#[derive(Clone, Debug)]
pub struct Guard {
    /// `Jobs` or `Workers`, for the log line and the error.
    service: &'static str,
    /// The token callers must present; none: any caller.
    token: Option<Arc<Token>>,
    /// Whether the connection must carry a verified client certificate (the TLS layer has already
    /// rejected certificates of other CAs; this rejects connections without one).
    client_cert: bool,
}

impl Guard {
    /// A guard for `service` with its token and client-certificate rule.
    pub fn new(service: &'static str, token: Option<Token>, client_cert: bool) -> Guard {
        Guard {
            service,
            token: token.map(Arc::new),
            client_cert,
        }
    }

    /// Logs the refusal (peer and reason, never a token) and builds the status.
    fn refuse<T>(&self, req: &Request<T>, reason: String) -> Status {
        warn!(
            service = self.service,
            peer = ?req.remote_addr(),
            reason,
            "refused an unauthenticated call"
        );
        Status::unauthenticated(format!("{} API: {reason}", self.service))
    }
}

impl Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.client_cert && req.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(self.refuse(&req, "a client certificate is required (mutual TLS)".into()));
        }
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        expected
            .check_bearer(authorization)
            .map_err(|reason| self.refuse(&req, reason.to_string()))?;
        Ok(req)
    }
}
