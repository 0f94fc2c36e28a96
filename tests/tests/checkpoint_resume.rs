//! kill -9 of one trainer after a committed checkpoint: generation 2 resumes from the committed step
//! and the job ends with weights bit-identical to an uninterrupted run with the same seed.

use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, gen_logs, resumed_step, tensor_hashes, trainer_pids,
};
use xvlm_e2e::{alive, text, wait_until, write, Cluster};

const JOB: &str =
    "name: resume\ntask: smoke\nsteps: 60\nseed: 11\nworkers: {min: 2}\nmax_restarts: 2\n\
checkpoint: {every_steps: 10, keep_last: 2}\nsmoke: {step_delay_ms: 80}\n";

#[test]
fn killed_trainer_resumes_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);

    wait_until(Duration::from_secs(40), || {
        !committed_checkpoints(&output).is_empty()
    })
    .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", c.logs()));
    let saved = committed_checkpoints(&output)[0];
    // The manifest is written at a later step boundary; let a few more steps pass.
    std::thread::sleep(Duration::from_millis(300));
    let victim = trainer_pids(dir.path(), "w1", &job, 1);
    assert_eq!(victim.len(), 1, "one trainer on w1");
    assert!(alive(victim[0].1), "trainer finished before the kill");
    // SAFETY: plain kill(2) of a pid this test's cluster started.
    unsafe { libc::kill(victim[0].1 as i32, libc::SIGKILL) };

    let watch = c.cli(&["watch", &job]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let g2_logs = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2_logs)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2_logs}\n{}", c.logs()));
    assert!(
        g2_logs.contains("generation 2 resuming"),
        "log names the generation:\n{g2_logs}"
    );
    assert!(
        resumed >= saved && resumed.is_multiple_of(10),
        "resumed from step {resumed}, first commit was {saved}"
    );
    println!("first commit step-{saved}; generation 2 resumed from step-{resumed}");
    assert!(
        committed_checkpoints(&output).len() <= 2,
        "keep_last 2: {:?}",
        committed_checkpoints(&output)
    );

    // The same job, uninterrupted, in another output directory.
    let reference = c.submit(&write(dir.path(), "again.yaml", JOB));
    let watch = c.cli(&["watch", &reference]);
    assert!(watch.status.success(), "{}", c.logs());
    let got = tensor_hashes(&output.join("final/model.safetensors"));
    let want = tensor_hashes(
        &dir.path()
            .join("runs")
            .join(&reference)
            .join("final/model.safetensors"),
    );
    assert!(!got.is_empty());
    assert_eq!(got, want, "resumed run differs from the uninterrupted one");
}
