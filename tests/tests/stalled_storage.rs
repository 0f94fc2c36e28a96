//! A checkpoint commit against a stalled S3 store: a proxy in front of the S3 test server (moto) holds
//! the coordinator's first commit PUT for 28 s, well past the 10 s heartbeat timeout, while 8 workers
//! heartbeat. The coordinator commits off its state lock: it keeps answering (list), declares no
//! worker lost, the commit completes once the store answers, and the job succeeds in generation 1.
//! The trainers reach S3 directly; only the coordinator goes through the proxy.

use std::time::{Duration, Instant};

use xvlm_e2e::stall::StallingProxy;
use xvlm_e2e::{
    http, start_coordinator_with_env, start_moto_for_children, text, wait_until, Cluster,
};

/// How long the proxy holds a PUT: past the heartbeat timeout (10 s), within the commit budget
/// (60 s) and object_store's request timeout (30 s), so the held request itself completes.
const HOLD: Duration = Duration::from_secs(28);

fn manifests(moto: &xvlm_e2e::Moto) -> usize {
    let get = format!(
        "GET /ckpts?list-type=2&prefix=stall/checkpoints/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        moto.addr
    );
    http(&moto.addr, &get)
        .map(|r| r.matches("MANIFEST.json</Key>").count())
        .unwrap_or(0)
}

#[test]
fn stalled_commit_loses_no_worker() {
    let started = Instant::now();
    let moto = start_moto_for_children();
    let proxy = StallingProxy::start(&moto.addr, HOLD);
    proxy.stall(true);
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) =
        // TensorBoard events go to the same store: written only at shutdown here, so the PUT the
        // proxy holds is the commit's.
        start_coordinator_with_env(
            dir.path(),
            "127.0.0.1:0",
            &[
                ("AWS_ENDPOINT", &proxy.url),
                ("XVLM_TENSORBOARD_FLUSH_SECS", "600"),
            ],
        );
    let mut c = Cluster::around(dir.path(), (coord, url));
    for i in 0..8 {
        c.add_worker(&format!("w{i}"), 1);
    }
    let job = c.submit_yaml(
        "name: stall\ntask: smoke\nsteps: 30\nworkers: {min: 8}\nmax_restarts: 0\n\
         output: s3://ckpts/stall\ncheckpoint: {every_steps: 10, keep_last: 1}\n\
         smoke: {step_delay_ms: 50}\n",
    );
    // The first commit's first PUT (step-10's manifest) is held; the later ones go through. The
    // trainers save steps 10 and 20 (the last step, 30, writes final weights instead) and exit.
    wait_until(Duration::from_secs(40), || proxy.held() > 0)
        .unwrap_or_else(|| panic!("no commit reached the store:\n{}", c.logs()));
    let held_at = Instant::now();
    proxy.stall(false);
    // While the store stalls, past the heartbeat timeout, the coordinator answers at once.
    let mut answers = Vec::new();
    while held_at.elapsed() < Duration::from_secs(16) {
        let asked = Instant::now();
        let out = c.cli(&["list"]);
        assert!(out.status.success(), "list: {}", text(&out.stderr));
        answers.push(asked.elapsed());
        std::thread::sleep(Duration::from_secs(2));
    }
    let slowest = answers.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(3),
        "list waited on the stalled commit: {answers:?}\n{}",
        c.logs()
    );
    assert_eq!(proxy.released(), 0, "the PUT is still held");
    let out = c.watch_succeeded(&job);
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.contains("SUCCEEDED gen=1 world=8") && last.contains("ckpt=step-20"),
        "{out}\n{}",
        c.logs()
    );
    assert!(
        held_at.elapsed() >= HOLD - Duration::from_secs(1),
        "the job ended before the held commit did"
    );
    assert_eq!(proxy.released(), 1);
    let log = std::fs::read_to_string(&c.coord.log).unwrap_or_default();
    assert!(!out.contains("RESTARTING"), "{out}");
    for bad in ["heartbeat lost", "checkpoint not committed"] {
        assert!(!log.contains(bad), "coordinator log has {bad:?}:\n{log}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("checkpoint committed") && l.contains("step=10")),
        "step-10's commit did not complete:\n{log}"
    );
    assert_eq!(manifests(&moto), 1, "keep_last 1: step-10 was pruned");
    println!(
        "list answered in at most {slowest:?} during the stall; test took {:?}",
        started.elapsed()
    );
}
