//! Preemption: SIGTERM to a worker daemon drains it. Its trainer and the other worker's trainer agree
//! on the next step boundary, commit a checkpoint of exactly that step (the job has no periodic
//! checkpoints, so nothing older exists), and exit; the daemon disconnects, and generation 2 forms
//! from the remaining worker (world 1, accumulating the fixed global batch), resumes from that step and
//! ends with the weights of an uninterrupted world-2 run (tolerance 1e-5: summation order). A drain is
//! not a failure: the job has `max_restarts: 0` and still succeeds.

use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, diff_to_uninterrupted_world_2, gen_logs, last_line, resumed_step,
    step_after, trainer_pids,
};
use xvlm_e2e::{alive, wait_until, write, Cluster};

const JOB: &str = "name: preempt\ntask: smoke\nsteps: 80\nseed: 13\nworkers: {min: 1, max: 2}\n\
max_restarts: 0\ncheckpoint: {every_steps: 0, keep_last: 3}\nsmoke: {step_delay_ms: 80}\n";

/// Steps done according to `status`.
fn step_of(c: &Cluster, job: &str) -> u64 {
    c.status(job)
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/80")?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sigterm_drains_worker_without_losing_steps() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);

    wait_until(Duration::from_secs(40), || step_of(&c, &job) >= 15)
        .unwrap_or_else(|| panic!("job did not reach step 15:\n{}", c.logs()));
    let trainer = trainer_pids(dir.path(), "w1", &job, 1);
    assert_eq!(trainer.len(), 1, "one trainer on w1");
    let before = step_of(&c, &job);
    let w1 = c
        .workers
        .iter()
        .position(|w| w.log.ends_with("w1.log"))
        .expect("w1 started");
    // SAFETY: kill(2) of a daemon this test started.
    unsafe { libc::kill(c.workers[w1].child.id() as i32, libc::SIGTERM) };
    let mut exit = None;
    wait_until(Duration::from_secs(30), || {
        exit = c.workers[w1].child.try_wait().ok().flatten();
        exit.is_some()
    })
    .unwrap_or_else(|| panic!("drained daemon did not exit:\n{}", c.logs()));
    assert!(
        exit.is_some_and(|s| s.success()),
        "daemon exit {exit:?}:\n{}",
        c.logs()
    );
    assert!(!alive(trainer[0].1), "w1's trainer outlived the drain");
    let daemon_log = std::fs::read_to_string(&c.workers[w1].log).unwrap_or_default();
    assert!(daemon_log.contains("draining"), "{daemon_log}");

    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED")
            && last.contains("gen=2")
            && last.contains("world=1")
            && !last.contains("restarts="),
        "expected success in generation 2 at world 1: {last}\n{watch}"
    );
    let g1 = gen_logs(dir.path(), &["w0", "w1"], &job, 1);
    let saved = step_after(&g1, "preempted: checkpoint step-")
        .unwrap_or_else(|| panic!("generation 1 did not checkpoint on the drain:\n{g1}"));
    let g2 = gen_logs(dir.path(), &["w0"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    println!(
        "status showed step {before} before SIGTERM; drain committed step-{saved}; \
         generation 2 resumed from step-{resumed}"
    );
    assert_eq!(
        resumed, saved,
        "resumed from another checkpoint than the drain's"
    );
    assert!(
        resumed >= before && resumed < 80,
        "drain checkpoint step {resumed} is older than the step {before} seen before SIGTERM"
    );
    assert_eq!(
        committed_checkpoints(&output),
        vec![saved],
        "only the drain checkpoint exists"
    );

    c.add_worker("w2", 1);
    let diff = diff_to_uninterrupted_world_2(&c, &output, JOB);
    println!("max |weight diff| vs uninterrupted world 2: {diff:e}");
    assert!(
        diff < 1e-5,
        "drained run differs from the uninterrupted one by {diff}"
    );
}
