//! The coordinator at 10, 100 and 1,000 workers (`cargo bench -p xvlm-coord --bench fleet [-- N...]`):
//! simulated workers (real gRPC clients, one connection each, heartbeating every second) register;
//! one job of N ranks rendezvouses, steps once a second, commits checkpoints; `status` and `list`
//! latencies are sampled under that load, with the coordinator's CPU and peak RSS; then the
//! coordinator is killed (-9) and restarted on its address, and the table gets the time until every
//! worker is back, until the job runs again, and until it succeeds. The workers share the machine
//! with the coordinator (their CPU is not in its column).

#[path = "../tests/fleet/mod.rs"]
mod fleet;

use std::time::{Duration, Instant};

use fleet::{is, quantile, status_latencies, submit, wait_for, Coordinator, Fleet, Training};
use xvlm_proto::v1::JobState;

struct Row {
    workers: usize,
    register_s: f64,
    rendezvous_s: f64,
    get_p50: f64,
    get_p99: f64,
    list_p50: f64,
    list_p99: f64,
    cores: f64,
    rss_mib: f64,
    reconnect_s: f64,
    rerun_s: f64,
    succeeded_s: f64,
}

fn measure(workers: usize) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut coord = Coordinator::start(dir.path(), "127.0.0.1:0");
    let url = coord.url();
    let training = Training {
        steps: 30,
        every_steps: 10,
    };
    let started = Instant::now();
    let fleet = Fleet::start(&url, workers, training);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let limit = Duration::from_secs(120);
        assert!(
            fleet::wait_until(limit, || fleet.connected() == workers).await,
            "{} of {workers} registered",
            fleet.connected()
        );
        let register_s = started.elapsed().as_secs_f64();
        let job = submit(&url, dir.path(), workers, training).await;
        let rendezvous = wait_for(&url, &job, limit, |s| is(s, JobState::Running))
            .await
            .expect("rendezvous");
        let (cpu0, t0) = (coord.cpu_seconds(), Instant::now());
        let (get, list) = status_latencies(&url, &job, 300).await;
        let cores = (coord.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
        wait_for(&url, &job, limit, |s| s.checkpoint_step >= 10)
            .await
            .expect("a checkpoint commit");
        let rss_mib = coord.peak_rss_mib();

        coord.kill();
        let addr = coord.addr.clone();
        let restarted = Instant::now();
        coord = Coordinator::start(dir.path(), &addr);
        assert!(
            fleet::wait_until(limit, || fleet.connected() == workers).await,
            "{} of {workers} reconnected",
            fleet.connected()
        );
        let reconnect_s = restarted.elapsed().as_secs_f64();
        wait_for(&url, &job, limit, |s| {
            is(s, JobState::Running) && s.generation >= 2
        })
        .await
        .expect("the job re-forms");
        let rerun_s = restarted.elapsed().as_secs_f64();
        wait_for(&url, &job, Duration::from_secs(300), |s| {
            is(s, JobState::Succeeded)
        })
        .await
        .unwrap_or_else(|| panic!("job did not succeed:\n{}", coord.log()));
        Row {
            workers,
            register_s,
            rendezvous_s: rendezvous.as_secs_f64(),
            get_p50: quantile(&get, 0.5),
            get_p99: quantile(&get, 0.99),
            list_p50: quantile(&list, 0.5),
            list_p99: quantile(&list, 0.99),
            cores,
            rss_mib,
            reconnect_s,
            rerun_s,
            succeeded_s: restarted.elapsed().as_secs_f64(),
        }
    })
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 1000]
    } else {
        sizes
    };
    println!(
        "| workers | all registered s | rendezvous s | status p50/p99 ms | list p50/p99 ms | coordinator cores | peak RSS MiB | kill -9: all back s | job running again s | succeeded s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let r = measure(n);
        println!(
            "| {} | {:.2} | {:.3} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} |",
            r.workers,
            r.register_s,
            r.rendezvous_s,
            r.get_p50,
            r.get_p99,
            r.list_p50,
            r.list_p99,
            r.cores,
            r.rss_mib,
            r.reconnect_s,
            r.rerun_s,
            r.succeeded_s
        );
    }
}
