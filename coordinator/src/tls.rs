//! The coordinator's TLS identity: its certificate and key from PEM files and, for mutual TLS, the CA
//! that signs worker client certificates.
//!
//! Jobs and Workers share one port, so the TLS layer cannot demand a client certificate without
//! locking out users of the Jobs API. With a client CA configured the handshake therefore *accepts*
//! connections without a client certificate but *rejects* any certificate that CA did not sign; the
//! Workers service then refuses calls from connections that presented none ([`crate::auth`]).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::CoordError;

/// PEM files of the server's TLS setup.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Server certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA whose signature worker client certificates must carry (mutual TLS); none: no client
    /// certificates are asked for.
    pub client_ca: Option<PathBuf>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, CoordError> {
    std::fs::read(path).map_err(|e| CoordError::Tls(format!("{what} {}: {e}", path.display())))
}

impl ServerTls {
    /// Reads the files into tonic's server TLS configuration. The PEM contents are parsed when the
    /// server starts, whose error names the problem; here a missing file is named.
    pub fn load(&self) -> Result<ServerTlsConfig, CoordError> {
        let identity = Identity::from_pem(
            read("--tls-cert", &self.cert)?,
            read("--tls-key", &self.key)?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?))
                // Users of the Jobs API on the same port have no client certificate (module docs).
                .client_auth_optional(true);
        }
        Ok(config)
    }

    /// Whether worker client certificates are required.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }
}
