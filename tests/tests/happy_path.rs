//! Coordinator + 2 workers over loopback: a smoke job runs data-parallel to completion, and `watch`,
//! `status` and `list` show it; a second job queued behind it runs after it.

use std::time::Duration;

use xvlm_e2e::{text, wait_until, write, Cluster};

const JOB: &str = "name: e2e-smoke
task: smoke
steps: 40
workers: {min: 2}
smoke: {batch_size: 8, lr: 0.1}
";

/// Submit, watch to SUCCEEDED, check the status table and the final weights rank 0 wrote.
#[test]
fn two_workers_run_a_job_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    assert_eq!(job, "job-0001");
    let out = c.watch_succeeded(&job);
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("job-0001 SUCCEEDED gen=1 world=2 step=40/40 losses: mse="),
        "{out}"
    );
    let status = c.status(&job);
    let row = status.lines().nth(1).unwrap_or_default();
    for cell in ["job-0001", "e2e-smoke", "SUCCEEDED", " 2 ", "40/40", "mse="] {
        assert!(row.contains(cell), "status row lacks {cell:?}:\n{status}");
    }
    assert!(status.starts_with("JOB"), "{status}");
    // The loss went down over the run (first reported vs last).
    let mse = |line: &str| -> Option<f64> {
        line.split("mse=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let first = out.lines().find_map(mse).unwrap();
    let final_mse = mse(last).unwrap();
    assert!(final_mse < first, "mse {first} -> {final_mse}\n{out}");
    let weights = dir.path().join("runs/job-0001/final/model.safetensors");
    assert!(weights.is_file(), "{} missing", weights.display());
}

/// Two jobs wait in submission order: the second starts only after the first frees the workers.
#[test]
fn jobs_queue_in_submission_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let slow = JOB
        .replace("steps: 40", "steps: 30")
        .replace("lr: 0.1}", "lr: 0.1, step_delay_ms: 30}");
    let first = c.submit(&write(dir.path(), "a.yaml", &slow));
    let second = c.submit(&write(
        dir.path(),
        "b.yaml",
        &JOB.replace("min: 2", "min: 1"),
    ));
    // While the first holds both workers, the second waits its turn.
    wait_until(Duration::from_secs(30), || {
        c.status(&first).contains("RUNNING")
    })
    .unwrap_or_else(|| panic!("first job never ran:\n{}", c.logs()));
    let list = text(&c.cli(&["list"]).stdout);
    assert!(list.contains(&format!("{second}\tPENDING")), "{list}");
    let watch = c.cli(&["watch", &second]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let status = text(&c.cli(&["status"]).stdout);
    assert_eq!(status.matches("SUCCEEDED").count(), 2, "{status}");
}
