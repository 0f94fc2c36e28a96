//! Workers advertise the tasks their build runs (here narrowed with the `XVLM_TEST_WORKER_TASKS` test
//! hook): a task no registered worker runs is refused at submit; a job of that task queued before any
//! worker registered fails once the workers that did cannot run it, instead of waiting forever, and
//! the queue behind it moves on to a task they run.

use std::time::{Duration, Instant};

use xvlm_e2e::{text, wait_until, write, Cluster};

const PRETRAIN: &str = "name: pt\ntask: pretrain\nconfig: Pretrain.yaml\nsteps: 5\n";
const SMOKE: &str = "name: sm\ntask: smoke\nsteps: 3\n";

#[test]
fn tasks_no_worker_runs_are_refused_or_failed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "Pretrain.yaml", "");
    let pretrain = write(dir.path(), "pretrain.yaml", PRETRAIN);
    let mut c = Cluster::start(dir.path());
    // No worker yet (as under `xvlm-coord run`): queued.
    let early = c.submit(&pretrain);
    assert!(c.status(&early).contains("PENDING"));
    c.add_worker_with_env("w0", 1, &[("XVLM_TEST_WORKER_TASKS", "smoke")]);
    let registered = Instant::now();

    let out = c.cli(&["submit", pretrain.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a pretrain job was accepted");
    assert!(
        err.contains(
            "task: no registered worker can run task pretrain: the registered workers run smoke"
        ),
        "{err}"
    );

    // Queued behind the early job, which blocks the queue until it fails.
    let smoke = c.submit_yaml(SMOKE);
    let out = c.watch_succeeded(&smoke);
    assert!(out.contains("SUCCEEDED"), "{out}");
    wait_until(Duration::from_secs(5), || {
        c.status(&early).contains("FAILED")
    })
    .unwrap_or_else(|| panic!("{}\n{}", c.status(&early), c.logs()));
    let failed_after = registered.elapsed();
    let status = c.status(&early);
    assert!(
        status.contains("no registered worker can run task pretrain"),
        "{status}"
    );
    // One heartbeat timeout (10 s) after the worker registered, not before.
    assert!(
        failed_after >= Duration::from_millis(9_500) && failed_after < Duration::from_secs(30),
        "failed after {failed_after:?}"
    );
}
