//! The client side of the coordinator's transport security, shared by the `xvlm-coord` CLI and the
//! worker daemon: bearer tokens read from a file or an environment variable, TLS trust (`--tls-ca`)
//! and an optional client identity (mutual TLS) from PEM files, and the channel built from them.

use std::fmt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// Environment variable holding the user token (Jobs API) when no token file is given.
pub const USER_TOKEN_ENV: &str = "XVLM_USER_TOKEN";
/// Environment variable holding the worker token (Workers API) when no token file is given.
pub const WORKER_TOKEN_ENV: &str = "XVLM_WORKER_TOKEN";

/// What can go wrong setting up a secured connection; each variant names the file or URL involved.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A token, certificate or key file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file (`token file`, `TLS CA`, ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A token is empty or holds characters an HTTP header cannot carry.
    #[error("{source_name}: {reason}")]
    BadToken {
        /// The file or environment variable it came from.
        source_name: String,
        /// What is wrong with it (never the token itself).
        reason: &'static str,
    },
    /// The URL and the TLS settings do not fit together, or the URL is malformed.
    #[error("coordinator URL {url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What does not fit.
        reason: String,
    },
    /// The TLS handshake or connection failed.
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The transport error with its causes.
        reason: String,
    },
}

/// Why a bearer token was refused ([`Token::check_bearer`]); its text never holds a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BearerRefusal {
    /// No `authorization: Bearer ...` was sent.
    #[error("missing bearer token")]
    Missing,
    /// A token was sent and it is not the expected one.
    #[error("wrong token")]
    Wrong,
}

/// A bearer token. Its `Debug` never shows the value, so it can sit in logged configs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks a token from `source_name` (for the error): non-empty, visible ASCII only (it travels
    /// in an `authorization` header). Surrounding whitespace (a file's final newline) is dropped.
    pub fn new(value: &str, source_name: &str) -> Result<Token, SecurityError> {
        let value = value.trim();
        let bad = |reason| SecurityError::BadToken {
            source_name: source_name.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("the token is empty"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the token must be visible ASCII without spaces"));
        }
        Ok(Token(value.to_string()))
    }

    /// The token's bytes, for the server's constant-time comparison.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Checks an `authorization` header value (`Bearer <token>`) against this token, in constant time
    /// in the token's bytes: a timing side channel cannot guess it byte by byte (only its length can
    /// leak, which says little about a random token). The error is the refusal's reason, in words.
    /// Every server that takes a bearer token (the gRPC services, the `/metrics` listeners) checks it
    /// here.
    pub fn check_bearer(&self, authorization: Option<&str>) -> Result<(), BearerRefusal> {
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(BearerRefusal::Missing)?;
        if bool::from(presented.as_bytes().ct_eq(self.expose())) {
            Ok(())
        } else {
            Err(BearerRefusal::Wrong)
        }
    }

    /// `Bearer <token>` as gRPC metadata.
    fn header(&self) -> AsciiMetadataValue {
        // `new` admits only visible ASCII, which is always a valid header value.
        MetadataValue::try_from(format!("Bearer {}", self.0))
            .unwrap_or_else(|_| MetadataValue::from_static(""))
    }
}

/// The token from `file` when given, else from the environment variable `env`, else none.
pub fn load_token(file: Option<&Path>, env: &str) -> Result<Option<Token>, SecurityError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
            what: "token file",
            path: path.to_path_buf(),
            source,
        })?;
        return Token::new(&text, &path.display().to_string()).map(Some);
    }
    match std::env::var(env) {
        Ok(v) => Token::new(&v, env).map(Some),
        Err(_) => Ok(None),
    }
}

/// How a client reaches the coordinator: trust, identity and token. `Default` is plaintext without
/// a token (loopback).
#[derive(Clone, Debug, Default)]
pub struct ClientSecurity {
    /// PEM CA certificate(s) that signed the coordinator's certificate; required for `https://`.
    pub ca: Option<PathBuf>,
    /// PEM client certificate presented for mutual TLS (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<Token>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The error with its whole cause chain: tonic's top-level transport error says only "transport
/// error", the TLS reason (unknown issuer, bad certificate) is further down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl ClientSecurity {
    /// The endpoint for `url`: TLS when it is `https://` (which needs `ca`), plaintext for `http://`
    /// (where TLS settings are refused rather than silently ignored).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, SecurityError> {
        let url_err = |reason: String| SecurityError::Url {
            url: url.to_string(),
            reason,
        };
        let endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|e| url_err(error_chain(&e)))?;
        let https = url.starts_with("https://");
        if !https {
            if self.ca.is_some() || self.cert.is_some() {
                return Err(url_err(
                    "TLS settings (--tls-ca, --tls-cert) need an https:// URL".into(),
                ));
            }
            return Ok(endpoint);
        }
        let ca = self.ca.as_deref().ok_or_else(|| {
            url_err(
                "https:// needs --tls-ca (the CA that signed the coordinator's certificate)".into(),
            )
        })?;
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("TLS CA", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("TLS certificate", cert)?,
                    read("TLS key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err(url_err("--tls-cert and --tls-key go together".into())),
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| url_err(error_chain(&e)))
    }

    /// Connects to `url` (TLS handshake included).
    pub async fn connect(&self, url: &str) -> Result<Channel, SecurityError> {
        self.endpoint(url)?
            .connect()
            .await
            .map_err(|e| SecurityError::Connect {
                url: url.to_string(),
                reason: error_chain(&e),
            })
    }

    /// The interceptor that adds this client's token to every call.
    pub fn bearer(&self) -> Bearer {
        Bearer(self.token.as_ref().map(Token::header))
    }
}

/// Adds `authorization: Bearer <token>` to every request (nothing without a token).
#[derive(Clone, Debug)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens are trimmed, and empty or header-breaking ones are refused without echoing them.
    #[test]
    fn tokens_are_checked_and_never_printed() {
        let t = Token::new("s3cret\n", "f").unwrap();
        assert_eq!(t.expose(), b"s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        let e = Token::new("  \n", "f").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = Token::new("a b", "XVLM_USER_TOKEN")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("XVLM_USER_TOKEN:") && !e.contains("a b"),
            "{e}"
        );
    }

    /// A bearer header passes only with exactly the token; a missing header, another scheme, a
    /// prefix or an extension of the token is refused with its reason.
    #[test]
    fn bearer_headers_are_checked() {
        let t = Token::new("s3cret", "f").unwrap();
        assert_eq!(t.check_bearer(Some("Bearer s3cret")), Ok(()));
        assert_eq!(t.check_bearer(None), Err(BearerRefusal::Missing));
        assert_eq!(
            t.check_bearer(Some("Basic s3cret")),
            Err(BearerRefusal::Missing)
        );
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Bearer ", "Bearer S3CRET"] {
            assert_eq!(
                t.check_bearer(Some(wrong)),
                Err(BearerRefusal::Wrong),
                "{wrong}"
            );
        }
    }

    /// TLS settings on an http:// URL, or https:// without a CA, are errors, not silent plaintext.
    #[test]
    fn url_and_tls_settings_must_agree() {
        let with_ca = ClientSecurity {
            ca: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert!(with_ca.endpoint("http://127.0.0.1:1").is_err());
        assert!(ClientSecurity::default()
            .endpoint("https://127.0.0.1:1")
            .is_err());
        assert!(ClientSecurity::default()
            .endpoint("http://127.0.0.1:1")
            .is_ok());
    }
}
