//! What the coordinator records about a job: its lifecycle state, rank assignments and progress. A
//! [`JobRecord`] is what the store persists; everything here is data with no scheduling logic.

use serde::{Deserialize, Serialize};
use xvlm_proto::spec::{Backend, JobSpec};

/// Unix milliseconds; passed in so tests control time.
pub type Millis = u64;

/// Where a job is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for workers.
    Pending,
    /// Ranks assigned; collecting socket addresses and the NCCL id.
    Rendezvous,
    /// Trainers are running.
    Running,
    /// A generation failed; waiting for its trainers to stop and for workers for the next one.
    Restarting,
    /// Every rank finished.
    Succeeded,
    /// Failed past `max_restarts`.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Upper-case name as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Rendezvous => "RENDEZVOUS",
            JobState::Running => "RUNNING",
            JobState::Restarting => "RESTARTING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }
}

/// One rank of the current generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankAssignment {
    /// Global rank.
    pub rank: u32,
    /// Worker hosting it.
    pub worker: String,
    /// Index among the worker's ranks.
    pub local_rank: u32,
    /// Device ordinal or CPU slot.
    pub device: u32,
    /// Ring socket address, once the worker prepared the rank.
    pub ring_address: Option<String>,
    /// Exit code once the trainer ended.
    pub exit: Option<i32>,
}

/// The latest progress report of rank 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressInfo {
    /// Steps done.
    pub step: u64,
    /// Named losses at that step.
    pub losses: Vec<(String, f64)>,
    /// Learning rate.
    pub lr: f64,
    /// Global samples per second.
    pub samples_per_sec: f64,
    /// When it arrived.
    pub at_ms: Millis,
    /// First report of this generation (step, time), for the ETA.
    pub first: Option<(u64, Millis)>,
    /// Steps the job runs as the trainer reported them (0: not reported).
    #[serde(default)]
    pub total_steps: u64,
}

/// The latest evaluation results of a job, as rank 0 reported them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The step they were reported at.
    pub step: u64,
    /// Named results (`val.r_mean`, `test.txt_r1`, `epoch`, ...) in the trainer's order.
    pub metrics: Vec<(String, f64)>,
    /// When they arrived.
    pub at_ms: Millis,
}

/// Everything the coordinator knows about a job; what the store persists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `job-0001`.
    pub id: String,
    /// Submission order.
    pub seq: u64,
    /// The validated spec.
    pub spec: JobSpec,
    /// Lifecycle state.
    pub state: JobState,
    /// Current generation (0 before the first one forms).
    pub generation: u64,
    /// Restarts used.
    pub restarts: u32,
    /// Ranks of the current generation.
    pub ranks: Vec<RankAssignment>,
    /// The backend chosen for the current generation.
    pub backend: Backend,
    /// NCCL unique id from rank 0 (empty for the ring).
    #[serde(default)]
    pub nccl_id: Vec<u8>,
    /// Latest progress.
    pub progress: Option<ProgressInfo>,
    /// Latest evaluation results; kept across generations.
    #[serde(default)]
    pub evaluation: Option<Evaluation>,
    /// Why it failed or was cancelled.
    pub message: String,
    /// Output URL.
    pub output: String,
    /// Data shard files (listed at submit), partitioned across ranks per generation.
    pub files: Vec<String>,
    /// Step of the newest committed checkpoint (0: none); it only ever increases.
    #[serde(default)]
    pub checkpoint_step: u64,
    /// The newest commit, (generation, step): parts of it or of an older step of that generation
    /// that workers report again (after a coordinator restart too) are not committed again.
    #[serde(default)]
    pub last_commit: Option<(u64, u64)>,
    /// On-demand checkpoint requests issued so far (the last request id).
    #[serde(default)]
    pub checkpoint_requests: u64,
    /// Highest request id whose checkpoint is committed.
    #[serde(default)]
    pub checkpoint_requests_served: u64,
    /// The generation asked to checkpoint and leave so that the job grows (0: none).
    #[serde(default)]
    pub growing: u64,
    /// Steps the job runs as its trainers' schedule fixes them (their progress reports; 0 until the
    /// first), kept across generations.
    #[serde(default)]
    pub reported_total_steps: u64,
    /// Submission time.
    pub submitted_at_ms: Millis,
    /// Last change.
    pub updated_at_ms: Millis,
}

impl JobRecord {
    /// Ranks in this generation.
    pub fn world_size(&self) -> u32 {
        self.ranks.len() as u32
    }

    /// Steps the job runs: the spec's `steps`, else what its trainers' schedule fixes (0 until they
    /// report it).
    pub fn total_steps(&self) -> u64 {
        self.spec.steps.unwrap_or(self.reported_total_steps)
    }

    /// Seconds until the last step at the pace seen in this generation.
    pub fn eta_seconds(&self) -> Option<f64> {
        let p = self.progress.as_ref()?;
        let (step0, t0) = p.first?;
        let steps = p.step.checked_sub(step0).filter(|s| *s > 0)?;
        let secs = (p.at_ms.saturating_sub(t0)) as f64 / 1000.0;
        let remaining = self.total_steps().saturating_sub(p.step) as f64;
        Some(remaining * secs / steps as f64)
    }

    /// Waiting for a generation to form: never started, or between generations.
    pub(super) fn waiting(&self) -> bool {
        matches!(self.state, JobState::Pending | JobState::Restarting)
    }
}
