//! Elastic restart: kill -9 of a whole worker daemon (its trainer dies with it) in a job with
//! `workers: {min: 1, max: 2}`. Generation 2 forms from the one live worker, resumes from the latest
//! committed checkpoint (saved by 2 ranks, re-derived for 1) and keeps the global batch by
//! accumulating 2 micro-batches, so the job ends with the weights of an uninterrupted 2-rank run up to
//! float summation order (tolerance 1e-5).

use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, diff_to_uninterrupted_world_2, gen_logs, last_line, resumed_step,
    trainer_pids,
};
use xvlm_e2e::{alive, wait_until, write, Cluster};

const JOB: &str = "name: elastic\ntask: smoke\nsteps: 60\nseed: 11\nworkers: {min: 1, max: 2}\n\
max_restarts: 2\ncheckpoint: {every_steps: 10, keep_last: 3}\nsmoke: {step_delay_ms: 80}\n";

#[test]
fn killed_worker_daemon_continues_at_smaller_world() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);

    wait_until(Duration::from_secs(40), || {
        !committed_checkpoints(&output).is_empty()
    })
    .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", c.logs()));
    std::thread::sleep(Duration::from_millis(300));
    let first = committed_checkpoints(&output)[0];
    let orphans = trainer_pids(dir.path(), "w1", &job, 1);
    assert_eq!(orphans.len(), 1, "one trainer on w1");
    assert!(alive(orphans[0].1), "trainer finished before the kill");
    // kill -9 of the whole daemon (Proc::kill is SIGKILL + reap).
    let w1 = c
        .workers
        .iter()
        .position(|w| w.log.ends_with("w1.log"))
        .expect("w1 started");
    c.workers[w1].kill();
    wait_until(Duration::from_secs(5), || !alive(orphans[0].1)).unwrap_or_else(|| {
        panic!(
            "trainer pid {} outlived its killed worker daemon",
            orphans[0].1
        )
    });

    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED") && last.contains("gen=2") && last.contains("world=1"),
        "expected success in generation 2 at world 1: {last}\n{watch}"
    );
    let logs = gen_logs(dir.path(), &["w0"], &job, 2);
    let resumed = resumed_step(&logs)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{logs}\n{}", c.logs()));
    assert!(
        resumed >= first && resumed > 0 && resumed.is_multiple_of(10),
        "resumed from step {resumed}, first commit was {first}"
    );
    assert!(
        logs.contains("saved by 2 ranks, re-derived for 1"),
        "the resume names the world change:\n{logs}"
    );

    // The same job, uninterrupted at world 2.
    c.add_worker("w2", 1);
    let diff = diff_to_uninterrupted_world_2(&c, &output, JOB);
    println!(
        "first commit step-{first}; generation 2 resumed from step-{resumed} at world 1; \
         max |weight diff| vs uninterrupted world 2: {diff:e}"
    );
    assert!(
        diff < 1e-5,
        "elastic run differs from the uninterrupted one by {diff}"
    );
}
