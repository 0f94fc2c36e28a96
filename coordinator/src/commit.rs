//! Writes checkpoint commits (manifest, `latest`, retention) to job outputs for the scheduler's
//! [`crate::state::Action::Commit`], off the state lock: the driver hands a commit to this module and
//! goes on; heartbeats, status and listing never wait on storage. Each commit's outcome comes back
//! as an event ([`Event::Committed`] or [`Event::CommitFailed`]), and the scheduler holds back what
//! must wait for it (the job's next generation, its success).
//!
//! The commits run on a thread with its own I/O runtime, one lane per job output: a job's commits
//! run one after another in the order they were issued, so `latest` only moves forward; different
//! jobs' commits run side by side.
//!
//! Budget: a commit has [`COMMIT_BUDGET`] of storage time, counted from its start (after the job's
//! earlier commits), for the manifest, `latest`, the listing and retention together. When it runs out
//! before `latest` moved, the commit is abandoned ([`Event::CommitFailed`]): the job keeps running,
//! its previous commit stays `latest`, and a generation waiting to resume starts from that one. When
//! it runs out during retention, the checkpoint is committed and the next commit prunes what is left.
//! A stalled store never makes the coordinator miss heartbeats: no worker is declared lost for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tracing::{error, info, warn};
use xvlm_proto::checkpoint::{CheckpointDir, Manifest};
use xvlm_proto::storage::{self, Located};

use crate::error::CoordError;
use crate::http::metrics::Metrics;
use crate::state::Event;

/// Storage time of one commit (manifest, `latest`, listing and retention), from its start.
pub const COMMIT_BUDGET: Duration = Duration::from_secs(60);

/// One commit, as the scheduler issued it.
#[derive(Clone, Debug)]
pub struct CommitRequest {
    /// Job.
    pub job: String,
    /// Its output URL.
    pub output: String,
    /// The manifest of every rank's part.
    pub manifest: Manifest,
    /// Committed checkpoints to keep.
    pub keep_last: u32,
    /// The on-demand request it serves (0: none).
    pub request: u64,
}

/// Where a commit's outcome goes (the driver dispatches it to the scheduler).
type Report = Arc<dyn Fn(Event) + Send + Sync>;

/// A handle to the commit thread.
pub struct Committer {
    tx: mpsc::UnboundedSender<CommitRequest>,
}

impl Committer {
    /// Starts the commit thread; `report` gets each commit's outcome, on that thread, and `metrics`
    /// counts it (`xvlm_checkpoint_commit*`).
    pub fn spawn(
        metrics: Arc<Metrics>,
        report: impl Fn(Event) + Send + Sync + 'static,
    ) -> Result<Committer, CoordError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CoordError::Server(format!("cannot start the commit runtime: {e}")))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<CommitRequest>();
        let report: Report = Arc::new(report);
        std::thread::Builder::new()
            .name("xvlm-commit".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut lanes: HashMap<String, mpsc::UnboundedSender<CommitRequest>> =
                        HashMap::new();
                    while let Some(req) = rx.recv().await {
                        let lane = lanes.entry(req.output.clone()).or_insert_with(|| {
                            lane(req.output.clone(), report.clone(), metrics.clone())
                        });
                        if let Err(mpsc::error::SendError(req)) = lane.send(req) {
                            report(failed(&req, "the commit lane is gone".into()));
                        }
                    }
                })
            })
            .map_err(|e| CoordError::Server(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx })
    }

    /// Queues a commit; its outcome is reported later. Never blocks.
    pub fn submit(&self, req: CommitRequest) {
        if let Err(mpsc::error::SendError(req)) = self.tx.send(req) {
            error!(
                job = req.job,
                step = req.manifest.step,
                "checkpoint not committed: the commit thread is gone"
            );
        }
    }
}

/// The lane of one job output: runs its commits one at a time, in order.
fn lane(
    output: String,
    report: Report,
    metrics: Arc<Metrics>,
) -> mpsc::UnboundedSender<CommitRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<CommitRequest>();
    tokio::spawn(async move {
        let mut store: Option<Located> = None;
        while let Some(req) = rx.recv().await {
            if store.is_none() {
                match storage::open(&output, &[]) {
                    Ok(located) => store = Some(located),
                    Err(e) => {
                        report(failed(&req, e.reason));
                        continue;
                    }
                }
            }
            let Some(located) = store.as_ref() else {
                continue;
            };
            let started = Instant::now();
            let outcome = commit(located, &req).await;
            match &outcome {
                Event::Committed { .. } => {
                    let bytes = req.manifest.files.iter().map(|f| f.size).sum();
                    metrics.committed(&req.job, bytes, started.elapsed());
                }
                _ => metrics.commit_failed(&req.job, started.elapsed()),
            }
            report(outcome);
        }
    });
    tx
}

/// Runs one commit within [`COMMIT_BUDGET`]; returns the event that reports it.
async fn commit(located: &Located, req: &CommitRequest) -> Event {
    let dir = CheckpointDir {
        store: located.store.as_ref(),
        root: &located.path,
    };
    let deadline = Instant::now() + COMMIT_BUDGET;
    let budget = COMMIT_BUDGET.as_secs();
    match timeout_at(deadline, dir.publish(&req.manifest)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return failed(req, e.to_string()),
        Err(_) => {
            return failed(
                req,
                format!("storage did not finish it within its {budget} s budget"),
            )
        }
    }
    let (step, keep_last) = (req.manifest.step, req.keep_last);
    let removed = match timeout_at(deadline, dir.retain(step, keep_last)).await {
        Ok(Ok(removed)) => removed,
        Ok(Err(e)) => {
            warn!(job = req.job, step, error = %e, "checkpoint retention failed; the next commit prunes");
            Vec::new()
        }
        Err(_) => {
            warn!(
                job = req.job,
                step, "checkpoint retention ran out of the {budget} s commit budget; the next commit prunes"
            );
            Vec::new()
        }
    };
    info!(
        job = req.job,
        step,
        request = req.request,
        output = req.output,
        ?removed,
        "checkpoint committed"
    );
    Event::Committed {
        job: req.job.clone(),
        step,
        request: req.request,
    }
}

/// The event of an abandoned commit, logged.
fn failed(req: &CommitRequest, reason: String) -> Event {
    let err = CoordError::Commit {
        output: req.output.clone(),
        step: req.manifest.step,
        reason,
    };
    error!(job = req.job, step = req.manifest.step, error = %err, "checkpoint not committed");
    Event::CommitFailed {
        job: req.job.clone(),
        step: req.manifest.step,
        reason: err.to_string(),
    }
}
