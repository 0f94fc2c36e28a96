//! One trainer process from spawn to exit: its assignment file and pid file, its stdout read for
//! progress lines and checkpoint parts (other lines go to the log buffer), its stderr copied to its
//! log file and buffer, and its exit reported with the last line it logged. The daemon decides which
//! trainers run; this module runs and watches each one.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::info;
use xvlm_proto::logging::strip_terminal_escapes;
use xvlm_proto::v1;

use crate::cpu_share::TrainerThreads;
use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::process;
use crate::trainer::{Assignment, ProgressLine};
use crate::trainer_logs::{self, LineSplitter, LogKey, TrainerLogs};

/// What a supervised trainer reports to the daemon.
pub(crate) enum TrainerEvent {
    Progress(v1::RankProgress),
    Part(v1::CheckpointPart),
    Exit(v1::TrainerExit),
}

/// Where a supervised trainer's reports go.
pub(crate) struct TrainerSinks {
    /// Progress, checkpoint parts and the exit, to the daemon.
    pub events: mpsc::UnboundedSender<TrainerEvent>,
    /// Trainer states and what progress lines report, for `/metrics`.
    pub metrics: Arc<WorkerMetrics>,
    /// Log lines for the coordinator.
    pub logs: TrainerLogs,
}

/// Starts the trainer of `assignment` in `dir` (handing it the rank's ring `listener`) and supervises
/// it until it exits; returns its pid (also its process group).
pub(crate) fn launch(
    exe: &Path,
    dir: &Path,
    assignment: Assignment,
    listener: Option<OwnedFd>,
    threads: TrainerThreads,
    sinks: TrainerSinks,
) -> Result<u32, WorkerError> {
    let (mut child, pid) = spawn(
        exe,
        dir,
        &assignment,
        listener.as_ref(),
        threads.passive_wait,
    )?;
    let rank = assignment.rank as u32;
    info!(
        job = assignment.job_id,
        generation = assignment.generation,
        rank,
        pid,
        threads = threads.threads,
        passive_wait = threads.passive_wait,
        "trainer started"
    );
    sinks
        .metrics
        .trainer_started(&assignment.job_id, assignment.generation, rank, pid);
    let key = |stream| LogKey {
        job: assignment.job_id.clone(),
        generation: assignment.generation,
        rank,
        stream,
    };
    // The per-trainer log file stays as it was: the stderr copy writes it.
    let stderr = child.stderr.take().map(|stderr| {
        tokio::spawn(trainer_logs::capture_stderr(
            stderr,
            dir.join(format!("rank{rank}.log")),
            sinks.logs.clone(),
            key(v1::LogStream::Stderr),
        ))
    });
    let capture = Capture {
        logs: sinks.logs,
        stdout: key(v1::LogStream::Stdout),
        stderr,
    };
    tokio::spawn(supervise(
        child,
        pid,
        assignment,
        dir.to_path_buf(),
        sinks.events,
        sinks.metrics,
        capture,
    ));
    Ok(pid)
}

fn spawn(
    exe: &Path,
    dir: &Path,
    a: &Assignment,
    listener: Option<&OwnedFd>,
    passive_wait: bool,
) -> Result<(tokio::process::Child, u32), WorkerError> {
    std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
    let path = dir.join(format!("rank{}.json", a.rank));
    let json =
        serde_json::to_string_pretty(a).map_err(|e| WorkerError::Assignment(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| WorkerError::io(&path, e))?;
    let child = process::spawn_trainer(exe, &path, listener, passive_wait)?;
    let pid = child
        .id()
        .ok_or_else(|| WorkerError::Spawn("trainer exited at once".into()))?;
    let pid_path = dir.join(format!("rank{}.pid", a.rank));
    std::fs::write(&pid_path, pid.to_string()).map_err(|e| WorkerError::io(&pid_path, e))?;
    Ok((child, pid))
}

/// The report of a progress line of `rank` of generation `generation` of `job`.
fn rank_progress(job: &str, generation: u64, rank: u32, p: ProgressLine) -> v1::RankProgress {
    v1::RankProgress {
        job_id: job.to_string(),
        generation,
        rank,
        step: p.step,
        losses: p
            .losses
            .into_iter()
            .map(|(name, value)| v1::Loss { name, value })
            .collect(),
        lr: p.lr,
        lrs: p.lrs,
        grad_norm: p.grad_norm,
        samples_per_sec: p.samples_per_sec,
        total_steps: p.total_steps,
        metrics: p
            .metrics
            .into_iter()
            .map(|(name, value)| v1::Metric { name, value })
            .collect(),
    }
}

/// Longest stdout line read whole: progress lines carry checkpoint file lists.
const MAX_STDOUT_LINE: usize = 4 << 20;

/// Where a trainer's log lines go.
struct Capture {
    logs: TrainerLogs,
    /// The key of its stdout lines.
    stdout: LogKey,
    /// The task copying its stderr, which ends when the trainer closed it.
    stderr: Option<tokio::task::JoinHandle<()>>,
}

/// Forwards the trainer's progress lines (its other stdout lines go to the log buffer), then its
/// exit, once its stderr is read to the end; kills whatever is left of its group.
async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    a: Assignment,
    dir: PathBuf,
    tx: mpsc::UnboundedSender<TrainerEvent>,
    metrics: Arc<WorkerMetrics>,
    capture: Capture,
) {
    if let Some(mut stdout) = child.stdout.take() {
        let mut split = LineSplitter::new(MAX_STDOUT_LINE);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let (lines, end) = match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => (split.finish().into_iter().collect(), true),
                Ok(n) => (split.push(&buf[..n]), false),
            };
            for line in lines {
                match serde_json::from_str::<ProgressLine>(&line) {
                    Ok(mut p) => {
                        metrics.observe(&a.job_id, a.rank as u32, &p);
                        let parts = std::mem::take(&mut p.parts);
                        let progress = rank_progress(&a.job_id, a.generation, a.rank as u32, p);
                        let _ = tx.send(TrainerEvent::Progress(progress));
                        for part in &parts {
                            let _ = tx.send(TrainerEvent::Part(part.to_wire(&a.job_id)));
                        }
                    }
                    Err(_) => {
                        info!(rank = a.rank, "trainer: {line}");
                        let line = trainer_logs::stdout_line(&line);
                        capture.logs.lock().push(&capture.stdout, line);
                    }
                }
            }
            if end {
                break;
            }
        }
    }
    let code = match child.wait().await {
        Ok(status) => status
            .code()
            .unwrap_or_else(|| -status.signal().unwrap_or(0)),
        Err(_) => -1,
    };
    process::signal_group(pid, libc::SIGKILL);
    if let Some(stderr) = capture.stderr {
        // The log file is complete (for the failure message) and every line buffered.
        let _ = stderr.await;
    }
    let message = if code == 0 {
        String::new()
    } else {
        last_error_line(&dir.join(format!("rank{}.log", a.rank)))
    };
    let _ = tx.send(TrainerEvent::Exit(v1::TrainerExit {
        job_id: a.job_id,
        generation: a.generation,
        rank: a.rank as u32,
        code,
        message,
    }));
}

/// The last non-empty line of a trainer log, for the job's failure message: plain text (a log written
/// with colours, by an older build or a library, would put escape codes into every status table) and
/// at most 300 characters of it.
fn last_error_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .map(strip_terminal_escapes)
                .find(|l| !l.trim().is_empty())
        })
        .map(|l| l.trim().chars().take(300).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> v1::RankProgress {
        let p: ProgressLine = serde_json::from_str(json).unwrap();
        rank_progress("job-0001", 2, 0, p)
    }

    /// The failure message quotes the log's last line as plain text: colour codes go, a line that is
    /// only escape codes does not count, the quote is capped at 300 characters.
    #[test]
    fn last_error_line_is_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank0.log");
        let coloured = "\u{1b}[2m2026-12-03T10:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m task failed: out of memory";
        std::fs::write(&path, format!("first\n{coloured}\n\u{1b}[0m\n\n")).unwrap();
        assert_eq!(
            last_error_line(&path),
            "2026-12-03T10:00:00Z ERROR task failed: out of memory"
        );
        std::fs::write(&path, format!("\u{1b}[1m{}\n", "x".repeat(400))).unwrap();
        assert_eq!(last_error_line(&path), "x".repeat(300));
        assert_eq!(last_error_line(&dir.path().join("none.log")), "");
    }

    /// A progress line's metrics, group lrs and grad norm reach the report; a line without them
    /// still parses (older trainers) and writes no `metrics` key.
    #[test]
    fn progress_lines_reach_the_report() {
        let eval = line(
            r#"{"step":3,"losses":[["itc",0.5]],"lr":0.1,"samples_per_sec":8.0,"metrics":[["epoch",0.0],["val.r_mean",41.5]]}"#,
        );
        let names: Vec<(&str, f64)> = eval
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.value))
            .collect();
        assert_eq!(names, vec![("epoch", 0.0), ("val.r_mean", 41.5)]);
        let next = line(r#"{"step":4,"losses":[["itc",0.4]],"lr":0.1,"samples_per_sec":8.0}"#);
        assert!(next.metrics.is_empty() && next.lrs.is_empty() && next.grad_norm.is_none());
        let grouped = line(
            r#"{"step":5,"losses":[],"lr":0.1,"lrs":[0.1,0.1,0.5,0.5],"grad_norm":2.5,"samples_per_sec":8.0}"#,
        );
        assert_eq!(
            (grouped.lrs.clone(), grouped.grad_norm),
            (vec![0.1, 0.1, 0.5, 0.5], Some(2.5))
        );
        let plain = ProgressLine {
            step: 1,
            losses: vec![],
            lr: 0.0,
            lrs: vec![],
            grad_norm: None,
            samples_per_sec: 0.0,
            parts: vec![],
            metrics: vec![],
            total_steps: 40,
            step_time_s: 0.0,
            allreduce_s: 0.0,
            loader_queue_depth: None,
            uploads: vec![],
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("metrics"));
        let sent = rank_progress("j", 1, 0, plain);
        assert_eq!(
            sent.total_steps, 40,
            "the schedule's total reaches the coordinator"
        );
    }
}
