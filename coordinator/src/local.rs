//! `xvlm-coord run job.yaml --local-workers N`: a coordinator and N workers on this machine, one command.
//!
//! The workers never outlive `run`: each gets the parent-death signal (SIGKILL), so even a `kill -9`
//! of `run` takes them down, and their trainers with them (a worker's trainers die with it the same
//! way). SIGTERM or Ctrl-C stops `run` gracefully: the workers get SIGTERM and drain (their trainers
//! checkpoint at the next step boundary, which this coordinator still commits), and a second signal
//! kills them at once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};
use xvlm_proto::process::{die_with_parent, signal_process};
use xvlm_proto::security::{ClientSecurity, WORKER_TOKEN_ENV};
use xvlm_proto::spec::JobSpec;

use crate::client;
use crate::config::CoordConfig;
use crate::server;
use crate::watch_view::WatchView;

/// How long stopped local workers get to exit before they are killed: a draining worker waits for
/// its trainers' checkpoint up to `xvlm-worker`'s drain timeout (120 s), then stops them (5 s).
/// Workers with nothing to drain (the job is over) exit at once.
pub const WORKER_STOP_GRACE: Duration = Duration::from_secs(130);

/// The `xvlm-worker` binary: `XVLM_WORKER_BIN`, else beside this executable, else on `PATH`.
pub fn worker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("XVLM_WORKER_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("xvlm-worker")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("xvlm-worker"))
}

/// The signals that stop `run`: SIGTERM (a service manager, `kill`) and SIGINT (Ctrl-C).
struct StopSignals {
    term: Signal,
    interrupt: Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// The name of the next stop signal.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// How the job's watch ended.
enum Outcome {
    /// The job ended (or submitting or watching it failed); boxed, a status is large.
    Ended(Box<Result<xvlm_proto::v1::JobStatus>>),
    /// A stop signal came first.
    Stopped(&'static str),
    /// The coordinator itself ended first (its job store could not be opened, say).
    ServerEnded(Result<()>),
}

/// Runs the job to its end; returns its final status. A stop signal ends it early with an error.
///
/// The workers are spawned from the calling thread, and Linux delivers their parent-death signal
/// when *that thread* exits: call this on a thread that lives as long as the process (the main
/// thread under `block_on`, as `xvlm-coord` does), not from a blocking-pool thread.
pub async fn run(
    job: &Path,
    sets: &[String],
    workers: usize,
    use_cuda: bool,
    config: CoordConfig,
    client_security: &ClientSecurity,
    worker_bin: &Path,
) -> Result<xvlm_proto::v1::JobStatus> {
    let spec = JobSpec::load(job, sets).with_context(|| format!("{}", job.display()))?;
    // Before any child exists: from here on a stop signal is handled, never the default exit.
    let mut signals = StopSignals::install()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let http = match config.http_listen {
        Some(http_addr) => {
            let http = TcpListener::bind(http_addr)
                .await
                .with_context(|| format!("cannot listen on {http_addr} (--http-listen)"))?;
            Some(http)
        }
        None => None,
    };
    let url = local_url(addr, config.security.tls.is_some());
    let worker_token = config.security.worker_token.clone();
    let state_dir = config.state_dir.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(server::serve_with_http(listener, http, config, async {
        let _ = stop_rx.await;
    }));
    info!(%url, workers, "coordinator up; starting local workers");
    let mut children = Vec::new();
    for i in 0..workers {
        let mut cmd = Command::new(worker_bin);
        cmd.arg("--coordinator")
            .arg(&url)
            .arg("--name")
            .arg(format!("local-{i}"))
            .arg("--cpu-slots")
            .arg(spec.workers.devices_per_worker.to_string())
            // Under this run's own state dir, not the working directory: two runs started in one
            // folder both number their first job job-0001, and workers sharing `./xvlm-work` would
            // hand each other's trainers their assignments.
            .arg("--work-dir")
            .arg(state_dir.join("work"))
            .stdin(Stdio::null())
            // Their own process group: a terminal's Ctrl-C reaches `run` alone, which then stops
            // the workers in order (drain first) instead of every process at once.
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(cmd.as_std_mut(), libc::SIGKILL);
        if let Some(ca) = &client_security.ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        if let Some(token) = &worker_token {
            // In the environment, not on the command line other users can read in `ps`.
            cmd.env(
                WORKER_TOKEN_ENV,
                String::from_utf8_lossy(token.expose()).as_ref(),
            );
        }
        if !use_cuda {
            cmd.arg("--devices").arg("cpu");
        }
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop_workers(&mut children, &mut signals).await;
                let _ = stop_tx.send(());
                let _ = server.await;
                return Err(e).with_context(|| format!("cannot start {}", worker_bin.display()));
            }
        }
    }
    let mut job_id = None;
    let outcome = tokio::select! {
        result = submit_and_watch(&url, client_security, job, sets, &mut job_id) => Outcome::Ended(Box::new(result)),
        name = signals.next() => Outcome::Stopped(name),
        served = &mut server => Outcome::ServerEnded(server_result(served)),
    };
    if let Outcome::Stopped(name) = &outcome {
        warn!(
            "{name}: stopping the local workers (their trainers checkpoint at the next step \
             boundary; {name} again stops them at once)"
        );
    }
    stop_workers(&mut children, &mut signals).await;
    let _ = stop_tx.send(());
    if !matches!(outcome, Outcome::ServerEnded(_)) {
        let _ = server.await;
    }
    match outcome {
        Outcome::Ended(result) => *result,
        Outcome::ServerEnded(Err(e)) => Err(e.context(format!(
            "the coordinator of this run stopped (state dir {})",
            state_dir.display()
        ))),
        Outcome::ServerEnded(Ok(())) => Err(anyhow::anyhow!(
            "the coordinator of this run stopped before the job ended"
        )),
        Outcome::Stopped(name) => Err(match job_id {
            Some(id) => anyhow::anyhow!(
                "stopped by {name}: job {id} stays in the job store {} (`xvlm-coord serve \
                 --state-dir {}` and a worker resume it)",
                state_dir.display(),
                state_dir.display()
            ),
            None => anyhow::anyhow!("stopped by {name} before the job was submitted"),
        }),
    }
}

/// Submits the job (its id goes to stdout and `job_id`) and watches it to its end.
async fn submit_and_watch(
    url: &str,
    security: &ClientSecurity,
    job: &Path,
    sets: &[String],
    job_id: &mut Option<String>,
) -> Result<xvlm_proto::v1::JobStatus> {
    let mut c = connect_retry(url, security).await?;
    let id = client::submit(&mut c, job, sets).await?;
    println!("{id}");
    *job_id = Some(id.clone());
    client::watch(&mut c, &id, std::io::stdout(), WatchView::for_stdout()).await
}

/// The URL this machine's clients use: with TLS the host is `localhost` for a loopback or
/// unspecified listen address, the name a local certificate carries (an IP address would have to be
/// in the certificate as such).
fn local_url(addr: std::net::SocketAddr, tls: bool) -> String {
    if !tls {
        return format!("http://{addr}");
    }
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("https://{addr}")
    }
}

async fn connect_retry(url: &str, security: &ClientSecurity) -> Result<client::Client> {
    let mut last = None;
    for _ in 0..50 {
        match client::connect_with(url, security).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cannot connect to {url}")))
}

/// SIGTERM to every worker (each drains, then stops its trainers), SIGKILL to those still running
/// after [`WORKER_STOP_GRACE`] or at the next stop signal.
async fn stop_workers(children: &mut [Child], signals: &mut StopSignals) {
    for child in children.iter() {
        if let Some(pid) = child.id() {
            signal_process(pid, libc::SIGTERM);
        }
    }
    tokio::select! {
        _ = async {
            for child in children.iter_mut() {
                let _ = child.wait().await;
            }
        } => return,
        _ = tokio::time::sleep(WORKER_STOP_GRACE) => {
            warn!("local workers still running after {WORKER_STOP_GRACE:?}: killing them");
        }
        name = signals.next() => warn!("{name} again: killing the local workers"),
    }
    for child in children.iter_mut() {
        // SIGKILL and reap; the worker's trainers die with it (their parent-death signal).
        let _ = child.kill().await;
    }
}

/// The coordinator task's outcome as one result.
fn server_result(
    joined: std::result::Result<
        std::result::Result<(), crate::error::CoordError>,
        tokio::task::JoinError,
    >,
) -> Result<()> {
    match joined {
        Ok(served) => served.map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::Error::from(e).context("the coordinator task failed")),
    }
}
