//! A trainer frozen with SIGSTOP stops making step progress: the coordinator declares its rank hung
//! after max(hang.min_secs, p99_factor x p99 step time), names it (its worker reports the process
//! stopped, while its peer merely waits), restarts the generation (which resumes from the last
//! committed checkpoint) and the job succeeds. The stopped process does not outlive the test.

use std::time::{Duration, Instant};

use xvlm_e2e::checkpoints::{committed_checkpoints, trainer_pids};
use xvlm_e2e::{alive, wait_until, Cluster};

const MIN_SECS: f64 = 3.0;

fn resume(pid: u32) {
    // SAFETY: plain kill(2) of a pid this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

#[test]
fn stopped_trainer_is_detected_and_generation_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit_yaml(&format!(
        "name: hang\ntask: smoke\nsteps: 150\nworkers: {{min: 2}}\nmax_restarts: 1\n\
             checkpoint: {{every_steps: 10}}\nhang: {{min_secs: {MIN_SECS}}}\n\
             smoke: {{step_delay_ms: 40}}\n"
    ));
    let output = dir.path().join("runs").join(&job);
    let watch = c.watch_log(&job);
    wait_until(Duration::from_secs(60), || {
        !committed_checkpoints(&output).is_empty() && c.step(&job) >= 25
    })
    .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", c.logs()));

    let pid = trainer_pids(dir.path(), "w1", &job, 1)
        .into_iter()
        .find_map(|(rank, pid)| (rank == 1).then_some(pid))
        .expect("rank 1 pid on w1");
    assert!(alive(pid));
    // SAFETY: plain kill(2) of a pid this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let stopped = Instant::now();

    let detected = watch.wait_for("hung", Duration::from_secs(30));
    let Some((at, line)) = detected else {
        resume(pid);
        panic!("hang not detected:\n{}\n{}", watch.text(), c.logs());
    };
    let latency = at.duration_since(stopped).as_secs_f64();
    let bound: f64 = line
        .split("(bound ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bound in {line}"));
    println!("hang detected {latency:.2} s after SIGSTOP (bound {bound:.1} s): {line}");
    assert!(line.contains("RESTARTING"), "{line}");
    // Both ranks stall (rank 0 waits in the all-reduce); the worker's process states name the
    // stopped one.
    assert!(
        line.contains("rank 1 on w1 hung (its process is stopped)"),
        "{line}"
    );
    assert!(bound >= MIN_SECS, "{line}");
    // The last report before the stop is at most a step or two old; the coordinator ticks every 0.5 s.
    assert!(
        latency >= bound - 1.0 && latency <= bound + 2.0,
        "detected after {latency:.2} s, bound {bound:.1} s"
    );

    // The restart kills the frozen trainer (SIGKILL works on a stopped process).
    let gone = wait_until(Duration::from_secs(15), || !alive(pid));
    if gone.is_none() {
        resume(pid);
        panic!("stopped trainer {pid} still alive after the restart");
    }
    let status = c.watch_succeeded(&job);
    let last = status.lines().last().unwrap_or_default();
    assert!(last.contains("SUCCEEDED gen=2"), "{status}");
    let g2 = std::fs::read_to_string(dir.path().join(format!("work-w0/{job}/g2/rank0.log")))
        .unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join(format!("work-w1/{job}/g2/rank0.log")))
            .unwrap_or_default();
    assert!(
        g2.contains("resuming from committed checkpoint step-"),
        "generation 2 did not resume:\n{g2}"
    );
}
