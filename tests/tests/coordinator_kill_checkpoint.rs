//! kill -9 of the coordinator in the middle of a job that checkpoints: the trainers keep training and
//! uploading checkpoint parts while it is down, but nothing is committed (the coordinator writes every
//! manifest). Restarted on the same state directory and address, it gets the held parts from the
//! re-registering workers, commits them, and generation 2 resumes from a checkpoint saved while it
//! was down; the final weights equal those of an uninterrupted run of the same job.

use std::time::Duration;

use xvlm_e2e::checkpoints::{committed_checkpoints, gen_logs, resumed_step};
use xvlm_e2e::{start_coordinator_at, wait_until, write, Cluster};

const JOB: &str = "name: coordkill\ntask: smoke\nsteps: 60\nseed: 3\nworkers: {min: 2}\n\
checkpoint: {every_steps: 10, keep_last: 2}\nsmoke: {step_delay_ms: 80}\n";

#[test]
fn coordinator_killed_mid_job_resumes_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);
    wait_until(Duration::from_secs(60), || {
        !committed_checkpoints(&output).is_empty()
    })
    .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", c.logs()));
    c.coord.kill();
    let killed_with = committed_checkpoints(&output);
    // Down for a while: the trainers keep going and upload parts, which nobody commits.
    std::thread::sleep(Duration::from_millis(1500));
    let newest = *killed_with.last().expect("a commit");
    let uploaded = std::fs::read_dir(output.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .filter(|&s: &u64| s > newest)
        .max()
        .unwrap_or_else(|| panic!("no parts uploaded while the coordinator was down"));
    assert_eq!(
        committed_checkpoints(&output),
        killed_with,
        "a checkpoint was committed without the coordinator"
    );
    let addr = c.url.trim_start_matches("http://").to_string();
    let (coord, url) = start_coordinator_at(dir.path(), &addr);
    c.coord = coord;
    c.url = url;
    let out = c.watch_succeeded(&job);
    assert!(
        out.lines()
            .last()
            .unwrap_or_default()
            .contains("SUCCEEDED gen=2 world=2 step=60/60"),
        "{out}"
    );
    assert!(
        out.contains("ckpt=step-50"),
        "the last commit is reported to the restarted coordinator:\n{out}"
    );
    let g2 = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    println!(
        "killed with commits {killed_with:?}; step-{uploaded} uploaded while down; generation 2 resumed from step-{resumed}"
    );
    assert!(
        resumed >= uploaded,
        "resumed from step-{resumed}, not from step-{uploaded} uploaded while the coordinator was down"
    );

    let reference = c.submit(&write(dir.path(), "again.yaml", JOB));
    c.watch_succeeded(&reference);
    let got = std::fs::read(output.join("final/model.safetensors")).unwrap();
    let want = std::fs::read(
        dir.path()
            .join("runs")
            .join(&reference)
            .join("final/model.safetensors"),
    )
    .unwrap();
    assert_eq!(got, want, "resumed run differs from the uninterrupted one");
}
