//! Multi-host runs on simulated hosts (network namespaces on one bridge, `xvlm_e2e::netns`): the
//! coordinator listens on the bridge (not loopback, so `--insecure`), each worker runs in its own
//! namespace with its own address, and the trainers' ring runs over TCP between the namespaces.
//! - Three hosts train a job to SUCCEEDED with final weights bit-identical to the same job on one
//!   host over the same TCP ring algorithm (`XVLM_RING_TRANSPORT=tcp`).
//! - A host cut off mid-run (link down) is detected by its heartbeats, the job re-forms without it
//!   from its last commit, and grows back to three hosts when the link returns; with a 4 Mbit/s token
//!   bucket on another host's link the job still completes.
//! - A host whose every connection runs through fault-injecting proxies (`xvlm_e2e::fault_proxy`:
//!   delay, jitter, chunks held a retransmission timeout) trains the same job to SUCCEEDED with
//!   final weights bit-identical to the one-host run.

use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use xvlm_e2e::checkpoints::{last_line, tensor_hashes};
use xvlm_e2e::fault_proxy::{FaultProxy, Faults};
use xvlm_e2e::netns::Net;
use xvlm_e2e::{start_coordinator_with_args, write, Cluster};

/// A coordinator on the bridge of `net` (heartbeat timeout `timeout_ms`), no workers yet.
fn coordinator_on(net: &Net, dir: &Path, timeout_ms: &str) -> Cluster {
    let listen = format!("{}:0", net.bridge_ip());
    Cluster::around(
        dir,
        start_coordinator_with_args(
            dir,
            &listen,
            &[],
            &["--insecure", "--heartbeat-timeout-ms", timeout_ms],
        ),
    )
}

/// Starts host `i`'s worker (`host{i}`), reaching the coordinator at `coordinator`, with `flags`.
fn add_host(c: &mut Cluster, net: &Net, i: usize, coordinator: &str, flags: &[&str]) {
    let host = net.host_ip(i);
    let mut all = vec!["--host", &host, "--cpu-threads", "1"];
    all.extend_from_slice(flags);
    c.add_worker_through(
        coordinator,
        &format!("host{i}"),
        1,
        &[],
        &net.exec_on(i),
        &all,
    );
}

/// A coordinator on the bridge of `net` (heartbeat timeout `timeout_ms`) and one worker per host.
fn cluster_on(net: &Net, dir: &Path, hosts: usize, timeout_ms: &str) -> Cluster {
    let mut c = coordinator_on(net, dir, timeout_ms);
    let url = c.url.clone();
    for i in 0..hosts {
        add_host(&mut c, net, i, &url, &[]);
    }
    c
}

/// The hosts of rank 0's ring peers in generation 1 (host0 ran rank 0), sorted.
fn ring_peer_hosts(dir: &Path, job: &str) -> Vec<String> {
    let assignment: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("work-host0/{job}/g1/rank0.json")))
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
    hosts
}

/// Hashes of the tensors of `job`'s final weights, stored under `dir/runs`.
fn final_weights(dir: &Path, job: &str) -> Vec<(String, String)> {
    tensor_hashes(&dir.join("runs").join(job).join("final/model.safetensors"))
}

/// The final weights of `job_yaml` trained by three workers on one host over the same TCP ring
/// algorithm (`XVLM_RING_TRANSPORT=tcp`).
fn one_host_weights(job_yaml: &str) -> Vec<(String, String)> {
    let one = tempfile::tempdir().unwrap();
    let mut local = Cluster::start(one.path());
    for name in ["w0", "w1", "w2"] {
        local.add_worker_with_env(name, 1, &[("XVLM_RING_TRANSPORT", "tcp")]);
    }
    let reference = local.submit(&write(one.path(), "job.yaml", job_yaml));
    local.watch_succeeded(&reference);
    let single = final_weights(one.path(), &reference);
    assert!(!single.is_empty());
    single
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
    assert_eq!(
        ring_peer_hosts(dir.path(), &job),
        (0..3).map(|i| net.host_ip(i)).collect::<Vec<_>>()
    );
    assert_eq!(
        final_weights(dir.path(), &job),
        one_host_weights(JOB),
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
    let restored = Instant::now();
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

/// Host 2's faulty link: every chunk 20 ms ± 10 ms late, one in twenty held a 200 ms retransmission
/// timeout on top.
fn lossy_link() -> Faults {
    Faults {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        loss: 0.05,
        rto: Duration::from_millis(200),
        ..Faults::none()
    }
}

/// Ring proxies, one per host: each listens on a stand-in address of the host on the bridge and
/// forwards to the host's ring port, which its worker binds and announces through the stand-in
/// (`--ring-advertise STAND_IN:PORT`). Host `faulty`'s proxy faults every connection (its previous
/// rank's sends into it); the others fault only connections from host `faulty` (its sends to its
/// next rank). Returns the proxies and each host's `--ring-advertise` value.
fn ring_proxies(
    net: &Net,
    hosts: usize,
    faulty: usize,
    faults: &Faults,
) -> (Vec<FaultProxy>, Vec<String>) {
    let faulty_ip: IpAddr = net.host_ip(faulty).parse().expect("host address");
    (0..hosts)
        .map(|i| {
            let stand_in = net.add_stand_in(i);
            let listener = TcpListener::bind((stand_in.as_str(), 0)).expect("bind a ring proxy");
            let port = listener.local_addr().expect("proxy address").port();
            let faults = if i == faulty {
                faults.clone()
            } else {
                faults.clone().only_from(faulty_ip)
            };
            let upstream = format!("{}:{port}", net.host_ip(i));
            (
                FaultProxy::on(listener, &upstream, faults),
                format!("{stand_in}:{port}"),
            )
        })
        .unzip()
}

#[test]
fn a_host_behind_delay_and_loss_trains_like_one() {
    let net = Net::new(83, 3);
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator_on(&net, dir.path(), "10000");
    let faults = lossy_link();
    // Host 2's control link: its worker knows the coordinator only as this proxy's address, so its
    // registration, heartbeats, reports and commands all cross it.
    let control = FaultProxy::start(
        &format!("{}:0", net.bridge_ip()),
        c.url.trim_start_matches("http://"),
        faults.clone(),
    );
    // Its ring traffic, both directions: see `ring_proxies`.
    let (rings, advertised) = ring_proxies(&net, 3, 2, &faults);
    for (i, ring_address) in advertised.iter().enumerate() {
        let coordinator = if i == 2 { control.url() } else { c.url.clone() };
        add_host(
            &mut c,
            &net,
            i,
            &coordinator,
            &["--ring-advertise", ring_address],
        );
    }
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    let started = Instant::now();
    c.watch_succeeded(&job);
    let faulted_run = started.elapsed();

    // The ring's peers are the proxies' stand-in addresses, not the hosts'.
    let mut stand_ins: Vec<String> = advertised
        .iter()
        .filter_map(|a| Some(a.rsplit_once(':')?.0.to_string()))
        .collect();
    stand_ins.sort();
    assert_eq!(ring_peer_hosts(dir.path(), &job), stand_ins);
    // Each path carried traffic with faults injected: the control link, the ring into host 2, and
    // host 2's connection into one of the other proxies.
    let seen = control.counters();
    assert!(
        seen.faulted_connections >= 1 && seen.bytes > 0 && seen.faulted_chunks > 0,
        "control: {seen:?}"
    );
    let into = rings[2].counters();
    assert!(
        into.faulted_connections >= 1 && into.faulted_chunks > 0,
        "ring into host 2: {into:?}"
    );
    let out_of: u64 = rings[..2].iter().map(|p| p.counters().faulted_chunks).sum();
    assert!(
        out_of > 0,
        "host 2's sends to its next rank bypassed the proxies"
    );
    let held: u64 = [seen.held, into.held]
        .into_iter()
        .chain(rings[..2].iter().map(|p| p.counters().held))
        .sum();
    assert!(held > 0, "no chunk was held a retransmission timeout");
    println!(
        "faulted run {:.1} s; control {seen:?}; ring into host 2 {into:?}",
        faulted_run.as_secs_f64()
    );
    assert_eq!(
        final_weights(dir.path(), &job),
        one_host_weights(JOB),
        "the faulted hosts and one host trained differently"
    );
}
