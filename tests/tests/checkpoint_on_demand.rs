//! `xvlm-coord checkpoint JOB --wait` on a job with no periodic checkpoints: a committed (manifested)
//! checkpoint appears at a step between the request and the end, and `latest` points at it.

use std::time::Duration;

use xvlm_e2e::checkpoints::committed_checkpoints;
use xvlm_e2e::{text, wait_until, Cluster};

const STEPS: u64 = 120;

#[test]
fn checkpoint_now_commits_between_request_and_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml(&format!(
        "name: ondemand\ntask: smoke\nsteps: {STEPS}\nworkers: {{min: 2}}\n\
             checkpoint: {{every_steps: 0}}\nsmoke: {{step_delay_ms: 60}}\n"
    ));
    let output = dir.path().join("runs").join(&job);
    wait_until(Duration::from_secs(60), || c.step(&job) >= 5)
        .unwrap_or_else(|| panic!("job never stepped:\n{}", c.logs()));
    let before = c.step(&job);
    assert!(committed_checkpoints(&output).is_empty(), "every_steps 0");

    let out = c.cli(&["checkpoint", &job, "--wait"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        text(&out.stderr),
        c.logs()
    );
    let step: u64 = stdout
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step in {stdout:?}"));
    println!("requested after step {before}; committed at step {step}");
    assert!(
        step > before && step < STEPS,
        "committed at {step}, requested after {before}"
    );
    assert_eq!(committed_checkpoints(&output), vec![step]);
    let latest = std::fs::read_to_string(output.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{step}"));
    let manifest =
        std::fs::read_to_string(output.join(format!("checkpoints/step-{step}/MANIFEST.json")))
            .unwrap();
    for file in ["model.safetensors", "rank-0.json", "rank-1.json"] {
        assert!(manifest.contains(file), "{file} not in {manifest}");
    }
    c.watch_succeeded(&job);

    // A finished job takes no requests, and says why.
    let late = c.cli(&["checkpoint", &job]);
    assert!(!late.status.success());
    assert!(
        text(&late.stderr).contains("RUNNING"),
        "{}",
        text(&late.stderr)
    );
}
