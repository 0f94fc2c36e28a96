//! Checkpoint tracking: collecting each rank's uploaded part of a step, asking the driver to commit a
//! step once every part is in, recording the commit, and on-demand checkpoint requests.
//!
//! The driver commits off the state lock and reports the outcome as [`super::Event::Committed`] or
//! [`super::Event::CommitFailed`]. Until a job's commits in flight resolved, its next generation does
//! not form (it resumes from them) and it does not succeed (its last checkpoint is part of its
//! result). The job's committed step only ever increases, and its last commit is persisted.

use xvlm_proto::checkpoint::{Manifest, Part};

use super::protocol::{Action, CheckpointTicket, Command};
use super::records::{JobState, Millis};
use super::Scheduler;
use crate::error::CoordError;

impl Scheduler {
    /// Collects a checkpoint part of the job's current generation; the step's last part commits it.
    /// Parts of other generations are dropped: an older generation's uncommitted step may be
    /// overwritten by the one resuming, and a part from a newer one cannot exist. Parts of a job that
    /// ended are dropped too (workers send their recent parts again when they re-register).
    pub(super) fn part(&mut self, id: &str, part: Part, actions: &mut Vec<Action>) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        let (step, generation) = (part.step, part.generation);
        let runtime = self.runtime.entry(id.to_string()).or_default();
        let seen = [runtime.last_commit, job.last_commit];
        if generation != job.generation
            || seen
                .iter()
                .flatten()
                .any(|&(g, s)| g == generation && step <= s)
        {
            return;
        }
        let steps = &mut runtime.parts;
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
                runtime.last_commit = Some((generation, step));
                let in_flight = self.commits.entry(id.to_string()).or_default();
                in_flight.push((generation, step));
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

    /// The driver committed a checkpoint: it is the job's `latest` now. The job's committed step
    /// and last commit only move forward: a late or repeated report of an older commit changes
    /// neither. Both are persisted.
    pub(super) fn committed(
        &mut self,
        now: Millis,
        id: &str,
        step: u64,
        request: u64,
        actions: &mut Vec<Action>,
    ) {
        let generation = self.resolve_commit(id, step);
        if let Some(job) = self.jobs.get_mut(id) {
            let generation = generation.unwrap_or(job.generation);
            job.checkpoint_step = job.checkpoint_step.max(step);
            job.last_commit = job.last_commit.max(Some((generation, step)));
            job.checkpoint_requests_served = job.checkpoint_requests_served.max(request);
            job.updated_at_ms = now;
            actions.push(Action::Persist(Box::new(job.clone())));
            actions.push(Action::Notify(id.to_string()));
        }
        self.succeed_when_committed(now, id, actions);
    }

    /// The driver abandoned a commit (its storage budget ran out or the store failed): the job's
    /// previous commit stays its `latest`, and what waited for this one goes on without it.
    pub(super) fn commit_failed(
        &mut self,
        now: Millis,
        id: &str,
        step: u64,
        reason: &str,
        actions: &mut Vec<Action>,
    ) {
        self.resolve_commit(id, step);
        tracing::warn!(
            job = id,
            step,
            "checkpoint step-{step} abandoned ({reason}); the previous commit stays `latest`"
        );
        self.succeed_when_committed(now, id, actions);
    }

    /// Takes the job's commit of `step` out of the commits in flight; returns its generation.
    fn resolve_commit(&mut self, id: &str, step: u64) -> Option<u64> {
        let in_flight = self.commits.get_mut(id)?;
        let at = in_flight.iter().position(|&(_, s)| s == step)?;
        let (generation, _) = in_flight.remove(at);
        if in_flight.is_empty() {
            self.commits.remove(id);
        }
        Some(generation)
    }

    /// A job whose every rank exited 0 succeeds, once none of its commits is in flight.
    pub(super) fn succeed_when_committed(
        &mut self,
        now: Millis,
        id: &str,
        actions: &mut Vec<Action>,
    ) {
        if self.commits.contains_key(id) {
            return;
        }
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if !matches!(job.state, JobState::Running | JobState::Rendezvous)
            || job.ranks.is_empty()
            || job.ranks.iter().any(|r| r.exit != Some(0))
        {
            return;
        }
        job.state = JobState::Succeeded;
        job.updated_at_ms = now;
        actions.push(Action::Persist(Box::new(job.clone())));
        actions.push(Action::Notify(id.to_string()));
    }

    /// Asks the running generation for a checkpoint at its next step boundary (through rank 0's worker).
    pub(super) fn request_checkpoint(
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

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

    fn committed(s: &mut Scheduler, job: &str, step: u64, request: u64) -> Vec<Action> {
        s.apply(
            6,
            Event::Committed {
                job: job.into(),
                step,
                request,
            },
        )
        .unwrap()
        .actions
    }

    fn failed(s: &mut Scheduler, job: &str, step: u64) -> Vec<Action> {
        s.apply(
            6,
            Event::CommitFailed {
                job: job.into(),
                step,
                reason: "storage did not finish it within its 60 s budget".into(),
            },
        )
        .unwrap()
        .actions
    }

    fn prepares(actions: &[Action]) -> usize {
        sends(actions)
            .iter()
            .filter(|(_, c)| matches!(c, Command::Prepare { .. }))
            .count()
    }

    /// A generation that must resume waits for the job's commits in flight: it forms once they are
    /// committed, or abandoned (it then resumes from the previous commit).
    #[test]
    fn next_generation_waits_for_commits_in_flight() {
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 2));
        part(&mut s, &job, 1, 4, 0, 2);
        assert_eq!(commits(&part(&mut s, &job, 1, 4, 1, 2)).len(), 1);
        exit_all(&mut s, &job, 1);
        let rec = s.job(&job).unwrap();
        assert_eq!(
            (rec.state, rec.generation),
            (JobState::Restarting, 1),
            "waits for the commit of step 4"
        );
        assert!(s.workers().all(|w| w.busy.is_none()));
        s.apply(7, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().generation, 1);
        let a = committed(&mut s, &job, 4, 0);
        assert_eq!(
            prepares(&a),
            2,
            "generation 2 forms once step 4 is committed"
        );
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Rendezvous, 2));
        assert_eq!(rec.checkpoint_step, 4);

        ready_all(&mut s, &job);
        part(&mut s, &job, 2, 6, 0, 2);
        assert_eq!(commits(&part(&mut s, &job, 2, 6, 1, 2)).len(), 1);
        exit_all(&mut s, &job, 1);
        assert_eq!(s.job(&job).unwrap().state, JobState::Restarting);
        let a = failed(&mut s, &job, 6);
        assert_eq!(prepares(&a), 2, "an abandoned commit holds nothing back");
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Rendezvous, 3));
        assert_eq!(rec.checkpoint_step, 4, "the previous commit stays");
        assert_eq!(rec.last_commit, Some((1, 4)));
    }

    /// Every rank exited 0: the job succeeds once its last checkpoint is committed (or abandoned),
    /// not before; its workers are free at once.
    #[test]
    fn job_succeeds_once_its_last_commit_resolved() {
        for commit_fails in [false, true] {
            let (mut s, job) = running_on_a_and_b(spec(2, 1, 0));
            part(&mut s, &job, 1, 10, 0, 2);
            assert_eq!(commits(&part(&mut s, &job, 1, 10, 1, 2)).len(), 1);
            exit_all(&mut s, &job, 0);
            assert_eq!(s.job(&job).unwrap().state, JobState::Running);
            assert!(s.workers().all(|w| w.busy.is_none()));
            s.apply(7, Event::Tick).unwrap();
            assert_eq!(s.job(&job).unwrap().state, JobState::Running);
            let a = if commit_fails {
                failed(&mut s, &job, 10)
            } else {
                committed(&mut s, &job, 10, 0)
            };
            assert!(a
                .iter()
                .any(|x| matches!(x, Action::Persist(r) if r.state == JobState::Succeeded)));
            let rec = s.job(&job).unwrap();
            assert_eq!(rec.state, JobState::Succeeded);
            assert_eq!(rec.checkpoint_step, if commit_fails { 0 } else { 10 });
        }
    }

    /// The committed step and the last commit only move forward: a late report of an older commit
    /// or a repeated one changes neither (the requests served neither).
    #[test]
    fn committed_step_only_increases() {
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 0));
        part(&mut s, &job, 1, 4, 0, 2);
        assert_eq!(commits(&part(&mut s, &job, 1, 4, 1, 2)).len(), 1);
        part(&mut s, &job, 1, 6, 0, 2);
        assert_eq!(commits(&part(&mut s, &job, 1, 6, 1, 2)).len(), 1);
        committed(&mut s, &job, 6, 2);
        let state = |s: &Scheduler| {
            let r = s.job(&job).unwrap();
            (
                r.checkpoint_step,
                r.last_commit,
                r.checkpoint_requests_served,
            )
        };
        assert_eq!(state(&s), (6, Some((1, 6)), 2));
        committed(&mut s, &job, 4, 1);
        assert_eq!(state(&s), (6, Some((1, 6)), 2), "a late report");
        committed(&mut s, &job, 6, 2);
        committed(&mut s, &job, 4, 0);
        assert_eq!(state(&s), (6, Some((1, 6)), 2), "repeated reports");
        assert!(!s.commits.contains_key(&job), "nothing in flight");
    }

    /// The last commit is persisted with the job: a coordinator restarted on its store does not
    /// commit again the parts workers report again when they re-register (which would move `latest`
    /// back), and its committed step does not go back; a newer step still commits.
    #[test]
    fn last_commit_survives_a_coordinator_restart() {
        use crate::store::{JobStore, RedbStore};
        let (mut s, job) = running_on_a_and_b(spec(2, 1, 1));
        part(&mut s, &job, 1, 4, 0, 2);
        assert_eq!(commits(&part(&mut s, &job, 1, 4, 1, 2)).len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        for rec in s.jobs() {
            store.put(rec).unwrap();
        }
        for a in committed(&mut s, &job, 4, 0) {
            if let Action::Persist(rec) = a {
                store.put(&rec).unwrap();
            }
        }
        drop(store);

        let store = RedbStore::open(dir.path()).unwrap();
        let mut t = Scheduler::new(1_000_000);
        t.recover(store.load_all().unwrap(), 7);
        let rec = t.job(&job).unwrap();
        assert_eq!((rec.state, rec.generation), (JobState::Restarting, 1));
        assert_eq!((rec.checkpoint_step, rec.last_commit), (4, Some((1, 4))));
        assert!(commits(&part(&mut t, &job, 1, 4, 0, 2)).is_empty());
        assert!(
            commits(&part(&mut t, &job, 1, 4, 1, 2)).is_empty(),
            "step 4 is committed already"
        );
        part(&mut t, &job, 1, 6, 0, 2);
        assert_eq!(commits(&part(&mut t, &job, 1, 6, 1, 2)).len(), 1);
        committed(&mut t, &job, 6, 0);
        committed(&mut t, &job, 4, 0);
        let rec = t.job(&job).unwrap();
        assert_eq!((rec.checkpoint_step, rec.last_commit), (6, Some((1, 6))));
    }
}
