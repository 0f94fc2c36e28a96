//! The state machine's interface: the events that go in ([`Event`]), the actions that come out
//! ([`Action`]) and the commands those send to workers ([`Command`]). The driver (`server`) converts
//! between these and the wire types (`convert`); nothing here does I/O.

use xvlm_proto::checkpoint::{Manifest, Part};
use xvlm_proto::spec::{Backend, JobSpec, TaskKind};

use super::records::{JobRecord, ProgressInfo};

/// A trainer slot for a worker command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Global rank.
    pub rank: u32,
    /// Index on the worker.
    pub local_rank: u32,
    /// Device ordinal or CPU slot.
    pub device: u32,
}

/// What a worker is told to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Reserve sockets (and the NCCL id at rank 0) and answer `Ready`.
    Prepare {
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// World size.
        world: u32,
        /// Its ranks.
        slots: Vec<Slot>,
        /// Backend.
        backend: Backend,
    },
    /// Spawn the trainers.
    Start {
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// World size.
        world: u32,
        /// Its ranks.
        slots: Vec<Slot>,
        /// Ring addresses in rank order.
        peers: Vec<String>,
        /// Rank 0's NCCL id.
        nccl_id: Vec<u8>,
        /// The spec.
        spec: Box<JobSpec>,
        /// Output URL.
        output: String,
        /// Shard files per slot.
        shards: Vec<Vec<String>>,
        /// Backend.
        backend: Backend,
    },
    /// Save a committed checkpoint at the next step boundary.
    Checkpoint {
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// Request id the trainers report back with the commit.
        request: u64,
        /// Save and leave: the generation re-forms (to grow).
        leave: bool,
    },
    /// Stop (kill) the trainers of a generation.
    Stop {
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// Why.
        reason: String,
    },
}

/// What the driver must do, in order: persist first, then send and notify.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write the record to the store.
    Persist(Box<JobRecord>),
    /// Send a command to a worker.
    Send {
        /// Worker name.
        worker: String,
        /// The command.
        command: Command,
    },
    /// The job's status changed (watchers).
    Notify(String),
    /// Write the checkpoint's manifest, move `latest`, apply retention, off the state lock (the
    /// driver's commit task, `crate::commit`; a job's commits run one after another, in the order
    /// issued); then feed back [`Event::Committed`] or [`Event::CommitFailed`]. Later actions do not
    /// wait for it: the scheduler holds back what must (the job's next generation, its success).
    Commit {
        /// Job.
        job: String,
        /// Its output URL.
        output: String,
        /// The manifest of every rank's part.
        manifest: Manifest,
        /// Committed checkpoints to keep.
        keep_last: u32,
        /// The on-demand request it serves (0: none).
        request: u64,
    },
}

/// Inputs of the state machine.
#[derive(Clone, Debug)]
pub enum Event {
    /// A validated job with its listed shard files; `output_root` is the default storage.
    Submit {
        /// The spec.
        spec: Box<JobSpec>,
        /// Listed data files.
        files: Vec<String>,
        /// Default storage root (`file:///abs/runs`).
        output_root: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        job: String,
    },
    /// A worker (re-)registered.
    Register {
        /// Its name.
        name: String,
        /// Host for ring sockets.
        host: String,
        /// Slots.
        slots: u32,
        /// CUDA devices or CPU slots.
        cuda: bool,
        /// The tasks its build can run.
        tasks: Vec<TaskKind>,
    },
    /// A heartbeat with the generations whose trainers run there.
    Heartbeat {
        /// Worker.
        worker: String,
        /// It is draining.
        draining: bool,
        /// (job, generation) pairs.
        running: Vec<RunningGeneration>,
    },
    /// A rank is prepared.
    Ready {
        /// Worker.
        worker: String,
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// Rank.
        rank: u32,
        /// Ring address.
        ring_address: String,
        /// NCCL id (rank 0, NCCL backend).
        nccl_id: Vec<u8>,
        /// Preparation error, if any.
        error: Option<String>,
    },
    /// Progress of a rank.
    Progress {
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// Rank.
        rank: u32,
        /// Progress.
        progress: ProgressInfo,
        /// Evaluation results reported with this step (empty: none).
        metrics: Vec<(String, f64)>,
    },
    /// A rank uploaded its part of a checkpoint.
    Part {
        /// Job.
        job: String,
        /// The part.
        part: Part,
    },
    /// The driver committed a checkpoint ([`Action::Commit`]).
    Committed {
        /// Job.
        job: String,
        /// Its step.
        step: u64,
        /// The on-demand request it served (0: none).
        request: u64,
    },
    /// The driver could not commit a checkpoint ([`Action::Commit`]) within its storage budget:
    /// it is abandoned, and the job's previous commit stays its `latest`.
    CommitFailed {
        /// Job.
        job: String,
        /// Its step.
        step: u64,
        /// What failed.
        reason: String,
    },
    /// A user asks for a checkpoint now.
    Checkpoint {
        /// Job id.
        job: String,
    },
    /// A trainer ended.
    Exited {
        /// Worker.
        worker: String,
        /// Job.
        job: String,
        /// Generation.
        generation: u64,
        /// Rank.
        rank: u32,
        /// Exit code, -signal when killed.
        code: i32,
        /// Its last words.
        message: String,
    },
    /// The worker's heartbeat stream closed.
    Disconnected {
        /// Worker.
        worker: String,
    },
    /// Time passed: detect lost heartbeats and hung ranks.
    Tick,
}

/// Result of one event.
#[derive(Debug, Default)]
pub struct Applied {
    /// Actions for the driver.
    pub actions: Vec<Action>,
    /// The new job's id (Submit).
    pub job_id: Option<String>,
    /// The accepted checkpoint request (Checkpoint).
    pub checkpoint: Option<CheckpointTicket>,
}

/// An accepted on-demand checkpoint request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointTicket {
    /// Served once the job's `checkpoint_requests_served` reaches it.
    pub request: u64,
    /// Generation asked to save.
    pub generation: u64,
    /// Rank 0's last reported step at the request.
    pub step: u64,
}

/// A generation whose trainers run on a worker, as its heartbeat reports it.
#[derive(Clone, Debug)]
pub struct RunningGeneration {
    /// Job.
    pub job: String,
    /// Generation.
    pub generation: u64,
    /// (rank, Linux process state letter) of each trainer.
    pub processes: Vec<(u32, char)>,
}
