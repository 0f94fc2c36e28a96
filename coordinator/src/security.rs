//! What protects the coordinator's port: TLS, the user and worker tokens, and the rule that decides
//! which addresses may be served without them.

use std::net::SocketAddr;

use tracing::warn;
use xvlm_proto::security::Token;

use crate::error::CoordError;
use crate::tls::ServerTls;

/// The coordinator's security settings; `Default` is plaintext without tokens, which
/// [`Security::check_listen`] allows on loopback only.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// TLS on both services; none: plaintext.
    pub tls: Option<ServerTls>,
    /// Token every Jobs call must carry; none: the Jobs API is open.
    pub user_token: Option<Token>,
    /// Token every Workers call must carry; none: the Workers API is open.
    pub worker_token: Option<Token>,
    /// Serve a non-loopback address without TLS or tokens anyway (`--insecure`).
    pub insecure: bool,
}

impl Security {
    /// What this setup lacks for a network-facing port, in words (empty when nothing).
    fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.tls.is_none() {
            missing.push("TLS (--tls-cert, --tls-key)");
        }
        if self.user_token.is_none() {
            missing.push("a user token (--user-token-file or XVLM_USER_TOKEN)");
        }
        if self.worker_token.is_none() {
            missing.push("a worker token (--worker-token-file or XVLM_WORKER_TOKEN)");
        }
        missing
    }

    /// Refuses to serve `addr` unprotected unless it is loopback: anyone who can reach a
    /// network address could otherwise submit jobs (code that runs on the workers) or pose as a
    /// worker. `--insecure` overrides with a warning (a trusted private network, a test).
    pub fn check_listen(&self, addr: SocketAddr) -> Result<(), CoordError> {
        let missing = self.missing();
        if addr.ip().is_loopback() || missing.is_empty() {
            return Ok(());
        }
        if self.insecure {
            warn!(
                %addr,
                missing = missing.join(", "),
                "--insecure: serving a non-loopback address without full protection; anyone who can \
                 reach it can submit jobs or pose as a worker"
            );
            return Ok(());
        }
        Err(CoordError::Insecure {
            addr,
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Security {
        Security {
            tls: Some(ServerTls {
                cert: "c.pem".into(),
                key: "k.pem".into(),
                client_ca: None,
            }),
            user_token: Some(Token::new("u", "t").unwrap()),
            worker_token: Some(Token::new("w", "t").unwrap()),
            insecure: false,
        }
    }

    /// Loopback is always allowed; any other address needs TLS and both tokens, or --insecure.
    #[test]
    fn only_loopback_may_be_unprotected() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(Security::default().check_listen(lo).is_ok());
        assert!(Security::default()
            .check_listen("[::1]:1".parse().unwrap())
            .is_ok());
        let e = Security::default()
            .check_listen(any)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.0.0.0:1") && e.contains("--insecure"), "{e}");
        let no_worker_token = Security {
            worker_token: None,
            ..full()
        };
        let e = no_worker_token.check_listen(any).unwrap_err().to_string();
        assert!(e.contains("worker token") && !e.contains("TLS"), "{e}");
        assert!(full().check_listen(any).is_ok());
        let insecure = Security {
            insecure: true,
            ..Security::default()
        };
        assert!(insecure.check_listen(any).is_ok());
    }
}
