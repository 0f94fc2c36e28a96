//! Multi-host runs on simulated hosts (network namespaces on one bridge, `xvlm_e2e::netns`): the
//! coordinator listens on the bridge (not loopback, so `--insecure`), each worker runs in its own
//! namespace with its own address, and the trainers' ring runs over TCP between the namespaces.
//! - Three hosts train a job to SUCCEEDED with final weights bit-identical to the same job on one
//!   host over the same TCP ring algorithm (`XVLM_RING_TRANSPORT=tcp`).
//! - A host cut off mid-run (link down) is detected by its heartbeats, the job re-forms without it
//!   from its last commit, and grows back to three hosts when the link returns; with a 4 Mbit/s token
//!   bucket on another host's link the job still completes.

use std::time::Duration;

use xvlm_e2e::checkpoints::{last_line, tensor_hashes};
use xvlm_e2e::netns::Net;
use xvlm_e2e::{start_coordinator_with_args, write, Cluster};

/// A coordinator on the bridge of `net` (heartbeat timeout `timeout_ms`) and one worker per host.
fn cluster_on(net: &Net, dir: &std::path::Path, hosts: usize, timeout_ms: &str) -> Cluster {
    let listen = format!("{}:0", net.bridge_ip());
    let mut c = Cluster::around(
        dir,
        start_coordinator_with_args(
            dir,
            &listen,
            &[],
            &["--insecure", "--heartbeat-timeout-ms", timeout_ms],
        ),
    );
    for i in 0..hosts {
        let host = net.host_ip(i);
        c.add_worker_via(
            &format!("host{i}"),
            1,
            &[],
            &net.exec_on(i),
            &["--host", &host, "--cpu-threads", "1"],
        );
    }
    c
}

const JOB: &str =
    "name: hosts\ntask: smoke\nsteps: 30\nseed: 7\nworkers: {min: 3}\nmax_restarts: 0\n\
checkpoint: {every_steps: 10, keep_last: 2}\n";

#[test]
fn three_hosts_train_like_one() {
    let net = Net::new(81, 3);
    let dir = tempfile::tempdir().unwrap();
    let c = cluster_on(&net, dir.path(), 3, "10000");
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let watch = c.watch_succeeded(&job);
    assert!(last_line(&watch).contains("SUCCEEDED"), "{watch}");
    // The ring ran between the hosts: its peers (rank 0's assignment) are the three host addresses.
    let assignment: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("work-host0/{job}/g1/rank0.json")))
            .expect("rank 0's assignment"),
    )
    .expect("assignment json");
    let mut hosts: Vec<String> = assignment["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| Some(p.as_str()?.rsplit_once(':')?.0.to_string()))
        .collect();
    hosts.sort();
    assert_eq!(hosts, (0..3).map(|i| net.host_ip(i)).collect::<Vec<_>>());
    let multi = tensor_hashes(
        &dir.path()
            .join("runs")
            .join(&job)
            .join("final/model.safetensors"),
    );

    let one = tempfile::tempdir().unwrap();
    let mut local = Cluster::start(one.path());
    for name in ["w0", "w1", "w2"] {
        local.add_worker_with_env(name, 1, &[("XVLM_RING_TRANSPORT", "tcp")]);
    }
    let reference = local.submit(&write(one.path(), "job.yaml", JOB));
    local.watch_succeeded(&reference);
    let single = tensor_hashes(
        &one.path()
            .join("runs")
            .join(&reference)
            .join("final/model.safetensors"),
    );
    assert!(!single.is_empty());
    assert_eq!(
        multi, single,
        "three hosts and one host trained differently"
    );
}

const ELASTIC: &str =
    "name: partition\ntask: smoke\nsteps: 300\nseed: 3\nworkers: {min: 2, max: 3}\n\
max_restarts: 3\ncheckpoint: {every_steps: 10, keep_last: 2}\nsmoke: {step_delay_ms: 60}\n";

#[test]
fn a_partitioned_host_is_dropped_and_rejoins() {
    let net = Net::new(82, 3);
    let dir = tempfile::tempdir().unwrap();
    let c = cluster_on(&net, dir.path(), 3, "3000");
    // A slow link elsewhere: what the bridge sends host 1 goes through a 4 Mbit/s token bucket.
    net.limit_rate(1, "4mbit");
    let job = c.submit(&write(dir.path(), "job.yaml", ELASTIC));
    let watch = c.watch_log(&job);
    watch
        .wait_for("world=3 step=20/", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the job did not run on three hosts:\n{}", c.logs()));

    net.set_link(2, false);
    watch
        .wait_for("world=2 step=", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the job did not re-form on two hosts:\n{}", c.logs()));

    net.set_link(2, true);
    let restored = std::time::Instant::now();
    let (_, last) = watch
        .wait_for("SUCCEEDED", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the job did not finish:\n{}\n{}", watch.text(), c.logs()));
    assert!(
        last.contains("world=3"),
        "expected to end on three hosts again: {last}\n{}\n{}",
        watch.text(),
        c.logs()
    );
    let generation: u64 = last
        .split("gen=")
        .nth(1)
        .and_then(|g| g.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(generation >= 3, "dropped and grown back: {last}");
    println!(
        "partitioned host dropped and grown back; succeeded {:.1} s after the link returned",
        restored.elapsed().as_secs_f64()
    );
    assert!(
        watch.text().contains("worker host2: heartbeat lost"),
        "the partition was not detected as host2's heartbeat lost:\n{}",
        watch.text()
    );
}
