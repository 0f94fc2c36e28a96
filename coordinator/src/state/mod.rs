//! The job state machine and scheduler: synchronous, no I/O. Events go in, actions come out; the async
//! driver (`server`) persists every `Persist` action before it sends any command, so a transition is on
//! disk before a worker acts on it.
//!
//! Lifecycle: PENDING -> RENDEZVOUS (ranks assigned, generation g) -> RUNNING -> SUCCEEDED | FAILED |
//! CANCELLED; a failure in generation g moves the job to RESTARTING (or FAILED past `max_restarts`), and
//! generation g+1 is formed once enough workers are free. Jobs wait in submission order.
//!
//! One concept per file; each uses only the ones listed before it (and the [`Scheduler`] fields,
//! for the files that add its methods):
//! - `records`: the persisted job record ([`JobRecord`], [`JobState`], ranks, progress).
//! - `protocol`: the interface: [`Event`]s in, [`Action`]s out, worker [`Command`]s.
//! - `registry`: registered workers ([`WorkerEntry`]); knows no job.
//! - `hang`: per-rank step clocks and the rule naming the rank that stalls a generation.
//! - `runtime`: per-job state that is not persisted (clocks, parts in flight, commit bookkeeping),
//!   one record per live job, dropped when the job ends.
//! - `placement`: which free workers (that run the job's task) a waiting job's next generation runs on;
//!   refusing what can never run; growing a shrunk job.
//! - `checkpoints`: collecting checkpoint parts, commits in flight and their outcomes (what waits
//!   for them), on-demand requests.
//! - `lifecycle`: submit, cancel, rendezvous, progress and evaluation results, exits, worker loss and
//!   hangs ending a generation, jobs no worker can run.
//! - `mod.rs` (this file): the [`Scheduler`] itself, recovery, and [`Scheduler::apply`], which routes each
//!   event and then schedules.
//!
//! Authentication, metrics and other operational concerns belong in the driver around this module,
//! not in it: the state machine only sees events that were already admitted.

mod checkpoints;
mod hang;
mod lifecycle;
mod placement;
mod protocol;
mod records;
mod registry;
mod runtime;
#[cfg(test)]
pub(crate) mod test_support;

use std::collections::BTreeMap;

pub use hang::RankHealth;
pub use protocol::{Action, Applied, CheckpointTicket, Command, Event, RunningGeneration, Slot};
pub use records::{Evaluation, JobRecord, JobState, Millis, ProgressInfo, RankAssignment};
pub use registry::WorkerEntry;

use crate::error::CoordError;
use registry::WorkerRegistry;
use runtime::JobRuntime;

/// The coordinator's whole state.
#[derive(Debug)]
pub struct Scheduler {
    jobs: BTreeMap<String, JobRecord>,
    workers: WorkerRegistry,
    next_seq: u64,
    heartbeat_timeout_ms: Millis,
    progress_persist_ms: Millis,
    /// Runtime state of live jobs, by id; no entry outlives its job's end.
    runtime: BTreeMap<String, JobRuntime>,
    /// Checkpoint commits the driver runs and has not reported back, (generation, step) by job; an
    /// entry lives until its job's last commit resolved, past the job's end too.
    commits: BTreeMap<String, Vec<(u64, u64)>>,
}

impl Scheduler {
    /// An empty scheduler declaring workers lost after `heartbeat_timeout_ms` without a report.
    pub fn new(heartbeat_timeout_ms: Millis) -> Self {
        Scheduler {
            jobs: BTreeMap::new(),
            workers: WorkerRegistry::default(),
            next_seq: 1,
            heartbeat_timeout_ms,
            progress_persist_ms: 5_000,
            runtime: BTreeMap::new(),
            commits: BTreeMap::new(),
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

    /// The running generation's ranks as hang detection sees them (empty unless RUNNING).
    pub fn rank_health(&self, id: &str) -> Vec<RankHealth> {
        self.runtime
            .get(id)
            .map(|r| r.clocks.iter().map(|(rank, c)| c.health(*rank)).collect())
            .unwrap_or_default()
    }

    /// Registered workers.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.iter()
    }

    /// Applies one event at time `now`.
    pub fn apply(&mut self, now: Millis, event: Event) -> Result<Applied, CoordError> {
        let mut out = Applied::default();
        let actions = &mut out.actions;
        match event {
            Event::Submit {
                spec,
                files,
                output_root,
            } => out.job_id = Some(self.submit(now, *spec, files, &output_root, actions)?),
            Event::Cancel { job } => self.cancel(now, &job, actions)?,
            Event::Register {
                name,
                host,
                slots,
                cuda,
                tasks,
            } => {
                let entry = WorkerEntry {
                    name,
                    host,
                    slots,
                    cuda,
                    tasks,
                    last_seen_ms: now,
                    busy: None,
                    connected: false,
                    draining: false,
                };
                self.register(now, entry, actions);
            }
            Event::Heartbeat {
                worker,
                draining,
                running,
            } => self.heartbeat(now, &worker, draining, running, actions)?,
            Event::Ready {
                worker,
                job,
                generation,
                rank,
                ring_address,
                nccl_id,
                error,
            } => {
                self.workers.touch(&worker, now);
                self.ready(
                    now,
                    &job,
                    generation,
                    rank,
                    ring_address,
                    nccl_id,
                    error,
                    actions,
                );
            }
            Event::Progress {
                job,
                generation,
                rank,
                progress,
                metrics,
            } => self.progress(now, &job, generation, rank, progress, metrics, actions),
            Event::Part { job, part } => self.part(&job, part, actions),
            Event::Committed { job, step, request } => {
                self.committed(now, &job, step, request, actions)
            }
            Event::CommitFailed { job, step, reason } => {
                self.commit_failed(now, &job, step, &reason, actions)
            }
            Event::Checkpoint { job } => {
                out.checkpoint = Some(self.request_checkpoint(now, &job, actions)?);
            }
            Event::Exited {
                worker,
                job,
                generation,
                rank,
                code,
                message,
            } => {
                self.workers.touch(&worker, now);
                self.exited(now, &job, generation, rank, code, &message, actions);
            }
            Event::Disconnected { worker } => self.disconnected(now, &worker, actions),
            Event::Tick => self.tick(now, actions),
        }
        self.fail_unrunnable(now, &mut out.actions);
        self.schedule(now, &mut out.actions);
        self.prune_runtime();
        Ok(out)
    }

    /// Drops the runtime state of jobs that ended (or are unknown).
    fn prune_runtime(&mut self) {
        let jobs = &self.jobs;
        self.runtime
            .retain(|id, _| jobs.get(id).is_some_and(|j| !j.state.is_terminal()));
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

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

    /// A job's runtime state (rank clocks, parts in flight, persist times) exists while it is live
    /// and is gone once it ends, whichever way; a part sent again after the end does not bring it back.
    #[test]
    fn ended_jobs_leave_no_runtime_state() {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let succeeded = submit(&mut s, spec(2, 1, 0));
        ready_all(&mut s, &succeeded);
        progress(&mut s, &succeeded, 0, 3, 10);
        assert!(commits(&part(&mut s, &succeeded, 1, 4, 0, 2)).is_empty());
        assert!(s.runtime.contains_key(&succeeded));
        exit_all(&mut s, &succeeded, 0);
        assert_eq!(s.job(&succeeded).unwrap().state, JobState::Succeeded);
        assert!(s.runtime.is_empty(), "{:?}", s.runtime.keys());
        assert!(commits(&part(&mut s, &succeeded, 1, 4, 1, 2)).is_empty());
        assert!(s.runtime.is_empty(), "a late part recreated state");

        let cancelled = submit(&mut s, spec(2, 1, 0));
        ready_all(&mut s, &cancelled);
        progress(&mut s, &cancelled, 0, 3, 10);
        s.apply(
            20,
            Event::Cancel {
                job: cancelled.clone(),
            },
        )
        .unwrap();
        assert!(s.runtime.is_empty(), "{:?}", s.runtime.keys());
        exit_all(&mut s, &cancelled, -15);

        let failed = submit(&mut s, spec(2, 1, 0));
        ready_all(&mut s, &failed);
        progress(&mut s, &failed, 1, 3, 10);
        exit_all(&mut s, &failed, 1);
        assert_eq!(s.job(&failed).unwrap().state, JobState::Failed);
        assert!(s.runtime.is_empty(), "{:?}", s.runtime.keys());
    }
}
