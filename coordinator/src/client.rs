//! The CLI side: submit, status, watch, list, cancel over gRPC, and how job status is printed.

use std::path::Path;

use anyhow::{Context, Result};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use xvlm_proto::security::{Bearer, ClientSecurity};
use xvlm_proto::spec::JobSpec;
use xvlm_proto::v1::jobs_client::JobsClient;
use xvlm_proto::{v1, PROTOCOL_VERSION};

pub use crate::status_text::{
    eta_text, evaluation, is_terminal, state_name, status_table, watch_line,
};
use crate::watch_view::{WatchPrinter, WatchView};

/// A connected Jobs client; every call carries the user token when one is set.
pub type Client = JobsClient<InterceptedService<Channel, Bearer>>;

/// Connects to the coordinator at `url` (`http://127.0.0.1:50051`) without TLS or a token.
pub async fn connect(url: &str) -> Result<Client> {
    connect_with(url, &ClientSecurity::default()).await
}

/// Connects to the coordinator at `url` (`https://` with `security.ca`) with its token.
pub async fn connect_with(url: &str, security: &ClientSecurity) -> Result<Client> {
    let channel = security.connect(url).await?;
    Ok(JobsClient::with_interceptor(channel, security.bearer()))
}

/// Turns a gRPC error into a message without the transport noise.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Loads, validates and submits `job.yaml`; returns the job id.
pub async fn submit(client: &mut Client, path: &Path, sets: &[String]) -> Result<String> {
    let spec = JobSpec::load(path, sets).with_context(|| format!("{}", path.display()))?;
    let reply = client
        .submit(v1::SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            spec_json: spec.to_json(),
        })
        .await
        .map_err(status_error)
        .with_context(|| format!("{}: rejected by the coordinator", path.display()))?;
    Ok(reply.into_inner().job_id)
}

/// One job's status.
pub async fn get(client: &mut Client, job: &str) -> Result<v1::JobStatus> {
    Ok(client
        .get(v1::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Every job.
pub async fn list(client: &mut Client) -> Result<Vec<v1::JobStatus>> {
    Ok(client
        .list(v1::ListJobsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .jobs)
}

/// Cancels a job; returns its status after the request.
pub async fn cancel(client: &mut Client, job: &str) -> Result<v1::JobStatus> {
    Ok(client
        .cancel(v1::CancelRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Asks a running job for a checkpoint at its next step boundary.
pub async fn checkpoint(client: &mut Client, job: &str) -> Result<v1::CheckpointReply> {
    Ok(client
        .checkpoint(v1::CheckpointRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Waits until the checkpoint request `ticket` is committed; returns the committed step. Fails when the
/// job ends or restarts its generation first (the request is then dropped).
pub async fn wait_checkpoint(client: &mut Client, ticket: &v1::CheckpointReply) -> Result<u64> {
    let job = &ticket.job_id;
    let mut stream = client
        .watch(v1::WatchRequest {
            job_id: job.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = stream.next().await {
        let Some(status) = event.map_err(status_error)?.status else {
            continue;
        };
        if status.checkpoint_requests_served >= ticket.request_id {
            return Ok(status.checkpoint_step);
        }
        if is_terminal(&status) {
            anyhow::bail!(
                "job {job} ended {} before checkpoint request {} was committed",
                state_name(&status),
                ticket.request_id
            );
        }
        if status.generation != ticket.generation {
            anyhow::bail!(
                "job {job} restarted (generation {} -> {}) before checkpoint request {} was committed",
                ticket.generation,
                status.generation,
                ticket.request_id
            );
        }
    }
    anyhow::bail!("watch of {job} ended before the checkpoint was committed (coordinator gone?)")
}

/// Shows the job's statuses as they arrive (lines, or a live bar on a terminal) until the job ends;
/// returns its final status.
pub async fn watch(
    client: &mut Client,
    job: &str,
    out: impl std::io::Write,
    view: WatchView,
) -> Result<v1::JobStatus> {
    let mut printer = WatchPrinter::new(out, view);
    let last = follow(client, job, &mut printer).await;
    printer.finish()?;
    let last = last?.with_context(|| format!("watch of {job} ended without any status"))?;
    if !is_terminal(&last) {
        anyhow::bail!("watch of {job} ended before the job did (coordinator gone?)");
    }
    Ok(last)
}

/// Shows each status of the watch stream; returns the last.
async fn follow(
    client: &mut Client,
    job: &str,
    printer: &mut WatchPrinter<impl std::io::Write>,
) -> Result<Option<v1::JobStatus>> {
    let mut stream = client
        .watch(v1::WatchRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.next().await {
        let event = event.map_err(status_error)?;
        if let Some(status) = event.status {
            printer.show(&status)?;
            last = Some(status);
        }
    }
    Ok(last)
}

/// One `logs` line: `[rank R gen G err] text` (`out` for stdout lines).
pub fn log_line(l: &v1::LogLine) -> String {
    let stream = if l.stream == v1::LogStream::Stdout as i32 {
        "out"
    } else {
        "err"
    };
    format!("[rank {} gen {} {stream}] {}", l.rank, l.generation, l.text)
}

/// Prints the job's kept trainer log lines (of `rank` when given); with `follow`, then new ones
/// until the job has ended. A closed stdout (`| head`) ends it quietly.
pub async fn logs(
    client: &mut Client,
    job: &str,
    rank: Option<u32>,
    follow: bool,
    mut out: impl std::io::Write,
) -> Result<()> {
    let mut stream = client
        .logs(v1::LogsRequest {
            job_id: job.to_string(),
            rank,
            follow,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(line) = stream.next().await {
        let line = line.map_err(status_error)?;
        let written = writeln!(out, "{}", log_line(&line)).and_then(|_| out.flush());
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
