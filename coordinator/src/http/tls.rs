//! TLS for the HTTP listener with the coordinator's certificate (the same `--tls-cert` / `--tls-key`
//! as the gRPC port). Handshakes run in their own tasks, each within [`HANDSHAKE_TIMEOUT`], and only
//! finished connections reach the HTTP server, so a client that stalls its handshake cannot hold
//! up anyone else's scrape.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::error::CoordError;
use crate::tls::ServerTls;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn pem_error(what: &str, path: &Path, e: impl std::fmt::Display) -> CoordError {
    CoordError::Tls(format!("{what} {}: {e}", path.display()))
}

/// The rustls server configuration of `tls` (HTTP/1.1, no client certificates: `/metrics` takes
/// the user token, as the Jobs API does).
pub fn server_config(tls: &ServerTls) -> Result<rustls::ServerConfig, CoordError> {
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| pem_error("--tls-cert", &tls.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("--tls-cert", &tls.cert, e))?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| pem_error("--tls-key", &tls.key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CoordError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CoordError::Tls(format!("--tls-cert / --tls-key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A listener yielding connections whose TLS handshake finished.
pub struct TlsListener {
    done: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `tcp` and runs each handshake with `tls`'s certificate.
    pub fn new(tcp: TcpListener, tls: &ServerTls) -> Result<TlsListener, CoordError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(tls)?));
        let local = tcp
            .local_addr()
            .map_err(|e| CoordError::Server(format!("HTTP listener address: {e}")))?;
        let (tx, done) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "HTTP TLS handshake failed"),
                        Err(_) => debug!(%peer, "HTTP TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            done,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.done.recv().await {
            Some(conn) => conn,
            // The accept task only ends when aborted, with this listener: nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
