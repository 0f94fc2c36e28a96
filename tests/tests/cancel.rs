//! `xvlm-coord cancel` stops every trainer process of the job, `watch` exits non-zero, and the workers
//! are free for the next job.

use std::time::Duration;

use xvlm_e2e::{alive, text, wait_until, write, Cluster};

/// Cancel a running 2-worker job with 2 slots each: all 4 trainer pids disappear.
#[test]
fn cancel_stops_every_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path());
    c.add_worker("w0", 2);
    c.add_worker("w1", 2);
    let job = c.submit_yaml("name: long\ntask: smoke\nsteps: 100000\nworkers: {min: 2, devices_per_worker: 2}\nsmoke: {step_delay_ms: 20}\n");
    wait_until(Duration::from_secs(30), || {
        let s = c.status(&job);
        s.contains("RUNNING") && !s.contains(" 0/100000")
    })
    .unwrap_or_else(|| panic!("job never made progress:\n{}\n{}", c.status(&job), c.logs()));
    let mut pids = Vec::new();
    for w in ["w0", "w1"] {
        let gen_dir = dir.path().join(format!("work-{w}/{job}/g1"));
        for entry in std::fs::read_dir(&gen_dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "pid") {
                pids.push(
                    std::fs::read_to_string(&path)
                        .unwrap()
                        .trim()
                        .parse::<u32>()
                        .unwrap(),
                );
            }
        }
    }
    assert_eq!(pids.len(), 4, "expected 4 trainer pid files");
    assert!(
        pids.iter().all(|p| alive(*p)),
        "trainers not running before cancel"
    );
    let out = c.cli(&["cancel", &job]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("CANCELLED"));
    wait_until(Duration::from_secs(15), || pids.iter().all(|p| !alive(*p)))
        .unwrap_or_else(|| panic!("trainers still alive after cancel: {pids:?}\n{}", c.logs()));
    let watch = c.cli(&["watch", &job]);
    assert!(
        !watch.status.success(),
        "watch of a cancelled job must fail"
    );
    assert!(text(&watch.stdout).contains("CANCELLED"));
    // The workers were released: a new job runs to completion.
    let next = c.submit(&write(
        dir.path(),
        "next.yaml",
        "name: next\ntask: smoke\nsteps: 5\nworkers: {min: 2, devices_per_worker: 2}\n",
    ));
    let watch = c.cli(&["watch", &next]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
}

/// SIGKILL a worker mid-job: its trainers die with it (parent-death signal, no orphans), the
/// coordinator notices the closed stream, stops the other worker's trainers and fails the job (no
/// restarts: the default of 3 would wait for a second worker instead).
#[test]
fn killed_worker_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml(
        "name: victim\ntask: smoke\nsteps: 100000\nworkers: {min: 2}\nmax_restarts: 0\nsmoke: {step_delay_ms: 20}\n",
    );
    wait_until(Duration::from_secs(30), || {
        let s = c.status(&job);
        s.contains("RUNNING") && !s.contains(" 0/100000")
    })
    .unwrap_or_else(|| panic!("job never made progress:\n{}", c.logs()));
    let pid = |w: &str| -> u32 {
        let path = dir.path().join(format!(
            "work-{w}/{job}/g1/rank{}.pid",
            if w == "w0" { 0 } else { 1 }
        ));
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (p0, p1) = (pid("w0"), pid("w1"));
    assert!(alive(p0) && alive(p1));
    c.workers[0].kill();
    wait_until(Duration::from_secs(15), || !alive(p0) && !alive(p1)).unwrap_or_else(|| {
        panic!(
            "trainers survived: w0's {} w1's {}\n{}",
            alive(p0),
            alive(p1),
            c.logs()
        )
    });
    let watch = c.cli(&["watch", &job]);
    let out = text(&watch.stdout);
    assert!(!watch.status.success(), "{out}");
    assert!(out.contains("FAILED") && out.contains("worker w0"), "{out}");
}
