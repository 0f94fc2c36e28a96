//! A trainer that exits non-zero fails its generation: the job restarts up to `max_restarts` (new
//! generation), then ends FAILED with the trainer's error in the status, and `watch` exits non-zero.

use xvlm_e2e::{text, write, Cluster};

/// A task config missing required keys passes submit (the file exists) but every trainer exits with an
/// error naming the file and the key.
#[test]
fn failing_trainer_restarts_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    write(dir.path(), "task.yaml", "batch_size_train: 2\n");
    let job = c.submit_yaml(
        "name: doomed\ntask: pretrain\nconfig: task.yaml\nworkers: {min: 2}\nmax_restarts: 1\n",
    );
    let watch = c.cli(&["watch", &job]);
    let out = text(&watch.stdout);
    assert!(
        !watch.status.success(),
        "watch of a failed job must fail:\n{out}"
    );
    assert!(
        out.contains("RESTARTING"),
        "no restart seen:\n{out}\n{}",
        c.logs()
    );
    let last = out.lines().last().unwrap_or_default();
    assert!(last.contains("FAILED gen=2"), "{out}");
    assert!(
        last.contains("task.yaml is invalid") && last.contains("image_res"),
        "{out}"
    );
}
