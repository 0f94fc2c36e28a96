//! Checkpoints of real trainer processes in a real S3-compatible server (moto on loopback, configured
//! through the usual AWS_* environment): kill -9 of a trainer, generation 2 resumes from S3, retention.

use std::time::Duration;

use xvlm_e2e::{alive, http, start_moto_for_children, text, wait_until, Cluster};

fn manifests(moto: &xvlm_e2e::Moto) -> usize {
    let get = format!(
        "GET /ckpts?list-type=2&prefix=s3job/checkpoints/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        moto.addr
    );
    http(&moto.addr, &get)
        .map(|r| r.matches("MANIFEST.json</Key>").count())
        .unwrap_or(0)
}

#[test]
fn s3_checkpoints_survive_a_killed_trainer() {
    let moto = start_moto_for_children();
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml("name: s3\ntask: smoke\nsteps: 40\nworkers: {min: 2}\nmax_restarts: 1\noutput: s3://ckpts/s3job\n\
         checkpoint: {every_steps: 5, keep_last: 2}\nsmoke: {step_delay_ms: 80}\n");
    wait_until(Duration::from_secs(40), || manifests(&moto) > 0)
        .unwrap_or_else(|| panic!("no checkpoint committed in S3:\n{}", c.logs()));
    std::thread::sleep(Duration::from_millis(200));
    let pid_dir = dir.path().join(format!("work-w1/{job}/g1"));
    let pid: u32 = std::fs::read_dir(&pid_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "pid"))
        .and_then(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
        .expect("trainer pid");
    assert!(alive(pid), "trainer finished before the kill");
    // SAFETY: plain kill(2) of a pid this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let watch = c.cli(&["watch", &job]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let log: String = ["w0", "w1"]
        .iter()
        .filter_map(|w| std::fs::read_dir(dir.path().join(format!("work-{w}/{job}/g2"))).ok())
        .flat_map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(
        log.contains("generation 2 resuming from committed checkpoint step-")
            && log.contains("s3://ckpts/s3job/checkpoints/step-"),
        "generation 2 did not resume from S3:\n{log}\n{}",
        c.logs()
    );
    let kept = manifests(&moto);
    assert!(
        (1..=2).contains(&kept),
        "keep_last 2, found {kept} manifests"
    );
}
