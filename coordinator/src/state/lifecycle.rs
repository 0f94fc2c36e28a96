//! The job lifecycle: submit, cancel, rendezvous, progress, trainer exits, and how a generation ends
//! (restart or failure) when a trainer fails, its worker is lost or a rank hangs. Worker events land
//! here because a worker's loss is a job's event; the registry itself knows no job.

use xvlm_proto::logging::strip_terminal_escapes;
use xvlm_proto::spec::JobSpec;

use super::hang::{self, RankClock};
use super::placement::{self, slots_by_worker};
use super::protocol::{Action, Command, RunningGeneration};
use super::records::{Evaluation, JobRecord, JobState, Millis, ProgressInfo};
use super::registry::WorkerEntry;
use super::Scheduler;
use crate::error::CoordError;
use crate::planner;

impl Scheduler {
    /// Validates and queues a job; returns its id.
    pub(super) fn submit(
        &mut self,
        now: Millis,
        spec: JobSpec,
        files: Vec<String>,
        output_root: &str,
        actions: &mut Vec<Action>,
    ) -> Result<String, CoordError> {
        spec.validate()?;
        placement::check_satisfiable(&self.workers, &spec)?;
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
            evaluation: None,
            message: String::new(),
            output,
            files,
            checkpoint_step: 0,
            last_commit: None,
            checkpoint_requests: 0,
            checkpoint_requests_served: 0,
            growing: 0,
            reported_total_steps: 0,
            submitted_at_ms: now,
            updated_at_ms: now,
        };
        actions.push(Action::Persist(Box::new(rec.clone())));
        actions.push(Action::Notify(id.clone()));
        self.jobs.insert(id.clone(), rec);
        Ok(id)
    }

    /// Cancels a job; a live generation is told to stop.
    pub(super) fn cancel(
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

    /// A rank is prepared; the generation starts once every rank is.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ready(
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
        self.runtime.entry(id.to_string()).or_default().clocks = job
            .ranks
            .iter()
            .map(|r| (r.rank, RankClock::new(now)))
            .collect();
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

    /// A rank's progress: advances its hang clock; rank 0's is the job's progress, and its
    /// evaluation results (if any) the job's latest, persisted at once (they are rare and final).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn progress(
        &mut self,
        now: Millis,
        id: &str,
        generation: u64,
        rank: u32,
        mut progress: ProgressInfo,
        metrics: Vec<(String, f64)>,
        actions: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.generation != generation || job.state != JobState::Running {
            return;
        }
        let runtime = self.runtime.entry(id.to_string()).or_default();
        if let Some(clock) = runtime.clocks.get_mut(&rank) {
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
        let evaluated = !metrics.is_empty();
        if evaluated {
            job.evaluation = Some(Evaluation {
                step: progress.step,
                metrics,
                at_ms: now,
            });
        }
        if progress.total_steps > 0 {
            job.reported_total_steps = progress.total_steps;
        }
        job.progress = Some(progress);
        job.updated_at_ms = now;
        let last = &mut runtime.last_progress_persist;
        if evaluated || now.saturating_sub(*last) >= self.progress_persist_ms {
            *last = now;
            actions.push(Action::Persist(Box::new(job.clone())));
        }
        actions.push(Action::Notify(id.to_string()));
    }

    /// A worker (re-)registered; a re-registration means its old session (and trainers) are gone.
    pub(super) fn register(&mut self, now: Millis, entry: WorkerEntry, actions: &mut Vec<Action>) {
        if self.workers.contains(&entry.name) {
            self.lose_worker(now, &entry.name, "worker re-registered", actions);
        }
        self.workers.insert(entry);
    }

    /// A heartbeat: the worker is alive and connected; trainers of generations it should not run
    /// are told to stop, and the running ones' process states feed hang detection.
    pub(super) fn heartbeat(
        &mut self,
        now: Millis,
        worker: &str,
        draining: bool,
        running: Vec<RunningGeneration>,
        actions: &mut Vec<Action>,
    ) -> Result<(), CoordError> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| CoordError::UnknownWorker(worker.to_string()))?;
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
            if let Some(runtime) = self.runtime.get_mut(&job) {
                let current = self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.generation == generation);
                for (rank, state) in processes.iter().filter(|_| current) {
                    if let Some(clock) = runtime.clocks.get_mut(rank) {
                        clock.process = Some(*state);
                    }
                }
            }
            let current = self
                .jobs
                .get(&job)
                .is_some_and(|j| j.generation == generation && !j.state.is_terminal());
            if busy.as_ref() != Some(&(job.clone(), generation)) || !current {
                actions.push(Action::Send {
                    worker: worker.to_string(),
                    command: Command::Stop {
                        job,
                        generation,
                        reason: "stale generation".into(),
                    },
                });
            }
        }
        Ok(())
    }

    /// The worker's heartbeat stream closed: it is lost and forgotten.
    pub(super) fn disconnected(&mut self, now: Millis, worker: &str, actions: &mut Vec<Action>) {
        if self.workers.contains(worker) {
            self.lose_worker(now, worker, "heartbeat stream closed", actions);
            self.workers.remove(worker);
        }
    }

    /// Fails every job that never started whose task no registered worker can run, once that has
    /// lasted `heartbeat_timeout_ms` (the time a worker gets to report): a job submitted before any
    /// worker registered is not left waiting forever for a build that can run it. While no worker is
    /// registered at all it waits. A job that ran before (RESTARTING) waits for its workers to return.
    pub(super) fn fail_unrunnable(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let mut unrunnable = Vec::new();
        for job in self.jobs.values().filter(|j| j.state == JobState::Pending) {
            let blocked =
                !self.workers.is_empty() && self.workers.supporting(job.spec.task).next().is_none();
            let runtime = self.runtime.entry(job.id.clone()).or_default();
            if !blocked {
                runtime.unrunnable_since = None;
                continue;
            }
            let since = *runtime.unrunnable_since.get_or_insert(now);
            if now.saturating_sub(since) >= self.heartbeat_timeout_ms {
                unrunnable.push(job.id.clone());
            }
        }
        for id in unrunnable {
            let why = placement::unrunnable(&self.workers, self.jobs[&id].spec.task).to_string();
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            tracing::warn!(job = id, "{why}; failing the job");
            job.state = JobState::Failed;
            job.message = why;
            job.updated_at_ms = now;
            actions.push(Action::Persist(Box::new(job.clone())));
            actions.push(Action::Notify(id));
        }
    }

    /// Time passed: workers silent past the heartbeat timeout are lost, hung generations restart.
    pub(super) fn tick(&mut self, now: Millis, actions: &mut Vec<Action>) {
        for name in self.workers.silent(now, self.heartbeat_timeout_ms) {
            self.lose_worker(now, &name, "heartbeat lost", actions);
            self.workers.remove(&name);
        }
        self.detect_hangs(now, actions);
    }

    /// Restarts every running generation with a rank that made no step progress within its bound.
    fn detect_hangs(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let jobs = &self.jobs;
        let mut hung = Vec::new();
        for (id, runtime) in self.runtime.iter_mut() {
            let Some(job) = jobs.get(id).filter(|j| j.state == JobState::Running) else {
                // Clocks live only while the generation runs.
                runtime.clocks.clear();
                continue;
            };
            if let Some(why) = hang::hung_rank(job, &runtime.clocks, now) {
                hung.push((id.clone(), why));
            }
        }
        for (id, why) in hung {
            tracing::warn!(job = id, "{why}; restarting the generation");
            if let Some(runtime) = self.runtime.get_mut(&id) {
                runtime.clocks.clear();
            }
            self.fail_generation(now, &id, &why, actions);
        }
    }

    /// A trainer ended: the job succeeds when every rank exited 0; a failure ends the generation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exited(
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
            self.workers.release(&worker, id, generation);
        }
        let state = job.state;
        if state == JobState::Running || state == JobState::Rendezvous {
            if code != 0 {
                // The worker quotes the trainer log's last line; a worker of an older build sends it
                // with the log's colour codes, which would garble every status table and watch line.
                let message = strip_terminal_escapes(message);
                let message = message.trim();
                let why = if message.is_empty() {
                    format!("rank {rank} exited with code {code}")
                } else {
                    format!("rank {rank} exited with code {code}: {message}")
                };
                let preempted = code == i32::from(xvlm_proto::EXIT_PREEMPTED);
                self.end_generation(now, id, &why, !preempted, actions);
            } else {
                // Every rank exited 0: done once the job's last checkpoint commits resolved.
                self.succeed_when_committed(now, id, actions);
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

    /// A worker is gone: the generation it served ends (a drained worker's does not use a restart).
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
}

/// Tells every worker with a live rank of the job's generation to stop it.
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
    use super::super::records::Evaluation;
    use super::super::test_support::*;
    use super::super::*;
    use xvlm_proto::spec::Backend;

    /// A job without `steps:` takes its total from its trainers' reports (their schedule fixes it), keeps
    /// it across generations, and gets an ETA; a spec's `steps` wins.
    #[test]
    fn total_steps_come_from_the_trainers_when_the_spec_has_none() {
        let mut unbounded = spec(2, 1, 1);
        unbounded.task = xvlm_proto::spec::TaskKind::Pretrain;
        unbounded.config = Some("Pretrain_XVLM_base_4m.yaml".into());
        unbounded.steps = None;
        let (mut s, job) = running_on_a_and_b(unbounded);
        assert_eq!(s.job(&job).unwrap().total_steps(), 0);
        let report = |s: &mut Scheduler, step: u64, at: Millis, total_steps: u64| {
            let generation = s.job(&job).unwrap().generation;
            s.apply(
                at,
                Event::Progress {
                    job: job.clone(),
                    generation,
                    rank: 0,
                    progress: ProgressInfo {
                        step,
                        total_steps,
                        ..Default::default()
                    },
                    metrics: vec![],
                },
            )
            .unwrap();
        };
        report(&mut s, 1, 1_000, 40);
        report(&mut s, 11, 11_000, 40);
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.total_steps(), 40);
        let eta = rec.eta_seconds().expect("an ETA");
        assert!((eta - 29.0).abs() < 1e-9, "eta {eta}");
        // A report without a total (an older trainer) keeps the known one.
        report(&mut s, 12, 12_000, 0);
        assert_eq!(s.job(&job).unwrap().total_steps(), 40);

        let mut bounded = spec(2, 1, 1);
        bounded.steps = Some(30);
        let (mut s, job) = running_on_a_and_b(bounded);
        let generation = s.job(&job).unwrap().generation;
        s.apply(
            1_000,
            Event::Progress {
                job: job.clone(),
                generation,
                rank: 0,
                progress: ProgressInfo {
                    step: 1,
                    total_steps: 40,
                    ..Default::default()
                },
                metrics: vec![],
            },
        )
        .unwrap();
        assert_eq!(s.job(&job).unwrap().total_steps(), 30);
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

    /// A trainer's coloured last log line is quoted in the failure message as plain text.
    #[test]
    fn failure_message_has_no_escape_codes() {
        let mut s = Scheduler::new(10_000);
        register(&mut s, "a", 1);
        let job = submit(&mut s, spec(1, 1, 0));
        ready_all(&mut s, &job);
        s.apply(
            3,
            Event::Exited {
                worker: "a".into(),
                job: job.clone(),
                generation: 1,
                rank: 0,
                code: 1,
                message: "\u{1b}[2m2026-12-03T10:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \
                          \u{1b}]0;t\u{7}cannot read config: no such file"
                    .into(),
            },
        )
        .unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Failed);
        assert_eq!(
            rec.message,
            "rank 0 exited with code 1: 2026-12-03T10:00:00Z ERROR cannot read config: no such file"
        );
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

    fn report(
        s: &mut Scheduler,
        job: &str,
        rank: u32,
        step: u64,
        at: Millis,
        metrics: &[(&str, f64)],
    ) -> Vec<Action> {
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
                metrics: metrics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            },
        )
        .unwrap()
        .actions
    }

    /// Rank 0's evaluation results become the job's, persisted at once (not rate-limited like
    /// progress), and stay through later steps without results and through a restart; other ranks'
    /// are not the job's.
    #[test]
    fn evaluation_results_are_kept_and_persisted() {
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 1));
        let persisted =
            |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Persist(_)));
        assert!(
            persisted(&report(&mut s, &job, 0, 1, 10_000, &[])),
            "the first progress"
        );
        assert!(
            !persisted(&report(&mut s, &job, 0, 2, 11_000, &[])),
            "rate-limited"
        );
        let a = report(
            &mut s,
            &job,
            0,
            3,
            12_000,
            &[("epoch", 0.0), ("val.r_mean", 41.5)],
        );
        assert!(persisted(&a), "results are persisted at once");
        report(&mut s, &job, 1, 3, 12_000, &[("val.r_mean", 99.0)]);
        report(&mut s, &job, 0, 4, 13_000, &[]);
        let expected = Some(Evaluation {
            step: 3,
            metrics: vec![("epoch".into(), 0.0), ("val.r_mean".into(), 41.5)],
            at_ms: 12_000,
        });
        assert_eq!(s.job(&job).unwrap().evaluation, expected);
        exit_all(&mut s, &job, 1);
        ready_all(&mut s, &job);
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Running, 2));
        assert_eq!(rec.evaluation, expected, "kept across generations");
    }
}
