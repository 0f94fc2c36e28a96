//! The coordinator's transport security against a real in-process server on loopback: TLS with
//! certificates made here (rcgen), bearer tokens on both services, mutual TLS on the Workers
//! service, and the rule that a non-loopback address is not served unprotected. Every refused call
//! is asserted by its status code (UNAUTHENTICATED) or by the TLS handshake failing.
//!
//! `cargo test -p xvlm-coord --test security -- --ignored --nocapture status_latency` prints the
//! control-plane latency of `status` over TLS + token against plaintext.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;
use xvlm_coord::security::Security;
use xvlm_coord::tls::ServerTls;
use xvlm_coord::{client, server, CoordConfig, CoordError};
use xvlm_proto::security::{ClientSecurity, Token};
use xvlm_proto::v1::workers_client::WorkersClient;
use xvlm_proto::{v1, PROTOCOL_VERSION};

/// A certificate authority made for one test, writing PEM files under `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = Ca {
            issuer,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        };
        std::fs::write(ca.pem(), ca.issuer.pem()).unwrap();
        ca
    }

    /// The CA certificate's PEM file.
    fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A leaf certificate for 127.0.0.1 and localhost, for a server or a client; (cert, key) files.
    fn leaf(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A coordinator serving on `listen` until dropped.
struct Coordinator {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), CoordError>>,
}

impl Coordinator {
    async fn start(dir: &Path, listen: &str, security: Security, https: bool) -> Coordinator {
        let mut config = CoordConfig::default()
            .with_state_dir(dir.join("state"))
            .with_storage(format!("file://{}", dir.join("runs").display()));
        config.security = security;
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if https { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}", addr.port());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, config, async {
            let _ = stop_rx.await;
        }));
        Coordinator {
            url,
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn token(s: &str) -> Token {
    Token::new(s, "test").unwrap()
}

/// Calls Register as worker `name`; the gRPC status on a refusal, a message on a transport failure.
async fn register(url: &str, security: &ClientSecurity) -> Result<(), String> {
    let channel = security.connect(url).await.map_err(|e| e.to_string())?;
    let mut c = WorkersClient::with_interceptor(channel, security.bearer());
    c.register(v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: "w0".into(),
        host: "127.0.0.1".into(),
        devices: vec![v1::Device {
            kind: v1::DeviceKind::Cpu as i32,
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Calls List as a user.
async fn list(url: &str, security: &ClientSecurity) -> Result<(), tonic::Status> {
    let mut c = client::connect_with(url, security)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    c.list(v1::ListJobsRequest {}).await.map(|_| ())
}

/// The full setup: TLS, both tokens, worker client certificates of their own CA.
fn full_security(server_ca: &Ca, worker_ca: &Ca) -> Security {
    let (cert, key) = server_ca.leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
    Security {
        tls: Some(ServerTls {
            cert,
            key,
            client_ca: Some(worker_ca.pem()),
        }),
        user_token: Some(token("user-secret")),
        worker_token: Some(token("worker-secret")),
        insecure: false,
    }
}

/// Without its token, with a wrong one, or with the other service's token, each API answers
/// UNAUTHENTICATED; the Workers API also wants a client certificate of its CA (none: UNAUTHENTICATED,
/// another CA's: the handshake fails); a client that does not trust the server's CA, or speaks
/// plaintext to it, gets nowhere; the right credentials get through.
#[tokio::test]
async fn calls_without_the_right_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new(dir.path(), "server");
    let worker_ca = Ca::new(dir.path(), "workers");
    let other_ca = Ca::new(dir.path(), "other");
    let coord = Coordinator::start(
        dir.path(),
        "127.0.0.1:0",
        full_security(&server_ca, &worker_ca),
        true,
    )
    .await;
    let url = coord.url.clone();
    let user = |t: Option<&str>| ClientSecurity {
        ca: Some(server_ca.pem()),
        token: t.map(token),
        ..Default::default()
    };

    // The Jobs API.
    list(&url, &user(Some("user-secret"))).await.unwrap();
    for (what, t) in [
        ("no token", None),
        ("wrong token", Some("user-secreT")),
        ("worker token", Some("worker-secret")),
    ] {
        let s = list(&url, &user(t)).await.expect_err(what);
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{what}: {s:?}");
        assert!(s.message().starts_with("Jobs API: "), "{what}: {s:?}");
        assert!(!s.message().contains("secret"), "{what}: token in {s:?}");
    }

    // The Workers API.
    let (wcert, wkey) = worker_ca.leaf("worker", ExtendedKeyUsagePurpose::ClientAuth);
    let worker = |t: &str, cert: Option<(PathBuf, PathBuf)>| {
        let (cert, key) = cert.unzip();
        ClientSecurity {
            ca: Some(server_ca.pem()),
            cert,
            key,
            token: Some(token(t)),
        }
    };
    let good_cert = || Some((wcert.clone(), wkey.clone()));
    register(&url, &worker("worker-secret", good_cert()))
        .await
        .unwrap();
    for (what, sec) in [
        ("user token", worker("user-secret", good_cert())),
        ("wrong token", worker("worker-secre", good_cert())),
        ("no client certificate", worker("worker-secret", None)),
    ] {
        let e = register(&url, &sec).await.expect_err(what);
        assert!(
            e.starts_with("Unauthenticated: Workers API: "),
            "{what}: {e}"
        );
    }
    let foreign = other_ca.leaf("intruder", ExtendedKeyUsagePurpose::ClientAuth);
    let e = register(&url, &worker("worker-secret", Some(foreign)))
        .await
        .expect_err("a client certificate of another CA");
    assert!(
        !e.starts_with("Unauthenticated"),
        "refused by TLS, not later: {e}"
    );

    // A client that trusts another CA, or talks plaintext, does not get a connection.
    let distrust = ClientSecurity {
        ca: Some(other_ca.pem()),
        token: Some(token("user-secret")),
        ..Default::default()
    };
    let s = list(&url, &distrust).await.expect_err("untrusted server");
    assert!(
        s.message().to_lowercase().contains("certificate"),
        "a certificate error: {s:?}"
    );
    let plain = url.replacen("https://", "http://", 1);
    let s = list(&plain, &ClientSecurity::default())
        .await
        .expect_err("plaintext to a TLS port");
    assert_ne!(s.code(), tonic::Code::Ok);
}

/// Plaintext without tokens is the loopback default; a non-loopback address is refused unless it
/// has TLS and both tokens, or `--insecure` (which still serves, with a warning).
#[tokio::test]
async fn only_loopback_is_served_unprotected() {
    let dir = tempfile::tempdir().unwrap();
    let open = Coordinator::start(dir.path(), "127.0.0.1:0", Security::default(), false).await;
    list(&open.url, &ClientSecurity::default()).await.unwrap();

    let dir2 = tempfile::tempdir().unwrap();
    let mut refused =
        Coordinator::start(dir2.path(), "0.0.0.0:0", Security::default(), false).await;
    let result = tokio::time::timeout(Duration::from_secs(10), &mut refused.task)
        .await
        .expect("refused at once")
        .unwrap();
    let e = result
        .expect_err("0.0.0.0 without TLS and tokens")
        .to_string();
    assert!(e.contains("refusing to listen on 0.0.0.0:"), "{e}");
    assert!(e.contains("--insecure"), "{e}");

    let dir3 = tempfile::tempdir().unwrap();
    let insecure = Security {
        insecure: true,
        ..Security::default()
    };
    let served = Coordinator::start(dir3.path(), "0.0.0.0:0", insecure, false).await;
    list(&served.url, &ClientSecurity::default()).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `status` latency on loopback: sequential List calls on one connection, and the connection set-up a
/// CLI invocation pays (TCP, TLS handshake, first call), over TLS + token against plaintext.
#[tokio::test]
#[ignore = "benchmark: prints numbers"]
async fn status_latency_tls_vs_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new(dir.path(), "server");
    let worker_ca = Ca::new(dir.path(), "workers");
    let plain = Coordinator::start(dir.path(), "127.0.0.1:0", Security::default(), false).await;
    let dir2 = tempfile::tempdir().unwrap();
    let tls = Coordinator::start(
        dir2.path(),
        "127.0.0.1:0",
        full_security(&server_ca, &worker_ca),
        true,
    )
    .await;
    let tls_client = ClientSecurity {
        ca: Some(server_ca.pem()),
        token: Some(token("user-secret")),
        ..Default::default()
    };
    let calls = 2000;
    for (name, url, sec) in [
        ("plaintext", &plain.url, ClientSecurity::default()),
        ("tls+token", &tls.url, tls_client),
    ] {
        let mut c = client::connect_with(url, &sec).await.unwrap();
        let mut times = Vec::with_capacity(calls);
        for i in 0..calls + 100 {
            let t = Instant::now();
            client::list(&mut c).await.unwrap();
            if i >= 100 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        let mut setup = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            let mut c = client::connect_with(url, &sec).await.unwrap();
            client::list(&mut c).await.unwrap();
            setup.push(t.elapsed());
        }
        setup.sort();
        println!(
            "{name}: status p50 {:?} p99 {:?} ({calls} calls); connect+first call p50 {:?} p99 {:?}",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            percentile(&setup, 0.5),
            percentile(&setup, 0.99),
        );
    }
}

/// One HTTP/1.0 GET of `/metrics` over TLS trusting `ca`; the reply, or the handshake's error.
async fn https_metrics(
    addr: std::net::SocketAddr,
    ca: &Path,
    token: &str,
) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET /metrics HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    Ok(out)
}

/// With a certificate, the HTTP listener serves `/metrics` over TLS only (with the user token), and
/// a client that does not trust the coordinator's CA fails the handshake.
#[tokio::test]
async fn metrics_listener_serves_tls_with_the_coordinator_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "server");
    let other = Ca::new(dir.path(), "other");
    let (cert, key) = ca.leaf("coord", ExtendedKeyUsagePurpose::ServerAuth);
    let security = Security {
        tls: Some(ServerTls {
            cert,
            key,
            client_ca: None,
        }),
        user_token: Some(token("u")),
        ..Security::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = std::sync::Arc::new(xvlm_coord::http::metrics::Metrics::new(
        xvlm_coord::http::metrics::Snapshot::default,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let pages = std::sync::Arc::new(xvlm_coord::dashboard::Overview::default());
        xvlm_coord::http::serve(listener, metrics, pages, &security, async {
            let _ = stopped.await;
        })
        .await
    });
    let reply = https_metrics(addr, &ca.pem(), "u").await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    assert!(reply.contains("xvlm_jobs"), "{reply}");
    let refused = https_metrics(addr, &ca.pem(), "x").await.unwrap();
    assert!(refused.contains(" 401 "), "{refused}");
    let untrusted = https_metrics(addr, &other.pem(), "u").await;
    assert!(untrusted.is_err(), "{untrusted:?}");
    // Plaintext HTTP gets no metrics out of a TLS listener.
    let plain = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nAuthorization: Bearer u\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(!plain.contains("xvlm_jobs"), "{plain}");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// An HTTP listener on a non-loopback address without TLS and tokens is refused, and the refusal
/// ends the coordinator at once (gRPC on loopback included) rather than leaving it without metrics.
#[tokio::test]
async fn an_unprotected_http_listener_stops_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordConfig::default()
        .with_state_dir(dir.path().join("state"))
        .with_storage(format!("file://{}", dir.path().join("runs").display()));
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let served = server::serve_with_http(grpc, Some(http), config, std::future::pending());
    let result = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("refused at once");
    let e = result
        .expect_err("0.0.0.0 without TLS and tokens")
        .to_string();
    assert!(e.contains("refusing to listen on 0.0.0.0:"), "{e}");
}
