//! Placement: which workers a waiting job's next generation runs on, how its ranks map onto them, and
//! when a running job below `workers.max` should re-form to grow. Jobs wait in submission order.

use std::collections::BTreeMap;

use xvlm_proto::spec::{Backend, JobSpec, TaskKind};

use super::protocol::{Action, Command, Slot};
use super::records::{JobRecord, JobState, Millis, RankAssignment};
use super::registry::WorkerRegistry;
use super::Scheduler;
use crate::error::CoordError;

/// With workers registered, a job whose task no worker can run, or needing more workers or devices
/// than the workers that can run it have, can never start; refuse it at submit instead of blocking
/// the queue forever. With none registered yet (`xvlm-coord run` submits while its workers start) the
/// job is queued; `Scheduler::fail_unrunnable` says when it gives up.
pub(super) fn check_satisfiable(
    workers: &WorkerRegistry,
    spec: &JobSpec,
) -> Result<(), CoordError> {
    if workers.is_empty() {
        return Ok(());
    }
    let task = spec.task;
    if workers.supporting(task).next().is_none() {
        return Err(unrunnable(workers, task));
    }
    let need = spec.workers.devices_per_worker;
    let most = workers.supporting(task).map(|w| w.slots).max().unwrap_or(0);
    if most < need {
        return Err(CoordError::Unsatisfiable {
            field: "workers.devices_per_worker".into(),
            message: format!(
                "{need} devices per worker requested, but the largest registered worker has {most}"
            ),
        });
    }
    let able = workers.supporting(task).filter(|w| w.slots >= need).count() as u32;
    if able < spec.workers.min {
        return Err(CoordError::Unsatisfiable {
            field: "workers.min".into(),
            message: format!(
                "world size {} needs {} workers with {need} device(s) each, but only {able} such worker(s) that run task {} are registered",
                spec.world_size(spec.workers.min),
                spec.workers.min,
                task.as_str()
            ),
        });
    }
    Ok(())
}

/// No registered worker's build can run `task`.
pub(super) fn unrunnable(workers: &WorkerRegistry, task: TaskKind) -> CoordError {
    let offered: Vec<&str> = workers.tasks().iter().map(|t| t.as_str()).collect();
    CoordError::Unsatisfiable {
        field: "task".into(),
        message: format!(
            "no registered worker can run task {}: the registered workers run {}",
            task.as_str(),
            offered.join(", ")
        ),
    }
}

/// The ranks of a generation on `chosen` workers with `per_worker` devices each, in worker order.
fn assign_ranks(chosen: &[String], per_worker: u32) -> Vec<RankAssignment> {
    chosen
        .iter()
        .enumerate()
        .flat_map(|(i, worker)| {
            (0..per_worker).map(move |local| RankAssignment {
                rank: i as u32 * per_worker + local,
                worker: worker.clone(),
                local_rank: local,
                device: local,
                ring_address: None,
                exit: None,
            })
        })
        .collect()
}

/// The job's ranks grouped by worker, as commands carry them.
pub(super) fn slots_by_worker(job: &JobRecord) -> Vec<(String, Vec<Slot>)> {
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

/// Whether a running job is below `workers.max` and far enough from its end to re-form larger.
fn may_grow(job: &JobRecord) -> bool {
    job.state == JobState::Running
        && job.growing != job.generation
        && job.world_size() < job.spec.workers.max_workers() * job.spec.workers.devices_per_worker
        && job.progress.as_ref().is_some_and(|p| {
            p.step > 0 && (job.total_steps() == 0 || p.step + 1 < job.total_steps())
        })
}

impl Scheduler {
    /// Starts the first waiting job (submission order) if enough workers are free; with none
    /// waiting, grows a shrunk one.
    pub(super) fn schedule(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let Some(id) = self.jobs().find(|j| j.waiting()).map(|j| j.id.clone()) else {
            self.grow(now, actions);
            return;
        };
        let job = &self.jobs[&id];
        // A restarting job waits until its previous generation's trainers are all gone, and until
        // its checkpoint commits in flight resolved: the next generation resumes from them.
        if job.ranks.iter().any(|r| r.exit.is_none()) || self.commits.contains_key(&id) {
            return;
        }
        let need = job.spec.workers.devices_per_worker;
        let free = self.workers.free(job.spec.task, need);
        if (free.len() as u32) < job.spec.workers.min {
            return;
        }
        let take = free.len().min(job.spec.workers.max_workers() as usize);
        let chosen = &free[..take];
        let all_cuda = chosen
            .iter()
            .all(|w| self.workers.get(w).is_some_and(|w| w.cuda));
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
        job.ranks = assign_ranks(chosen, need);
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

    /// Asks one running job below `workers.max` to checkpoint and leave when free workers could
    /// join it (only when no job waits: queued jobs come first). The trainers commit, exit 75, and
    /// the next generation forms with the extra workers, resuming from that checkpoint.
    fn grow(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let Some(id) = self.jobs().find(|j| may_grow(j)).map(|j| j.id.clone()) else {
            return;
        };
        let job = &self.jobs[&id];
        let free = self
            .workers
            .free(job.spec.task, job.spec.workers.devices_per_worker);
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use xvlm_proto::spec::{JobSpec, TaskKind};

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

    fn submit_event(spec: JobSpec) -> Event {
        Event::Submit {
            spec: Box::new(spec),
            files: vec![],
            output_root: "file:///r".into(),
        }
    }

    fn pretrain(min: u32) -> JobSpec {
        JobSpec {
            task: TaskKind::Pretrain,
            config: Some("/configs/Pretrain.yaml".into()),
            ..spec(min, 1, 0)
        }
    }

    /// A task no registered worker runs is refused at submit naming the task and what the workers
    /// run; `workers.min` counts only the workers that run the job's task.
    #[test]
    fn submit_refuses_a_task_no_worker_runs() {
        let mut s = Scheduler::new(10_000);
        register_with_tasks(&mut s, "a", 1, &[TaskKind::Smoke], 0);
        let err = s.apply(0, submit_event(pretrain(1))).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CoordError::Unsatisfiable { .. }), "{text}");
        assert!(
            text.starts_with("task: no registered worker can run task pretrain")
                && text.ends_with("the registered workers run smoke"),
            "{text}"
        );
        assert_eq!(s.jobs().count(), 0, "nothing was queued");
        register_with_tasks(&mut s, "b", 1, &[TaskKind::Smoke, TaskKind::Pretrain], 0);
        let err = s.apply(0, submit_event(pretrain(2))).unwrap_err();
        assert!(
            err.to_string()
                .contains("only 1 such worker(s) that run task pretrain"),
            "{err}"
        );
        assert!(s.apply(0, submit_event(pretrain(1))).is_ok());
    }

    /// Placement uses only workers that run the job's task: the free smoke-only worker is passed
    /// over, and the job waits for (and then takes) the one that runs it.
    #[test]
    fn placement_uses_only_workers_that_run_the_task() {
        let mut s = Scheduler::new(10_000);
        register_with_tasks(&mut s, "old", 1, &[TaskKind::Smoke], 0);
        register_with_tasks(&mut s, "new", 1, &[TaskKind::Smoke, TaskKind::Pretrain], 0);
        let busy = submit(&mut s, spec(1, 1, 0));
        let first = s.job(&busy).unwrap().ranks[0].worker.clone();
        assert_eq!(first, "new", "smoke goes to the first free worker");
        let job = submit(&mut s, pretrain(1));
        assert_eq!(
            s.job(&job).unwrap().state,
            JobState::Pending,
            "old cannot run it"
        );
        ready_all(&mut s, &busy);
        exit_all(&mut s, &busy, 0);
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Rendezvous);
        assert_eq!(rec.ranks[0].worker, "new");
    }

    /// A job queued before any worker registered waits while none is; once workers are registered
    /// and none runs its task for a heartbeat timeout, it fails naming the task (and frees the queue).
    /// A worker that runs it arriving within the timeout starts it instead.
    #[test]
    fn job_queued_before_workers_fails_when_none_runs_its_task() {
        let mut s = Scheduler::new(10_000);
        let job = submit(&mut s, pretrain(1));
        s.apply(50_000, Event::Tick).unwrap();
        assert_eq!(
            s.job(&job).unwrap().state,
            JobState::Pending,
            "no worker yet: it waits"
        );
        register_with_tasks(&mut s, "old", 1, &[TaskKind::Smoke], 60_000);
        let queued = submit(&mut s, spec(1, 1, 0));
        s.apply(69_999, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Pending);
        assert_eq!(
            s.job(&queued).unwrap().state,
            JobState::Pending,
            "behind it"
        );
        s.workers.touch("old", 70_000);
        let a = s.apply(70_000, Event::Tick).unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Failed);
        assert!(
            rec.message
                .contains("no registered worker can run task pretrain"),
            "{}",
            rec.message
        );
        assert!(a
            .actions
            .iter()
            .any(|x| matches!(x, Action::Persist(r) if r.id == job)));
        assert_eq!(s.job(&queued).unwrap().state, JobState::Rendezvous);

        let mut s = Scheduler::new(10_000);
        let job = submit(&mut s, pretrain(1));
        register_with_tasks(&mut s, "old", 1, &[TaskKind::Smoke], 1_000);
        register_with_tasks(&mut s, "new", 1, &[TaskKind::Pretrain], 9_000);
        let rec = s.job(&job).unwrap();
        assert_eq!(
            (rec.state, rec.ranks[0].worker.as_str()),
            (JobState::Rendezvous, "new")
        );
    }
}
