//! `xvlm-coord run job.yaml --local-workers N`: a coordinator and N workers on this machine, one command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tracing::info;
use xvlm_proto::spec::JobSpec;

use crate::client;
use crate::config::CoordConfig;
use crate::server;

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

/// Runs the job to its end; returns its final status.
pub async fn run(
    job: &Path,
    sets: &[String],
    workers: usize,
    use_cuda: bool,
    config: CoordConfig,
    worker_bin: &Path,
) -> Result<xvlm_proto::v1::JobStatus> {
    let spec = JobSpec::load(job, sets).with_context(|| format!("{}", job.display()))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, config, async {
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
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if !use_cuda {
            cmd.arg("--devices").arg("cpu");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", worker_bin.display()))?;
        children.push(child);
    }
    let result = async {
        let mut c = connect_retry(&url).await?;
        let job_id = client::submit(&mut c, job, sets).await?;
        println!("{job_id}");
        client::watch(&mut c, &job_id, std::io::stdout()).await
    }
    .await;
    for child in &mut children {
        terminate(child).await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    result
}

async fn connect_retry(url: &str) -> Result<client::Client> {
    let mut last = None;
    for _ in 0..50 {
        match client::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cannot connect to {url}")))
}

/// SIGTERM (the worker then stops its trainers), SIGKILL after 10 s.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
