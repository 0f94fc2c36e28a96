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

/// Prints a line per event until the job ends; returns its final status.
pub async fn watch(
    client: &mut Client,
    job: &str,
    mut out: impl std::io::Write,
) -> Result<v1::JobStatus> {
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
            writeln!(out, "{}", watch_line(&status))?;
            out.flush()?;
            last = Some(status);
        }
    }
    let last = last.with_context(|| format!("watch of {job} ended without any status"))?;
    if !is_terminal(&last) {
        anyhow::bail!("watch of {job} ended before the job did (coordinator gone?)");
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

/// The state's upper-case name.
pub fn state_name(s: &v1::JobStatus) -> &'static str {
    match v1::JobState::try_from(s.state).unwrap_or(v1::JobState::Unspecified) {
        v1::JobState::Unspecified => "UNKNOWN",
        v1::JobState::Pending => "PENDING",
        v1::JobState::Rendezvous => "RENDEZVOUS",
        v1::JobState::Running => "RUNNING",
        v1::JobState::Restarting => "RESTARTING",
        v1::JobState::Succeeded => "SUCCEEDED",
        v1::JobState::Failed => "FAILED",
        v1::JobState::Cancelled => "CANCELLED",
    }
}

/// SUCCEEDED, FAILED or CANCELLED.
pub fn is_terminal(s: &v1::JobStatus) -> bool {
    matches!(state_name(s), "SUCCEEDED" | "FAILED" | "CANCELLED")
}

fn losses(p: &v1::Progress) -> String {
    if p.losses.is_empty() {
        return "-".into();
    }
    p.losses
        .iter()
        .map(|l| format!("{}={:.4}", l.name, l.value))
        .collect::<Vec<_>>()
        .join(" ")
}

fn eta(p: &v1::Progress) -> String {
    if p.eta_seconds <= 0.0 {
        return "-".into();
    }
    let s = p.eta_seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A metric value: whole numbers (an epoch, a count) without decimals, others to 4 places.
fn metric_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// The job's latest evaluation results, `eval@step-N: name=value ...`; `None` before any.
pub fn evaluation(s: &v1::JobStatus) -> Option<String> {
    let e = s.evaluation.as_ref().filter(|e| !e.metrics.is_empty())?;
    let metrics: Vec<String> = e
        .metrics
        .iter()
        .map(|m| format!("{}={}", m.name, metric_value(m.value)))
        .collect();
    Some(format!("eval@step-{}: {}", e.step, metrics.join(" ")))
}

/// One line of `watch` output.
pub fn watch_line(s: &v1::JobStatus) -> String {
    let p = s.progress.clone().unwrap_or_default();
    let mut line = format!(
        "{} {} gen={} world={} step={}/{} losses: {} lr={:.4} samples/s={:.1} eta={}",
        s.job_id,
        state_name(s),
        s.generation,
        s.world_size,
        p.step,
        p.total_steps,
        losses(&p),
        p.lr,
        p.samples_per_sec,
        eta(&p)
    );
    if s.checkpoint_step > 0 {
        line.push_str(&format!(" ckpt=step-{}", s.checkpoint_step));
    }
    if let Some(eval) = evaluation(s) {
        line.push_str(&format!(" {eval}"));
    }
    if s.restarts > 0 {
        line.push_str(&format!(" restarts={}", s.restarts));
    }
    if !s.message.is_empty() {
        line.push_str(&format!(" ({})", s.message));
    }
    line
}

/// The `status` table, then one line per job with evaluation results (`JOB eval@step-N: ...`).
pub fn status_table(jobs: &[v1::JobStatus]) -> String {
    let header = [
        "JOB",
        "NAME",
        "STATE",
        "GEN",
        "WORLD",
        "STEP",
        "LOSSES",
        "SAMPLES/S",
        "ETA",
        "MESSAGE",
    ];
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|s| {
            let p = s.progress.clone().unwrap_or_default();
            vec![
                s.job_id.clone(),
                s.name.clone(),
                state_name(s).to_string(),
                s.generation.to_string(),
                s.world_size.to_string(),
                format!("{}/{}", p.step, p.total_steps),
                losses(&p),
                format!("{:.1}", p.samples_per_sec),
                eta(&p),
                s.message.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let fmt = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = fmt(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&fmt(row));
    }
    for s in jobs {
        if let Some(eval) = evaluation(s) {
            out.push_str(&format!("\n{} {eval}", s.job_id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_eval() -> v1::JobStatus {
        v1::JobStatus {
            job_id: "job-0001".into(),
            name: "ft".into(),
            state: v1::JobState::Running as i32,
            evaluation: Some(v1::Evaluation {
                step: 40,
                metrics: vec![
                    v1::Metric {
                        name: "epoch".into(),
                        value: 1.0,
                    },
                    v1::Metric {
                        name: "val.r_mean".into(),
                        value: 52.31234,
                    },
                ],
            }),
            ..Default::default()
        }
    }

    /// `watch` and `status` print the latest evaluation results with their step; nothing before any.
    #[test]
    fn evaluation_is_printed_by_watch_and_status() {
        let s = status_with_eval();
        let expected = "eval@step-40: epoch=1 val.r_mean=52.3123";
        assert!(watch_line(&s).contains(expected), "{}", watch_line(&s));
        let table = status_table(std::slice::from_ref(&s));
        assert_eq!(
            table.lines().last(),
            Some(format!("job-0001 {expected}").as_str())
        );
        let plain = v1::JobStatus {
            evaluation: None,
            ..s
        };
        assert!(!watch_line(&plain).contains("eval@"));
        assert_eq!(status_table(&[plain]).lines().count(), 2);
    }
}
