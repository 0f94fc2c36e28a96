//! kill -9 of a trainer while a checkpoint upload is in flight: w1's uploads are held open by the
//! `XVLM_TEST_UPLOAD_DELAY_MS` hook, so step S2 has w0's part but neither w1's part nor a manifest when
//! w1's trainer is killed. Generation 2 must resume from the previous committed checkpoint S1, never
//! from the half-written S2, and the job succeeds.

use std::time::Duration;

use xvlm_e2e::checkpoints::{committed_checkpoints, gen_logs, resumed_step, trainer_pids};
use xvlm_e2e::{alive, wait_until, write, Cluster};

const JOB: &str = "name: upload-kill\ntask: smoke\nsteps: 40\nseed: 17\nworkers: {min: 2}\n\
max_restarts: 2\ncheckpoint: {every_steps: 10, keep_last: 3}\nsmoke: {step_delay_ms: 100}\n";

#[test]
fn killed_mid_upload_resumes_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path());
    c.add_worker("w0", 1);
    c.add_worker_with_env("w1", 1, &[("XVLM_TEST_UPLOAD_DELAY_MS", "2500")]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);
    let ckpts = output.join("checkpoints");

    let mut pids = (Vec::new(), Vec::new());
    wait_until(Duration::from_secs(20), || {
        pids = (
            trainer_pids(dir.path(), "w0", &job, 1),
            trainer_pids(dir.path(), "w1", &job, 1),
        );
        pids.0.len() == 1 && pids.1.len() == 1
    })
    .unwrap_or_else(|| panic!("trainers did not start:\n{}", c.logs()));
    let (fast_rank, slow) = (pids.0[0].0, pids.1[0]);
    // S2: a step after the first commit S1 whose fast part is in, slow part and manifest are not.
    let mut found = None;
    wait_until(Duration::from_secs(40), || {
        let done = committed_checkpoints(&output);
        let Some(&s1) = done.last() else { return false };
        found = (1..=4).map(|k| s1 + 10 * k).find(|s2| {
            let d = ckpts.join(format!("step-{s2}"));
            d.join(format!("rank-{fast_rank}.json")).is_file()
                && !d.join(format!("rank-{}.json", slow.0)).exists()
                && !d.join("MANIFEST.json").exists()
        });
        found.map(|s2| (s1, s2)).is_some()
    })
    .unwrap_or_else(|| panic!("never saw a half-uploaded checkpoint:\n{}", c.logs()));
    let s2 = found.expect("set above");
    let s1 = *committed_checkpoints(&output).last().expect("a commit");
    assert!(alive(slow.1), "slow trainer already gone");
    // SAFETY: kill(2) of a trainer this test's cluster started.
    unsafe { libc::kill(slow.1 as i32, libc::SIGKILL) };
    let step2 = ckpts.join(format!("step-{s2}"));
    assert!(
        !step2.join("MANIFEST.json").exists(),
        "step-{s2} was committed without the killed rank's part"
    );

    c.watch_succeeded(&job);
    let g2 = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    println!("killed rank {} mid-upload of step-{s2}; last commit step-{s1}; resumed from step-{resumed}", slow.0);
    assert_eq!(resumed, s1, "must resume the last committed checkpoint");
    assert_ne!(resumed, s2, "resumed the half-uploaded checkpoint");
    assert!(
        g2.contains(&format!("resuming from committed checkpoint step-{s1}")),
        "{g2}"
    );
    assert!(
        output.join("final/model.safetensors").is_file(),
        "no final weights"
    );
}
