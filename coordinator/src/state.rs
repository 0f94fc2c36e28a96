//! The job state machine and scheduler: synchronous, no I/O. Events go in, actions come out; the async
//! driver (`server`) persists every `Persist` action before it sends any command, so a transition is on
//! disk before a worker acts on it.
//!
//! Lifecycle: PENDING -> RENDEZVOUS (ranks assigned, generation g) -> RUNNING -> SUCCEEDED | FAILED |
//! CANCELLED; a failure in generation g moves the job to RESTARTING (or FAILED past `max_restarts`), and
//! generation g+1 is formed once enough workers are free. Jobs wait in submission order.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use xvlm_proto::checkpoint::{Manifest, Part};
use xvlm_proto::spec::{Backend, HangSpec, JobSpec};

use crate::error::CoordError;
use crate::planner;

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
    /// Why it failed or was cancelled.
    pub message: String,
    /// Output URL.
    pub output: String,
    /// Data shard files (listed at submit), partitioned across ranks per generation.
    pub files: Vec<String>,
    /// Step of the newest committed checkpoint the trainers reported (0: none).
    #[serde(default)]
    pub checkpoint_step: u64,
    /// On-demand checkpoint requests issued so far (the last request id).
    #[serde(default)]
    pub checkpoint_requests: u64,
    /// Highest request id whose checkpoint is committed.
    #[serde(default)]
    pub checkpoint_requests_served: u64,
    /// The generation asked to checkpoint and leave so that the job grows (0: none).
    #[serde(default)]
    pub growing: u64,
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

    /// Steps the job runs.
    pub fn total_steps(&self) -> u64 {
        self.spec.steps.unwrap_or(0)
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

    fn waiting(&self) -> bool {
        matches!(self.state, JobState::Pending | JobState::Restarting)
    }
}

/// A registered node.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    /// Name (its id).
    pub name: String,
    /// Host its trainers' sockets listen on.
    pub host: String,
    /// Trainer slots (GPUs or CPU slots).
    pub slots: u32,
    /// Whether the slots are CUDA devices.
    pub cuda: bool,
    /// Last report.
    pub last_seen_ms: Millis,
    /// The generation it is serving: until every one of its ranks has exited.
    pub busy: Option<(String, u64)>,
    /// Its heartbeat stream is open (commands can reach it); set by the first heartbeat.
    pub connected: bool,
    /// It is draining (preempted): the generation its leaving ends does not count as a restart.
    pub draining: bool,
}

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
    /// Write the checkpoint's manifest, move `latest`, apply retention; then feed back
    /// [`Event::Committed`]. Later actions wait for it.
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

/// Step-progress clock of one rank of a running generation, for hang detection.
#[derive(Clone, Debug)]
struct RankClock {
    /// Last reported step (0 before the first report).
    step: u64,
    /// When the step last advanced (or the generation started running).
    at_ms: Millis,
    /// Whether the rank reported any step yet.
    stepped: bool,
    /// Recent per-step times, ms (newest last).
    step_ms: VecDeque<u64>,
    /// p99 of `step_ms`.
    p99_ms: u64,
    /// The trainer's process state letter in its worker's last heartbeat.
    process: Option<char>,
}

/// Step times kept per rank for the p99.
const STEP_TIME_WINDOW: usize = 256;

impl RankClock {
    fn new(now: Millis) -> Self {
        RankClock {
            step: 0,
            at_ms: now,
            stepped: false,
            step_ms: VecDeque::new(),
            p99_ms: 0,
            process: None,
        }
    }

    fn advance(&mut self, step: u64, now: Millis) {
        if step <= self.step && self.stepped {
            return;
        }
        if self.stepped {
            // Reports may be coalesced: the time per step over the gap.
            let per_step = now.saturating_sub(self.at_ms) / (step - self.step);
            if self.step_ms.len() == STEP_TIME_WINDOW {
                self.step_ms.pop_front();
            }
            self.step_ms.push_back(per_step);
            let mut sorted: Vec<u64> = self.step_ms.iter().copied().collect();
            sorted.sort_unstable();
            let idx = (sorted.len() * 99).div_ceil(100).saturating_sub(1);
            self.p99_ms = sorted[idx];
        }
        self.step = step;
        self.at_ms = now;
        self.stepped = true;
    }

    /// How long the rank may go without a step before it is hung.
    fn bound_ms(&self, hang: &HangSpec) -> u64 {
        if !self.stepped {
            return (hang.startup_secs * 1000.0) as u64;
        }
        let floor = (hang.min_secs * 1000.0) as u64;
        floor.max((hang.p99_factor * self.p99_ms as f64) as u64)
    }
}

/// The coordinator's whole state.
#[derive(Debug)]
pub struct Scheduler {
    jobs: BTreeMap<String, JobRecord>,
    workers: BTreeMap<String, WorkerEntry>,
    next_seq: u64,
    heartbeat_timeout_ms: Millis,
    progress_persist_ms: Millis,
    last_progress_persist: BTreeMap<String, Millis>,
    /// Step clocks of the running generation's ranks, by job.
    clocks: BTreeMap<String, BTreeMap<u32, RankClock>>,
    /// Checkpoint parts of the current generation by job and step, until every rank's is in.
    parts: BTreeMap<String, BTreeMap<u64, Vec<Part>>>,
    /// The last (generation, step) committed per job, so parts sent again are not committed twice.
    last_commit: BTreeMap<String, (u64, u64)>,
}

impl Scheduler {
    /// An empty scheduler declaring workers lost after `heartbeat_timeout_ms` without a report.
    pub fn new(heartbeat_timeout_ms: Millis) -> Self {
        Scheduler {
            jobs: BTreeMap::new(),
            workers: BTreeMap::new(),
            next_seq: 1,
            heartbeat_timeout_ms,
            progress_persist_ms: 5_000,
            last_progress_persist: BTreeMap::new(),
            clocks: BTreeMap::new(),
            parts: BTreeMap::new(),
            last_commit: BTreeMap::new(),
        }
    }

    /// Rebuilds the state from stored records after a coordinator restart. Jobs that were mid-flight
    /// lost their workers' sessions: they go to RESTARTING (not counted against `max_restarts`) and form
    /// a new generation once workers re-register; workers still running old trainers are told to stop.
    pub fn recover(&mut self, records: Vec<JobRecord>, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        for mut rec in records {
            self.next_seq = self.next_seq.max(rec.seq + 1);
            if matches!(rec.state, JobState::Rendezvous | JobState::Running) {
                rec.state = JobState::Restarting;
                rec.ranks.clear();
                rec.message = "coordinator restarted".into();
                rec.updated_at_ms = now;
                actions.push(Action::Persist(Box::new(rec.clone())));
            } else if rec.state == JobState::Restarting {
                rec.ranks.clear();
            }
            self.jobs.insert(rec.id.clone(), rec);
        }
        actions
    }

    /// Every job in submission order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        let mut v: Vec<&JobRecord> = self.jobs.values().collect();
        v.sort_by_key(|j| j.seq);
        v.into_iter()
    }

    /// One job.
    pub fn job(&self, id: &str) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// Registered workers.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Applies one event at time `now`.
    pub fn apply(&mut self, now: Millis, event: Event) -> Result<Applied, CoordError> {
        let mut out = Applied::default();
        match event {
            Event::Submit {
                spec,
                files,
                output_root,
            } => {
                out.job_id =
                    Some(self.submit(now, *spec, files, &output_root, &mut out.actions)?);
            }
            Event::Cancel { job } => self.cancel(now, &job, &mut out.actions)?,
            Event::Register {
                name,
                host,
                slots,
                cuda,
            } => {
                if self.workers.contains_key(&name) {
                    // A re-registration means its old session (and trainers) are gone.
                    self.lose_worker(now, &name, "worker re-registered", &mut out.actions);
                }
                self.workers.insert(
                    name.clone(),
                    WorkerEntry {
                        name,
                        host,
                        slots,
                        cuda,
                        last_seen_ms: now,
                        busy: None,
                        connected: false,
                        draining: false,
                    },
                );
            }
            Event::Heartbeat {
                worker,
                draining,
                running,
            } => {
                let w = self.worker_mut(&worker)?;
                w.last_seen_ms = now;
                w.connected = true;
                w.draining = draining;
                let busy = w.busy.clone();
                for RunningGeneration {
                    job,
                    generation,
                    processes,
                } in running
                {
                    if let Some(clocks) = self.clocks.get_mut(&job) {
                        let current = self
                            .jobs
                            .get(&job)
                            .is_some_and(|j| j.generation == generation);
                        for (rank, state) in processes.iter().filter(|_| current) {
                            if let Some(clock) = clocks.get_mut(rank) {
                                clock.process = Some(*state);
                            }
                        }
                    }
                    let current = self
                        .jobs
                        .get(&job)
                        .is_some_and(|j| j.generation == generation && !j.state.is_terminal());
                    if busy.as_ref() != Some(&(job.clone(), generation)) || !current {
                        out.actions.push(Action::Send {
                            worker: worker.clone(),
                            command: Command::Stop {
                                job,
                                generation,
                                reason: "stale generation".into(),
                            },
                        });
                    }
                }
            }
            Event::Ready {
                worker,
                job,
                generation,
                rank,
                ring_address,
                nccl_id,
                error,
            } => {
                self.touch(&worker, now);
                self.ready(
                    now,
                    &job,
                    generation,
                    rank,
                    ring_address,
                    nccl_id,
                    error,
                    &mut out.actions,
                );
            }
            Event::Progress {
                job,
                generation,
                rank,
                progress,
            } => self.progress(now, &job, generation, rank, progress, &mut out.actions),
            Event::Part { job, part } => self.part(&job, part, &mut out.actions),
            Event::Committed { job, step, request } => {
                self.committed(now, &job, step, request, &mut out.actions)
            }
            Event::Checkpoint { job } => {
                out.checkpoint = Some(self.request_checkpoint(now, &job, &mut out.actions)?);
            }
            Event::Exited {
                worker,
                job,
                generation,
                rank,
                code,
                message,
            } => {
                self.touch(&worker, now);
                self.exited(
                    now,
                    &job,
                    generation,
                    rank,
                    code,
                    &message,
                    &mut out.actions,
                );
            }
            Event::Disconnected { worker } => {
                if self.workers.contains_key(&worker) {
                    self.lose_worker(now, &worker, "heartbeat stream closed", &mut out.actions);
                    self.workers.remove(&worker);
                }
            }
            Event::Tick => {
                let lost: Vec<String> = self
                    .workers
                    .values()
                    .filter(|w| now.saturating_sub(w.last_seen_ms) > self.heartbeat_timeout_ms)
                    .map(|w| w.name.clone())
                    .collect();
                for name in lost {
                    self.lose_worker(now, &name, "heartbeat lost", &mut out.actions);
                    self.workers.remove(&name);
                }
                self.detect_hangs(now, &mut out.actions);
            }
        }
        self.schedule(now, &mut out.actions);
        Ok(out)
    }

    fn worker_mut(&mut self, name: &str) -> Result<&mut WorkerEntry, CoordError> {
        self.workers
            .get_mut(name)
            .ok_or_else(|| CoordError::UnknownWorker(name.to_string()))
    }

    fn touch(&mut self, worker: &str, now: Millis) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_seen_ms = now;
        }
    }

    fn submit(
        &mut self,
        now: Millis,
        spec: JobSpec,
        files: Vec<String>,
        output_root: &str,
        actions: &mut Vec<Action>,
    ) -> Result<String, CoordError> {
        spec.validate()?;
        self.check_satisfiable(&spec)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = format!("job-{seq:04}");
        let output = spec
            .output
            .clone()
            .unwrap_or_else(|| format!("{}/{id}", output_root.trim_end_matches('/')));
        let rec = JobRecord {
            id: id.clone(),
            seq,
            backend: spec.backend,
            spec,
            state: JobState::Pending,
            generation: 0,
            restarts: 0,
            ranks: Vec::new(),
            nccl_id: Vec::new(),
            progress: None,
            message: String::new(),
            output,
            files,
            checkpoint_step: 0,
            checkpoint_requests: 0,
            checkpoint_requests_served: 0,
            growing: 0,
            submitted_at_ms: now,
            updated_at_ms: now,
        };
        actions.push(Action::Persist(Box::new(rec.clone())));
        actions.push(Action::Notify(id.clone()));
        self.jobs.insert(id.clone(), rec);
        Ok(id)
    }

    /// With workers registered, a job needing more workers or devices than the cluster has can never
    /// start; refuse it at submit instead of blocking the queue forever.
    fn check_satisfiable(&self, spec: &JobSpec) -> Result<(), CoordError> {
        if self.workers.is_empty() {
            return Ok(());
        }
        let need = spec.workers.devices_per_worker;
        let most = self.workers.values().map(|w| w.slots).max().unwrap_or(0);
        if most < need {
            return Err(CoordError::Unsatisfiable {
                field: "workers.devices_per_worker".into(),
                message: format!(
                    "{need} devices per worker requested, but the largest registered worker has {most}"
                ),
            });
        }
        let able = self.workers.values().filter(|w| w.slots >= need).count() as u32;
        if able < spec.workers.min {
            return Err(CoordError::Unsatisfiable {
                field: "workers.min".into(),
                message: format!(
                    "world size {} needs {} workers with {need} device(s) each, but only {able} such worker(s) are registered",
                    spec.world_size(spec.workers.min),
                    spec.workers.min
                ),
            });
        }
        Ok(())
    }

    fn cancel(
        &mut self,
        now: Millis,
        id: &str,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoordError> {
        let job = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| CoordError::UnknownJob(id.to_string()))?;
        if job.state.is_terminal() {
            return Ok(());
        }
        let was_active = matches!(
            job.state,
            JobState::Rendezvous | JobState::Running | JobState::Restarting
        );
        job.state = JobState::Cancelled;
        job.message = "cancelled by user".into();
        job.updated_at_ms = now;
        actions.push(Action::Persist(Box::new(job.clone())));
        if was_active {
            stop_generation(job, "cancelled", actions);
        }
        actions.push(Action::Notify(id.to_string()));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ready(
        &mut self,
        now: Millis,
        id: &str,
        generation: u64,
        rank: u32,
        ring_address: String,
        nccl_id: Vec<u8>,
        error: Option<String>,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.generation != generation || job.state != JobState::Rendezvous {
            return;
        }
        if let Some(error) = error {
            self.fail_generation(
                now,
                id,
                &format!("rank {rank} could not be prepared: {error}"),
                actions,
            );
            return;
        }
        let Some(slot) = job.ranks.iter_mut().find(|r| r.rank == rank) else {
            return;
        };
        slot.ring_address = Some(ring_address);
        if rank == 0 {
            job.nccl_id = nccl_id;
        }
        if job.ranks.iter().any(|r| r.ring_address.is_none()) {
            return;
        }
        job.state = JobState::Running;
        job.updated_at_ms = now;
        job.progress = None;
        self.clocks.insert(
            id.to_string(),
            job.ranks
                .iter()
                .map(|r| (r.rank, RankClock::new(now)))
                .collect(),
        );
        actions.push(Action::Persist(Box::new(job.clone())));
        let peers: Vec<String> = job
            .ranks
            .iter()
            .map(|r| r.ring_address.clone().unwrap_or_default())
            .collect();
        let world = job.world_size();
        let plan = planner::partition(&job.files, world as usize);
        for (worker, slots) in slots_by_worker(job) {
            let shards = slots
                .iter()
                .map(|s| plan[s.rank as usize].clone())
                .collect();
            actions.push(Action::Send {
                worker,
                command: Command::Start {
                    job: id.to_string(),
                    generation,
                    world,
                    slots,
                    peers: peers.clone(),
                    nccl_id: job.nccl_id.clone(),
                    spec: Box::new(job.spec.clone()),
                    output: job.output.clone(),
                    shards,
                    backend: job.backend,
                },
            });
        }
        actions.push(Action::Notify(id.to_string()));
    }

    fn progress(
        &mut self,
        now: Millis,
        id: &str,
        generation: u64,
        rank: u32,
        mut progress: ProgressInfo,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.generation != generation || job.state != JobState::Running {
            return;
        }
        if let Some(clock) = self.clocks.get_mut(id).and_then(|c| c.get_mut(&rank)) {
            clock.advance(progress.step, now);
        }
        if rank != 0 {
            return;
        }
        progress.at_ms = now;
        progress.first = job
            .progress
            .as_ref()
            .and_then(|p| p.first)
            .or(Some((progress.step, now)));
        job.progress = Some(progress);
        job.updated_at_ms = now;
        let last = self
            .last_progress_persist
            .entry(id.to_string())
            .or_insert(0);
        if now.saturating_sub(*last) >= self.progress_persist_ms {
            *last = now;
            actions.push(Action::Persist(Box::new(job.clone())));
        }
        actions.push(Action::Notify(id.to_string()));
    }

    /// Collects a checkpoint part of the job's current generation; the step's last part commits it.
    /// Parts of other generations are dropped: an older generation's uncommitted step may be
    /// overwritten by the one resuming, and a part from a newer one cannot exist.
    fn part(&mut self, id: &str, part: Part, actions: &mut Vec<Action>) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let (step, generation) = (part.step, part.generation);
        let seen = self.last_commit.get(id);
        if generation != job.generation || seen.is_some_and(|&(g, s)| g == generation && step <= s)
        {
            return;
        }
        let steps = self.parts.entry(id.to_string()).or_default();
        steps.retain(|_, parts| parts.iter().all(|p| p.generation == generation));
        let parts = steps.entry(step).or_default();
        if parts.iter().any(|p| p.rank == part.rank) {
            return;
        }
        parts.push(part);
        if parts.len() < parts[0].world {
            return;
        }
        let parts = steps.remove(&step).unwrap_or_default();
        match Manifest::from_parts(&parts) {
            Ok(manifest) => {
                self.last_commit.insert(id.to_string(), (generation, step));
                actions.push(Action::Commit {
                    job: id.to_string(),
                    output: job.output.clone(),
                    keep_last: job.spec.checkpoint.keep_last,
                    request: parts.iter().map(|p| p.request).max().unwrap_or(0),
                    manifest,
                });
            }
            Err(e) => tracing::warn!(job = id, "checkpoint not committed: {e}"),
        }
    }

    /// The driver committed a checkpoint: it is the job's `latest` now.
    fn committed(
        &mut self,
        now: Millis,
        id: &str,
        step: u64,
        request: u64,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.checkpoint_step = step;
        job.checkpoint_requests_served = job.checkpoint_requests_served.max(request);
        job.updated_at_ms = now;
        actions.push(Action::Persist(Box::new(job.clone())));
        actions.push(Action::Notify(id.to_string()));
    }

    /// Asks the running generation for a checkpoint at its next step boundary (through rank 0's worker).
    fn request_checkpoint(
        &mut self,
        now: Millis,
        id: &str,
        actions: &mut Vec<Action>,
    ) -> Result<CheckpointTicket, CoordError> {
        let job = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| CoordError::UnknownJob(id.to_string()))?;
        if job.state != JobState::Running {
            return Err(CoordError::NotRunning {
                job: id.to_string(),
                state: job.state.as_str().to_string(),
            });
        }
        let Some(rank0) = job.ranks.iter().find(|r| r.rank == 0) else {
            return Err(CoordError::NotRunning {
                job: id.to_string(),
                state: "without rank 0".into(),
            });
        };
        let worker = rank0.worker.clone();
        job.checkpoint_requests += 1;
        job.updated_at_ms = now;
        let ticket = CheckpointTicket {
            request: job.checkpoint_requests,
            generation: job.generation,
            step: job.progress.as_ref().map(|p| p.step).unwrap_or(0),
        };
        actions.push(Action::Persist(Box::new(job.clone())));
        actions.push(Action::Send {
            worker,
            command: Command::Checkpoint {
                job: id.to_string(),
                generation: job.generation,
                request: ticket.request,
                leave: false,
            },
        });
        Ok(ticket)
    }

    /// Restarts every running generation with a rank that made no step progress within its bound.
    fn detect_hangs(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let jobs = &self.jobs;
        self.clocks
            .retain(|id, _| jobs.get(id).is_some_and(|j| j.state == JobState::Running));
        let mut hung = Vec::new();
        for (id, clocks) in &self.clocks {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if job.state != JobState::Running {
                continue;
            }
            let total = job.total_steps();
            // Peers of a stuck rank block in its collectives and stall too. Name the rank whose
            // process is stopped, else one that is busy (its peers sleep in collectives), else the
            // one that fell behind first (lowest step, then oldest progress).
            let culprit = job
                .ranks
                .iter()
                .filter(|r| r.exit.is_none())
                .filter_map(|r| Some((r, clocks.get(&r.rank)?)))
                // A rank past its last step is saving and exiting, not stepping.
                .filter(|(_, clock)| total == 0 || clock.step < total)
                .map(|(r, clock)| {
                    (
                        r,
                        clock,
                        now.saturating_sub(clock.at_ms),
                        clock.bound_ms(&job.spec.hang),
                    )
                })
                .filter(|(_, _, idle, bound)| idle > bound)
                .min_by_key(|(r, clock, _, _)| {
                    (suspicion(clock.process), clock.step, clock.at_ms, r.rank)
                });
            if let Some((r, clock, idle, bound)) = culprit {
                hung.push((
                    id.clone(),
                    format!(
                        "rank {} on {} hung{}: no step progress for {:.1} s after step {} (bound {:.1} s)",
                        r.rank,
                        r.worker,
                        process_note(clock.process),
                        idle as f64 / 1000.0,
                        clock.step,
                        bound as f64 / 1000.0
                    ),
                ));
            }
        }
        for (id, why) in hung {
            tracing::warn!(job = id, "{why}; restarting the generation");
            self.clocks.remove(&id);
            self.fail_generation(now, &id, &why, actions);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn exited(
        &mut self,
        now: Millis,
        id: &str,
        generation: u64,
        rank: u32,
        code: i32,
        message: &str,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.generation != generation {
            return;
        }
        let Some(slot) = job.ranks.iter_mut().find(|r| r.rank == rank) else {
            return;
        };
        if slot.exit.is_some() {
            return;
        }
        slot.exit = Some(code);
        let worker = slot.worker.clone();
        let worker_done = job
            .ranks
            .iter()
            .filter(|r| r.worker == worker)
            .all(|r| r.exit.is_some());
        if worker_done {
            if let Some(w) = self.workers.get_mut(&worker) {
                if w.busy.as_ref() == Some(&(id.to_string(), generation)) {
                    w.busy = None;
                }
            }
        }
        let state = job.state;
        if state == JobState::Running || state == JobState::Rendezvous {
            if code != 0 {
                let why = if message.is_empty() {
                    format!("rank {rank} exited with code {code}")
                } else {
                    format!("rank {rank} exited with code {code}: {message}")
                };
                let preempted = code == i32::from(xvlm_proto::EXIT_PREEMPTED);
                self.end_generation(now, id, &why, !preempted, actions);
            } else if job.ranks.iter().all(|r| r.exit == Some(0)) {
                job.state = JobState::Succeeded;
                job.updated_at_ms = now;
                actions.push(Action::Persist(Box::new(job.clone())));
                actions.push(Action::Notify(id.to_string()));
            }
        }
    }

    /// Stops the current generation and restarts the job or fails it.
    fn fail_generation(&mut self, now: Millis, id: &str, why: &str, actions: &mut Vec<Action>) {
        self.end_generation(now, id, why, true, actions)
    }

    /// Stops the current generation and restarts the job; a generation ended by a failure
    /// (`counted`) uses one of `max_restarts`, and fails the job when none is left. A drain's is
    /// not a failure.
    fn end_generation(
        &mut self,
        now: Millis,
        id: &str,
        why: &str,
        counted: bool,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if !matches!(job.state, JobState::Rendezvous | JobState::Running) {
            return;
        }
        if !counted || job.restarts < job.spec.max_restarts {
            job.restarts += u32::from(counted);
            job.state = JobState::Restarting;
            let ended = if counted { "failed" } else { "ended" };
            job.message = format!("generation {} {ended}: {why}", job.generation);
        } else {
            job.state = JobState::Failed;
            job.message = why.to_string();
        }
        job.updated_at_ms = now;
        actions.push(Action::Persist(Box::new(job.clone())));
        stop_generation(job, why, actions);
        actions.push(Action::Notify(id.to_string()));
    }

    fn lose_worker(&mut self, now: Millis, name: &str, why: &str, actions: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        let busy = w.busy.take();
        let draining = w.draining;
        if let Some((job_id, generation)) = busy {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                if job.generation == generation {
                    // Its ranks will never report; count them as gone so other workers free up.
                    for r in job.ranks.iter_mut().filter(|r| r.worker == name) {
                        r.exit.get_or_insert(-1);
                    }
                }
            }
            let why = if draining {
                format!("worker {name} drained: {why}")
            } else {
                format!("worker {name}: {why}")
            };
            self.end_generation(now, &job_id, &why, !draining, actions);
        }
    }

    /// Workers that can take a generation needing `slots` per worker now.
    fn free_workers(&self, slots: u32) -> Vec<String> {
        self.workers
            .values()
            .filter(|w| w.connected && !w.draining && w.busy.is_none() && w.slots >= slots)
            .map(|w| w.name.clone())
            .collect()
    }

    /// Asks one running job below `workers.max` to checkpoint and leave when free workers could
    /// join it (only when no job waits: queued jobs come first). The trainers commit, exit 75, and
    /// the next generation forms with the extra workers, resuming from that checkpoint.
    fn grow(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let candidate = self.jobs().find(|j| {
            j.state == JobState::Running
                && j.growing != j.generation
                && j.world_size() < j.spec.workers.max_workers() * j.spec.workers.devices_per_worker
                && j.progress.as_ref().is_some_and(|p| {
                    p.step > 0 && (j.total_steps() == 0 || p.step + 1 < j.total_steps())
                })
        });
        let Some(id) = candidate.map(|j| j.id.clone()) else {
            return;
        };
        let job = &self.jobs[&id];
        let free = self.free_workers(job.spec.workers.devices_per_worker);
        let Some(rank0) = job.ranks.iter().find(|r| r.rank == 0) else {
            return;
        };
        if free.is_empty() {
            return;
        }
        let (worker, generation) = (rank0.worker.clone(), job.generation);
        let job = self.jobs.get_mut(&id).expect("found above");
        job.growing = generation;
        job.message = format!(
            "growing: {} free worker(s) join at the next checkpoint",
            free.len()
        );
        job.updated_at_ms = now;
        tracing::info!(
            job = id,
            generation,
            free = free.len(),
            "growing the job: checkpoint and re-form"
        );
        actions.push(Action::Persist(Box::new(job.clone())));
        actions.push(Action::Send {
            worker,
            command: Command::Checkpoint {
                job: id.clone(),
                generation,
                request: 0,
                leave: true,
            },
        });
        actions.push(Action::Notify(id));
    }

    /// Starts the first waiting job (submission order) if enough workers are free; with none
    /// waiting, grows a shrunk one.
    fn schedule(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let Some(id) = self.jobs().find(|j| j.waiting()).map(|j| j.id.clone()) else {
            self.grow(now, actions);
            return;
        };
        let job = &self.jobs[&id];
        // A restarting job waits until its previous generation's trainers are all gone.
        if job.ranks.iter().any(|r| r.exit.is_none()) {
            return;
        }
        let need = job.spec.workers.devices_per_worker;
        let free = self.free_workers(need);
        if (free.len() as u32) < job.spec.workers.min {
            return;
        }
        let take = free.len().min(job.spec.workers.max_workers() as usize);
        let chosen = &free[..take];
        let all_cuda = chosen.iter().all(|w| self.workers[w].cuda);
        let job = self.jobs.get_mut(&id).expect("job listed above");
        job.generation += 1;
        job.state = JobState::Rendezvous;
        job.updated_at_ms = now;
        job.nccl_id.clear();
        job.backend = match job.spec.backend {
            Backend::Auto if all_cuda => Backend::Nccl,
            Backend::Auto => Backend::Ring,
            other => other,
        };
        job.ranks = chosen
            .iter()
            .enumerate()
            .flat_map(|(i, worker)| {
                (0..need).map(move |local| RankAssignment {
                    rank: i as u32 * need + local,
                    worker: worker.clone(),
                    local_rank: local,
                    device: local,
                    ring_address: None,
                    exit: None,
                })
            })
            .collect();
        let generation = job.generation;
        for worker in chosen {
            if let Some(w) = self.workers.get_mut(worker) {
                w.busy = Some((id.clone(), generation));
            }
        }
        actions.push(Action::Persist(Box::new(job.clone())));
        let world = job.world_size();
        for (worker, slots) in slots_by_worker(job) {
            actions.push(Action::Send {
                worker,
                command: Command::Prepare {
                    job: id.clone(),
                    generation,
                    world,
                    slots,
                    backend: job.backend,
                },
            });
        }
        actions.push(Action::Notify(id));
    }
}

/// How likely a stalled rank's process state makes it the cause: stopped, then busy or in I/O,
/// then anything else (sleeping ranks usually wait for a peer).
fn suspicion(process: Option<char>) -> u8 {
    match process {
        Some('T' | 't') => 0,
        Some('R' | 'D') => 1,
        _ => 2,
    }
}

/// The hang message's note on the named rank's process state.
fn process_note(process: Option<char>) -> &'static str {
    match process {
        Some('T' | 't') => " (its process is stopped)",
        Some('R') => " (its process is busy while its peers wait)",
        Some('D') => " (its process is in uninterruptible I/O)",
        Some('Z') => " (its process has exited)",
        _ => "",
    }
}

fn slots_by_worker(job: &JobRecord) -> Vec<(String, Vec<Slot>)> {
    let mut by: BTreeMap<String, Vec<Slot>> = BTreeMap::new();
    for r in &job.ranks {
        by.entry(r.worker.clone()).or_default().push(Slot {
            rank: r.rank,
            local_rank: r.local_rank,
            device: r.device,
        });
    }
    by.into_iter().collect()
}

fn stop_generation(job: &JobRecord, reason: &str, actions: &mut Vec<Action>) {
    let mut workers: Vec<&str> = job
        .ranks
        .iter()
        .filter(|r| r.exit.is_none())
        .map(|r| r.worker.as_str())
        .collect();
    workers.dedup();
    for worker in workers {
        actions.push(Action::Send {
            worker: worker.to_string(),
            command: Command::Stop {
                job: job.id.clone(),
                generation: job.generation,
                reason: reason.to_string(),
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xvlm_proto::spec::{TaskKind, WorkersSpec};

    fn spec(min: u32, devices: u32, max_restarts: u32) -> JobSpec {
        JobSpec {
            name: "t".into(),
            task: TaskKind::Smoke,
            config: None,
            overrides: Default::default(),
            init_checkpoint: None,
            output: None,
            data: Default::default(),
            workers: WorkersSpec {
                min,
                max: None,
                devices_per_worker: devices,
            },
            backend: Backend::Auto,
            steps: Some(10),
            seed: 1,
            checkpoint: Default::default(),
            max_restarts,
            hang: Default::default(),
            evaluate: false,
            smoke: None,
        }
    }

    fn submit(s: &mut Scheduler, spec: JobSpec) -> String {
        s.apply(
            0,
            Event::Submit {
                spec: Box::new(spec),
                files: vec![],
                output_root: "file:///runs".into(),
            },
        )
        .unwrap()
        .job_id
        .unwrap()
    }

    /// Registers a worker and opens its heartbeat stream.
    fn register(s: &mut Scheduler, name: &str, slots: u32) -> Vec<Action> {
        let registered = s
            .apply(
                0,
                Event::Register {
                    name: name.into(),
                    host: "127.0.0.1".into(),
                    slots,
                    cuda: false,
                },
            )
            .unwrap();
        // Nothing is scheduled onto a worker whose command stream is not open yet.
        assert!(registered
            .actions
            .iter()
            .all(|a| !matches!(a, Action::Send { .. })));
        s.apply(
            0,
            Event::Heartbeat {
                worker: name.into(),
                draining: false,
                running: vec![],
            },
        )
        .unwrap()
        .actions
    }

    fn ready_all(s: &mut Scheduler, job: &str) -> Vec<Action> {
        let rec = s.job(job).unwrap().clone();
        let mut actions = vec![];
        for r in &rec.ranks {
            actions.extend(
                s.apply(
                    1,
                    Event::Ready {
                        worker: r.worker.clone(),
                        job: job.into(),
                        generation: rec.generation,
                        rank: r.rank,
                        ring_address: format!("127.0.0.1:{}", 9000 + r.rank),
                        nccl_id: vec![],
                        error: None,
                    },
                )
                .unwrap()
                .actions,
            );
        }
        actions
    }

    fn exit_all(s: &mut Scheduler, job: &str, code: i32) {
        let rec = s.job(job).unwrap().clone();
        for r in &rec.ranks {
            s.apply(
                2,
                Event::Exited {
                    worker: r.worker.clone(),
                    job: job.into(),
                    generation: rec.generation,
                    rank: r.rank,
                    code,
                    message: String::new(),
                },
            )
            .unwrap();
        }
    }

    fn sends(actions: &[Action]) -> Vec<(&str, &Command)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { worker, command } => Some((worker.as_str(), command)),
                _ => None,
            })
            .collect()
    }

    /// The happy path: pending until workers come, rendezvous with ranks, running, succeeded, and
    /// every transition is persisted before the command that acts on it.
    #[test]
    fn lifecycle() {
        let mut s = Scheduler::new(10_000);
        let job = submit(&mut s, spec(2, 2, 0));
        assert_eq!(s.job(&job).unwrap().state, JobState::Pending);
        register(&mut s, "a", 2);
        let actions = register(&mut s, "b", 2);
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Rendezvous);
        assert_eq!(rec.generation, 1);
        assert_eq!(rec.world_size(), 4);
        assert_eq!(rec.backend, Backend::Ring);
        assert!(matches!(actions[0], Action::Persist(_)));
        let prepares = sends(&actions);
        assert_eq!(prepares.len(), 2);
        match prepares[1].1 {
            Command::Prepare { slots, world, .. } => {
                assert_eq!(*world, 4);
                assert_eq!(slots.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![2, 3]);
                assert_eq!(
                    slots.iter().map(|s| s.local_rank).collect::<Vec<_>>(),
                    vec![0, 1]
                );
            }
            other => panic!("{other:?}"),
        }
        let actions = ready_all(&mut s, &job);
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        let persist_at = actions
            .iter()
            .position(|a| matches!(a, Action::Persist(_)))
            .unwrap();
        let first_send = actions
            .iter()
            .position(|a| matches!(a, Action::Send { .. }))
            .unwrap();
        assert!(persist_at < first_send);
        match sends(&actions)[0].1 {
            Command::Start { peers, .. } => assert_eq!(peers.len(), 4),
            other => panic!("{other:?}"),
        }
        exit_all(&mut s, &job, 0);
        assert_eq!(s.job(&job).unwrap().state, JobState::Succeeded);
        assert!(s.workers().all(|w| w.busy.is_none()));
    }

    /// Jobs wait in submission order; the second starts when the first frees the workers.
    #[test]
    fn queue_in_submission_order() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let first = submit(&mut s, spec(2, 1, 0));
        let second = submit(&mut s, spec(1, 1, 0));
        assert_eq!(s.job(&first).unwrap().state, JobState::Rendezvous);
        // The second fits on no free worker and must not jump the queue anyway.
        assert_eq!(s.job(&second).unwrap().state, JobState::Pending);
        ready_all(&mut s, &first);
        exit_all(&mut s, &first, 0);
        assert_eq!(s.job(&second).unwrap().state, JobState::Rendezvous);
    }

    /// A non-zero exit restarts the job at a new generation, then fails it past max_restarts.
    #[test]
    fn failure_restarts_then_fails() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let job = submit(&mut s, spec(2, 1, 1));
        ready_all(&mut s, &job);
        let a = s
            .apply(
                3,
                Event::Exited {
                    worker: "a".into(),
                    job: job.clone(),
                    generation: 1,
                    rank: 0,
                    code: 3,
                    message: "boom".into(),
                },
            )
            .unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Restarting);
        assert!(rec.message.contains("boom"));
        assert!(sends(&a.actions)
            .iter()
            .any(|(w, c)| *w == "b" && matches!(c, Command::Stop { .. })));
        // Rank 1 is killed by the stop; then generation 2 forms.
        s.apply(
            4,
            Event::Exited {
                worker: "b".into(),
                job: job.clone(),
                generation: 1,
                rank: 1,
                code: -15,
                message: String::new(),
            },
        )
        .unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Rendezvous, 2));
        ready_all(&mut s, &job);
        exit_all(&mut s, &job, 1);
        assert_eq!(s.job(&job).unwrap().state, JobState::Failed);
    }

    /// A lost heartbeat fails the generation that worker served.
    #[test]
    fn lost_worker_fails_generation() {
        let mut s = Scheduler::new(1_000);
        register(&mut s, "a", 1);
        let job = submit(&mut s, spec(1, 1, 0));
        ready_all(&mut s, &job);
        s.apply(5_000, Event::Tick).unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Failed);
        assert!(rec.message.contains("heartbeat lost"), "{}", rec.message);
    }

    /// Cancel stops every worker of the generation and frees them once trainers exit.
    #[test]
    fn cancel_stops_trainers() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let job = submit(&mut s, spec(2, 1, 0));
        ready_all(&mut s, &job);
        let a = s.apply(3, Event::Cancel { job: job.clone() }).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Cancelled);
        let stops: Vec<&str> = sends(&a.actions)
            .iter()
            .filter(|(_, c)| matches!(c, Command::Stop { .. }))
            .map(|(w, _)| *w)
            .collect();
        assert_eq!(stops, vec!["a", "b"]);
        exit_all(&mut s, &job, -15);
        assert_eq!(s.job(&job).unwrap().state, JobState::Cancelled);
        assert!(s.workers().all(|w| w.busy.is_none()));
    }

    /// A job larger than the registered cluster is refused, naming the field.
    #[test]
    fn unsatisfiable_is_refused() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        let err = s
            .apply(
                0,
                Event::Submit {
                    spec: Box::new(spec(3, 1, 0)),
                    files: vec![],
                    output_root: "file:///r".into(),
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("workers.min"), "{err}");
        let err = s
            .apply(
                0,
                Event::Submit {
                    spec: Box::new(spec(1, 4, 0)),
                    files: vec![],
                    output_root: "file:///r".into(),
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("devices_per_worker"), "{err}");
    }

    /// After a coordinator restart, running jobs come back as RESTARTING and keep their ids.
    #[test]
    fn recover_restarts_running_jobs() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        let job = submit(&mut s, spec(1, 1, 0));
        ready_all(&mut s, &job);
        let records: Vec<JobRecord> = s.jobs().cloned().collect();
        let mut t = Scheduler::new(10_000);
        let actions = t.recover(records, 9);
        assert_eq!(actions.len(), 1);
        assert_eq!(t.job(&job).unwrap().state, JobState::Restarting);
        register(&mut t, "a", 1);
        let rec = t.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Rendezvous, 2));
        assert_eq!(submit(&mut t, spec(1, 1, 0)), "job-0002");
    }

    fn progress(s: &mut Scheduler, job: &str, rank: u32, step: u64, at: Millis) -> Vec<Action> {
        let generation = s.job(job).unwrap().generation;
        s.apply(
            at,
            Event::Progress {
                job: job.into(),
                generation,
                rank,
                progress: ProgressInfo {
                    step,
                    ..Default::default()
                },
            },
        )
        .unwrap()
        .actions
    }

    /// A scheduler with workers `a` and `b` running generation 1 of a job of `spec`.
    fn running_on_a_and_b(spec: JobSpec) -> (Scheduler, String) {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let job = submit(&mut s, spec);
        ready_all(&mut s, &job);
        (s, job)
    }

    fn hang_spec(min_secs: f64, p99_factor: f64) -> JobSpec {
        let mut sp = spec(2, 1, 1);
        sp.steps = Some(1000);
        sp.hang.min_secs = min_secs;
        sp.hang.p99_factor = p99_factor;
        sp.hang.startup_secs = 20.0;
        sp
    }

    /// Two ranks step every 100 ms, then stop: hung once the floor (3 s) passes, not before; the
    /// generation restarts and every worker is told to stop.
    #[test]
    fn hang_after_min_secs_restarts_generation() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=20 {
            for rank in 0..2 {
                progress(&mut s, &job, rank, step, step * 100);
            }
        }
        s.apply(2_000 + 3_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        let a = s.apply(2_000 + 3_001, Event::Tick).unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.restarts), (JobState::Restarting, 1));
        assert!(rec.message.contains("hung"), "{}", rec.message);
        let stops = sends(&a.actions)
            .iter()
            .filter(|(_, c)| matches!(c, Command::Stop { .. }))
            .count();
        assert_eq!(stops, 2);
    }

    /// Slow steps raise the bound to p99_factor x p99: 2 s steps with factor 3 allow 6 s.
    #[test]
    fn hang_bound_follows_p99_step_time() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=10 {
            for rank in 0..2 {
                progress(&mut s, &job, rank, step, step * 2_000);
            }
        }
        s.apply(20_000 + 5_900, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        s.apply(20_000 + 6_001, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Restarting);
    }

    /// Only one rank stalls while the other keeps reporting: that rank is named as hung.
    #[test]
    fn hang_is_per_rank() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=60 {
            progress(&mut s, &job, 0, step, step * 100);
            if step <= 10 {
                progress(&mut s, &job, 1, step, step * 100);
            }
            s.apply(step * 100, Event::Tick).unwrap();
        }
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Restarting);
        assert!(rec.message.contains("rank 1 on b hung"), "{}", rec.message);
    }

    /// Before its first step a rank gets `startup_secs`; a rank done with its steps is never hung.
    #[test]
    fn hang_startup_bound_and_finished_ranks() {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let mut sp = hang_spec(3.0, 3.0);
        sp.steps = Some(5);
        let job = submit(&mut s, sp);
        ready_all(&mut s, &job);
        s.apply(19_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        for rank in 0..2 {
            progress(&mut s, &job, rank, 5, 19_500);
        }
        // Both are past the last step (saving, exiting): no bound applies.
        s.apply(100_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);

        let job2 = {
            exit_all(&mut s, &job, 0);
            submit(&mut s, hang_spec(3.0, 3.0))
        };
        ready_all(&mut s, &job2);
        s.apply(200_000, Event::Tick).unwrap();
        let rec = s.job(&job2).unwrap();
        assert_eq!(rec.state, JobState::Restarting);
        assert!(rec.message.contains("after step 0"), "{}", rec.message);
    }

    /// A checkpoint request needs a running job, goes to rank 0's worker with a new id, and is
    /// served when a rank reports the commit.
    #[test]
    fn checkpoint_request_and_commit() {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let job = submit(&mut s, hang_spec(60.0, 3.0));
        let err = s
            .apply(1, Event::Checkpoint { job: job.clone() })
            .unwrap_err();
        assert!(matches!(err, CoordError::NotRunning { .. }), "{err}");
        ready_all(&mut s, &job);
        progress(&mut s, &job, 0, 7, 100);
        let a = s
            .apply(200, Event::Checkpoint { job: job.clone() })
            .unwrap();
        let ticket = a.checkpoint.unwrap();
        assert_eq!(
            ticket,
            CheckpointTicket {
                request: 1,
                generation: 1,
                step: 7
            }
        );
        assert!(matches!(a.actions[0], Action::Persist(_)));
        let sent = sends(&a.actions);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, "a");
        assert!(matches!(
            sent[0].1,
            Command::Checkpoint {
                request: 1,
                generation: 1,
                ..
            }
        ));
        assert_eq!(s.job(&job).unwrap().checkpoint_requests_served, 0);
        assert!(commits(&part(&mut s, &job, 1, 8, 0, 2)).is_empty());
        let last = part(&mut s, &job, 1, 8, 1, 2);
        let committed = commits(&last);
        assert_eq!(committed.len(), 1, "the last part commits");
        let Action::Commit {
            manifest, request, ..
        } = committed[0]
        else {
            unreachable!()
        };
        assert_eq!((manifest.step, manifest.world, *request), (8, 2, 1));
        assert_eq!(
            s.job(&job).unwrap().checkpoint_step,
            0,
            "not before the write"
        );
        let a = s
            .apply(
                300,
                Event::Committed {
                    job: job.clone(),
                    step: 8,
                    request: 1,
                },
            )
            .unwrap();
        assert!(a.actions.iter().any(|x| matches!(x, Action::Persist(_))));
        let rec = s.job(&job).unwrap();
        assert_eq!(
            (rec.checkpoint_step, rec.checkpoint_requests_served),
            (8, 1)
        );
        let second = s
            .apply(400, Event::Checkpoint { job: job.clone() })
            .unwrap();
        assert_eq!(second.checkpoint.unwrap().request, 2);
    }

    fn part(
        s: &mut Scheduler,
        job: &str,
        generation: u64,
        step: u64,
        rank: usize,
        world: usize,
    ) -> Vec<Action> {
        let part = Part {
            step,
            rank,
            world,
            generation,
            request: u64::from(rank == 1 && step == 8),
            files: vec![xvlm_proto::checkpoint::FileEntry {
                path: format!("rank-{rank}.json"),
                size: 2,
                sha256: "ab".into(),
            }],
        };
        s.apply(
            5,
            Event::Part {
                job: job.into(),
                part,
            },
        )
        .unwrap()
        .actions
    }

    fn commits(actions: &[Action]) -> Vec<&Action> {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Commit { .. }))
            .collect()
    }

    /// A step commits once, when its last rank's part arrives; parts sent again (a worker
    /// re-registering) and parts of another generation are not committed.
    #[test]
    fn parts_commit_once_per_step_of_the_current_generation() {
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 3));
        assert!(commits(&part(&mut s, &job, 2, 4, 0, 2)).is_empty());
        assert!(
            commits(&part(&mut s, &job, 2, 4, 1, 2)).is_empty(),
            "generation 2 does not exist"
        );
        assert!(commits(&part(&mut s, &job, 1, 4, 0, 2)).is_empty());
        assert!(
            commits(&part(&mut s, &job, 1, 4, 0, 2)).is_empty(),
            "a duplicate is not a rank"
        );
        assert_eq!(commits(&part(&mut s, &job, 1, 4, 1, 2)).len(), 1);
        assert!(commits(&part(&mut s, &job, 1, 4, 0, 2)).is_empty());
        assert!(
            commits(&part(&mut s, &job, 1, 4, 1, 2)).is_empty(),
            "step 4 is committed"
        );
        // Rank 0 fails; the generation's stragglers' parts still commit until the next one forms.
        let worker = s.job(&job).unwrap().ranks[0].worker.clone();
        s.apply(
            3,
            Event::Exited {
                worker,
                job: job.clone(),
                generation: 1,
                rank: 0,
                code: 1,
                message: String::new(),
            },
        )
        .unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Restarting);
        part(&mut s, &job, 1, 6, 1, 2);
        assert_eq!(commits(&part(&mut s, &job, 1, 6, 0, 2)).len(), 1);
    }

    /// A trainer that left because its worker drains (exit 75), or a draining worker's loss, ends
    /// the generation without using a restart.
    #[test]
    fn drains_do_not_use_restarts() {
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 0));
        exit_all(&mut s, &job, i32::from(xvlm_proto::EXIT_PREEMPTED));
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.restarts), (JobState::Rendezvous, 0));
        assert_eq!(rec.generation, 2, "the next generation formed at once");
        ready_all(&mut s, &job);
        s.apply(
            6,
            Event::Heartbeat {
                worker: "b".into(),
                draining: true,
                running: vec![],
            },
        )
        .unwrap();
        s.apply(7, Event::Disconnected { worker: "b".into() })
            .unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!(
            (rec.state, rec.restarts),
            (JobState::Restarting, 0),
            "{}",
            rec.message
        );
        assert!(rec.message.contains("drained"), "{}", rec.message);
    }

    /// A job below `workers.max` grows when a worker frees up and nothing waits: one
    /// checkpoint-and-leave request to rank 0's worker, then a larger generation without a restart.
    #[test]
    fn shrunk_job_grows_back_when_a_worker_frees_up() {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        let mut elastic = spec(1, 1, 0);
        elastic.workers.max = Some(2);
        let job = submit(&mut s, elastic);
        ready_all(&mut s, &job);
        assert_eq!(s.job(&job).unwrap().world_size(), 1);
        let leave = |actions: &[Action]| {
            sends(actions)
                .iter()
                .filter(|(_, c)| matches!(c, Command::Checkpoint { leave: true, .. }))
                .map(|(w, _)| w.to_string())
                .collect::<Vec<_>>()
        };
        assert!(leave(&register(&mut s, "b", 1)).is_empty(), "no step yet");
        assert_eq!(
            leave(&progress(&mut s, &job, 0, 3, 10)),
            vec!["a".to_string()]
        );
        assert!(
            leave(&progress(&mut s, &job, 0, 4, 20)).is_empty(),
            "asked once"
        );
        exit_all(&mut s, &job, i32::from(xvlm_proto::EXIT_PREEMPTED));
        let rec = s.job(&job).unwrap();
        assert_eq!(
            (rec.generation, rec.world_size(), rec.restarts),
            (2, 2, 0),
            "{}",
            rec.message
        );
    }

    /// Of two ranks stalled at the same step, the one whose worker reports its process stopped is
    /// named, with that state; without process states the lowest rank is.
    #[test]
    fn hang_names_the_stopped_process() {
        for stopped in [None, Some(1u32)] {
            let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
            for step in 1..=20 {
                for rank in 0..2 {
                    progress(&mut s, &job, rank, step, step * 100);
                }
            }
            let rec = s.job(&job).unwrap().clone();
            for r in &rec.ranks {
                let state = if Some(r.rank) == stopped { 'T' } else { 'S' };
                s.apply(
                    2_500,
                    Event::Heartbeat {
                        worker: r.worker.clone(),
                        draining: false,
                        running: vec![RunningGeneration {
                            job: job.clone(),
                            generation: rec.generation,
                            processes: vec![(r.rank, state)],
                        }],
                    },
                )
                .unwrap();
            }
            s.apply(6_000, Event::Tick).unwrap();
            let message = &s.job(&job).unwrap().message;
            match stopped {
                Some(rank) => assert!(
                    message.contains(&format!("rank {rank} on b hung (its process is stopped)")),
                    "{message}"
                ),
                None => assert!(message.contains("rank 0 on a hung:"), "{message}"),
            }
        }
    }
}
