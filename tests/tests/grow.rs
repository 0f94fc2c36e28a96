//! Growing back: a job with `workers: {min: 1, max: 2}` starts on the only worker there is (world 1,
//! accumulating the fixed global batch). When a second worker registers, the coordinator asks the
//! running generation to checkpoint and leave; generation 2 forms with both workers at world 2,
//! resumes from exactly that checkpoint, uses no restart (`max_restarts: 0`), and ends with the weights
//! of an uninterrupted world-2 run (tolerance 1e-5: summation order).

use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, diff_to_uninterrupted_world_2, gen_logs, last_line, resumed_step,
};
use xvlm_e2e::{wait_until, write, Cluster};

const JOB: &str = "name: grow\ntask: smoke\nsteps: 80\nseed: 19\nworkers: {min: 1, max: 2}\n\
max_restarts: 0\ncheckpoint: {every_steps: 0, keep_last: 3}\nsmoke: {step_delay_ms: 80}\n";

#[test]
fn shrunk_job_grows_back_when_a_worker_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);
    let step = |c: &Cluster| -> u64 {
        c.status(&job)
            .split_whitespace()
            .find_map(|w| w.strip_suffix("/80")?.parse().ok())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(40), || step(&c) >= 5)
        .unwrap_or_else(|| panic!("job did not start on w0:\n{}", c.logs()));
    c.add_worker("w1", 1);

    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED")
            && last.contains("gen=2")
            && last.contains("world=2")
            && !last.contains("restarts="),
        "expected success in generation 2 at world 2 without a restart: {last}\n{watch}"
    );
    let g2 = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    assert_eq!(
        committed_checkpoints(&output),
        vec![resumed],
        "generation 2 resumed from the one checkpoint the growth took"
    );
    assert!(resumed > 0 && resumed < 80, "resumed from step {resumed}");
    let diff = diff_to_uninterrupted_world_2(&c, &output, JOB);
    println!("grew at step {resumed}; max |weight diff| vs uninterrupted world 2: {diff:e}");
    assert!(
        diff < 1e-5,
        "grown run differs from the uninterrupted one by {diff}"
    );
}
