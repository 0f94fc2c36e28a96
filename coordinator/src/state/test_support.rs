//! Helpers shared by the state machine's unit tests: a small job spec and the events that drive a
//! scheduler through registration, rendezvous, progress, parts and exits.

use xvlm_proto::checkpoint::Part;
use xvlm_proto::spec::{Backend, JobSpec, TaskKind, WorkersSpec};

use super::{Action, Command, Event, Millis, ProgressInfo, Scheduler};

/// A smoke job needing `min` workers with `devices` devices each.
pub(crate) fn spec(min: u32, devices: u32, max_restarts: u32) -> JobSpec {
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

/// Submits `spec` at time 0; returns its id.
pub(crate) fn submit(s: &mut Scheduler, spec: JobSpec) -> String {
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

/// Registers a worker that runs smoke and pretrain jobs and opens its heartbeat stream.
pub(crate) fn register(s: &mut Scheduler, name: &str, slots: u32) -> Vec<Action> {
    register_with_tasks(s, name, slots, &[TaskKind::Smoke, TaskKind::Pretrain], 0)
}

/// Registers a worker whose build runs `tasks` at time `at` and opens its heartbeat stream.
pub(crate) fn register_with_tasks(
    s: &mut Scheduler,
    name: &str,
    slots: u32,
    tasks: &[TaskKind],
    at: Millis,
) -> Vec<Action> {
    let registered = s
        .apply(
            at,
            Event::Register {
                name: name.into(),
                host: "127.0.0.1".into(),
                slots,
                cuda: false,
                tasks: tasks.to_vec(),
            },
        )
        .unwrap();
    // Nothing is scheduled onto a worker whose command stream is not open yet.
    assert!(registered
        .actions
        .iter()
        .all(|a| !matches!(a, Action::Send { .. })));
    s.apply(
        at,
        Event::Heartbeat {
            worker: name.into(),
            draining: false,
            running: vec![],
        },
    )
    .unwrap()
    .actions
}

/// Every rank of the current generation reports ready.
pub(crate) fn ready_all(s: &mut Scheduler, job: &str) -> Vec<Action> {
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

/// Every rank of the current generation exits with `code`.
pub(crate) fn exit_all(s: &mut Scheduler, job: &str, code: i32) {
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

/// The commands among `actions`, with their workers.
pub(crate) fn sends(actions: &[Action]) -> Vec<(&str, &Command)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { worker, command } => Some((worker.as_str(), command)),
            _ => None,
        })
        .collect()
}

/// Rank `rank` of the current generation reports `step` at `at`.
pub(crate) fn progress(
    s: &mut Scheduler,
    job: &str,
    rank: u32,
    step: u64,
    at: Millis,
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
            metrics: vec![],
        },
    )
    .unwrap()
    .actions
}

/// A scheduler with workers `a` and `b` running generation 1 of a job of `spec`.
pub(crate) fn running_on_a_and_b(spec: JobSpec) -> (Scheduler, String) {
    let mut s = Scheduler::new(1_000_000);
    register(&mut s, "a", 1);
    register(&mut s, "b", 1);
    let job = submit(&mut s, spec);
    ready_all(&mut s, &job);
    (s, job)
}

/// A two-worker job of 1000 steps with these hang bounds (20 s to start).
pub(crate) fn hang_spec(min_secs: f64, p99_factor: f64) -> JobSpec {
    let mut sp = spec(2, 1, 1);
    sp.steps = Some(1000);
    sp.hang.min_secs = min_secs;
    sp.hang.p99_factor = p99_factor;
    sp.hang.startup_secs = 20.0;
    sp
}

/// Rank `rank` uploads its part of `step`; returns the actions.
pub(crate) fn part(
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

/// The commits among `actions`.
pub(crate) fn commits(actions: &[Action]) -> Vec<&Action> {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Commit { .. }))
        .collect()
}
