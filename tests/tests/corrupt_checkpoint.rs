//! A committed checkpoint corrupted on disk: right after step S commits, one byte of its weights
//! file is flipped and a trainer is killed (-9). Generation 2 verifies S against its manifest's sha256,
//! logs that it is corrupted, resumes from the previous committed checkpoint, and the job still ends
//! with the weights of an uninterrupted run (same seed, same world).

use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, gen_logs, max_weight_diff, resumed_step, trainer_pids,
};
use xvlm_e2e::{alive, wait_until, write, Cluster};

const JOB: &str = "name: corrupt\ntask: smoke\nsteps: 60\nseed: 23\nworkers: {min: 2}\n\
max_restarts: 2\ncheckpoint: {every_steps: 10, keep_last: 3}\nsmoke: {step_delay_ms: 80}\n";

#[test]
fn corrupted_checkpoint_is_detected_and_the_previous_one_used() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let output = dir.path().join("runs").join(&job);

    // Poll finely: the next save is 10 steps (800 ms) away when S has just committed.
    let mut committed = Vec::new();
    wait_until(Duration::from_secs(40), || {
        committed = committed_checkpoints(&output);
        committed.len() >= 2
    })
    .unwrap_or_else(|| panic!("two checkpoints never committed:\n{}", c.logs()));
    let (previous, newest) = (
        committed[committed.len() - 2],
        committed[committed.len() - 1],
    );
    let weights = output.join(format!("checkpoints/step-{newest}/model.safetensors"));
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&weights, bytes).unwrap();
    let victim = trainer_pids(dir.path(), "w1", &job, 1);
    assert_eq!(victim.len(), 1, "one trainer on w1");
    assert!(alive(victim[0].1), "trainer finished before the kill");
    // SAFETY: kill(2) of a trainer this test's cluster started.
    unsafe { libc::kill(victim[0].1 as i32, libc::SIGKILL) };

    c.watch_succeeded(&job);
    let g2 = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    let line = g2
        .lines()
        .find(|l| l.contains(&format!("checkpoint step-{newest} is corrupted")))
        .unwrap_or_else(|| panic!("no corruption line for step-{newest}:\n{g2}"));
    println!(
        "committed {committed:?}; corrupted step-{newest}; resumed from step-{resumed}\n{line}"
    );
    assert!(
        line.contains("model.safetensors") && line.contains("sha256"),
        "the line names the file and the checksum: {line}"
    );
    assert_eq!(
        resumed, previous,
        "must resume the previous committed checkpoint"
    );

    let reference = c.submit(&write(dir.path(), "again.yaml", JOB));
    c.watch_succeeded(&reference);
    let diff = max_weight_diff(
        &output.join("final/model.safetensors"),
        &dir.path()
            .join("runs")
            .join(&reference)
            .join("final/model.safetensors"),
    );
    assert_eq!(diff, 0.0, "resumed run differs from the uninterrupted one");
}
