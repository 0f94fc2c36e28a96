//! A restarted coordinator still knows every job (redb store); `xvlm-coord` does not link libtorch;
//! `xvlm-coord run --local-workers` runs a job with no other setup.

use std::process::Command;
use std::time::Duration;

use xvlm_e2e::{
    bin, output_within, start_coordinator, start_coordinator_at, text, wait_until, write, Cluster,
};

/// `ldd xvlm-coord` lists no libtorch/libc10 while `ldd xvlm-worker` does (so the check can fail).
#[test]
fn coordinator_does_not_link_libtorch() {
    let ldd = |name: &str| {
        let out = Command::new("ldd")
            .arg(bin(name))
            .output()
            .expect("run ldd");
        text(&out.stdout)
    };
    let coord = ldd("xvlm-coord");
    assert!(
        !coord.contains("torch") && !coord.contains("c10"),
        "xvlm-coord links libtorch:\n{coord}"
    );
    let worker = ldd("xvlm-worker");
    assert!(
        worker.contains("libtorch_cpu"),
        "ldd sanity: worker should link libtorch:\n{worker}"
    );
}

/// Submit with no workers, kill the coordinator (SIGKILL, no shutdown path), restart it on the same
/// state: the job is still there and then runs when a worker arrives.
#[test]
fn restarted_coordinator_keeps_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path());
    let job = c.submit_yaml("name: kept\ntask: smoke\nsteps: 5\n");
    assert!(c.status(&job).contains("PENDING"));
    c.coord.kill();
    let (coord, url) = start_coordinator(dir.path());
    c.coord = coord;
    c.url = url;
    let status = c.status(&job);
    assert!(
        status.contains(&job) && status.contains("PENDING"),
        "{status}"
    );
    c.add_worker("w0", 1);
    let watch = c.cli(&["watch", &job]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let next = c.submit(&write(
        dir.path(),
        "two.yaml",
        "name: two\ntask: smoke\nsteps: 2\n",
    ));
    assert_eq!(next, "job-0002", "job ids continue after a restart");
}

/// One command: coordinator and 2 local workers, job to completion, exit 0.
#[test]
fn run_with_local_workers() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "job.yaml",
        "name: local\ntask: smoke\nsteps: 10\nworkers: {min: 2}\n",
    );
    let mut cmd = Command::new(bin("xvlm-coord"));
    cmd.args([
        "run",
        job.to_str().unwrap(),
        "--local-workers",
        "2",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .current_dir(dir.path())
    .env("XVLM_WORKER_BIN", bin("xvlm-worker"));
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("job-0001 SUCCEEDED gen=1 world=2 step=10/10"),
        "{stdout}"
    );
    assert!(dir
        .path()
        .join("runs/job-0001/final/model.safetensors")
        .is_file());
}

/// Kill the coordinator while a job runs and restart it on the same address: the workers reconnect,
/// their stale trainers are stopped, and the recovered job finishes in a new generation.
#[test]
fn coordinator_restart_mid_job_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml(
        "name: survivor\ntask: smoke\nsteps: 60\nworkers: {min: 2}\nsmoke: {step_delay_ms: 20}\n",
    );
    wait_until(Duration::from_secs(30), || {
        c.status(&job).contains("RUNNING")
    })
    .unwrap_or_else(|| panic!("job never ran:\n{}", c.logs()));
    c.coord.kill();
    let addr = c.url.trim_start_matches("http://").to_string();
    let (coord, url) = start_coordinator_at(dir.path(), &addr);
    c.coord = coord;
    c.url = url;
    let watch = c.cli(&["watch", &job]);
    let out = text(&watch.stdout);
    assert!(watch.status.success(), "{out}\n{}", c.logs());
    assert!(
        out.lines()
            .last()
            .unwrap_or_default()
            .contains("SUCCEEDED gen=2 world=2 step=60/60"),
        "{out}"
    );
}

/// `logs`: both ranks' trainer stderr lines, `--rank 1` only rank 1's, `--follow` started while the
/// job runs prints lines and exits 0 when it succeeds, and a restarted coordinator still has them.
#[test]
fn trainer_logs_are_kept_and_followed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml(
        "name: logged\ntask: smoke\nsteps: 40\nworkers: {min: 2}\nsmoke: {step_delay_ms: 25}\n",
    );
    wait_until(Duration::from_secs(30), || {
        c.status(&job).contains("RUNNING")
    })
    .unwrap_or_else(|| panic!("job never ran:\n{}", c.logs()));
    let mut follow_cmd = Command::new(bin("xvlm-coord"));
    follow_cmd
        .arg("--coordinator")
        .arg(&c.url)
        .args(["logs", &job, "--follow"]);
    let follow =
        std::thread::spawn(move || output_within(&mut follow_cmd, Duration::from_secs(60)));
    c.watch_succeeded(&job);
    let followed = follow.join().unwrap();
    let out = text(&followed.stdout);
    assert!(
        followed.status.success(),
        "{out}\n{}",
        text(&followed.stderr)
    );
    for rank in 0..2 {
        assert!(
            out.contains(&format!("[rank {rank} gen 1 err]")) && out.contains("trainer finished"),
            "follow lacks rank {rank}:\n{out}"
        );
    }
    let all = |c: &Cluster, args: &[&str]| {
        let o = c.cli(args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    let both = all(&c, &["logs", &job]);
    assert!(
        both.contains("[rank 0 gen 1 err]") && both.contains("[rank 1 gen 1 err]"),
        "{both}"
    );
    assert!(both.contains("trainer connected"), "{both}");
    let one = all(&c, &["logs", &job, "--rank", "1"]);
    assert!(
        !one.is_empty() && one.lines().all(|l| l.starts_with("[rank 1 ")),
        "{one}"
    );
    let unknown = c.cli(&["logs", "job-0099"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("job-0099"),
        "{}",
        text(&unknown.stderr)
    );
    c.coord.kill();
    let (coord, url) = start_coordinator(dir.path());
    c.coord = coord;
    c.url = url;
    assert_eq!(
        all(&c, &["logs", &job]),
        both,
        "logs differ after a restart"
    );
}
