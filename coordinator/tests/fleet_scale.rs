//! 50 simulated workers (real gRPC clients, one connection each) on a real coordinator: a 50-rank
//! job rendezvouses, steps, commits checkpoints; `status` and `list` stay fast under the heartbeats;
//! a kill -9 of the coordinator and a restart on the same address bring every worker back through the
//! workers' jittered reconnect policy, and the job re-forms from its last commit and succeeds. The
//! 10 / 100 / 1,000-worker numbers come from the `fleet` benchmark.

mod fleet;

use std::time::Duration;

use fleet::{is, quantile, status_latencies, submit, wait_for, Coordinator, Fleet, Training};
use xvlm_proto::v1::JobState;

const WORKERS: usize = 50;

#[test]
fn fifty_workers_rendezvous_train_commit_and_survive_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::start(dir.path(), "127.0.0.1:0");
    let url = coord.url();
    let training = Training {
        steps: 12,
        every_steps: 4,
    };
    let fleet = Fleet::start(&url, WORKERS, training);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let registered = fleet::wait_until(Duration::from_secs(30), || fleet.connected() == WORKERS).await;
        assert!(registered, "{} of {WORKERS} connected", fleet.connected());
        let job = submit(&url, dir.path(), WORKERS, training).await;
        let rendezvous = wait_for(&url, &job, Duration::from_secs(30), |s| is(s, JobState::Running))
            .await
            .unwrap_or_else(|| panic!("no rendezvous of {WORKERS} ranks:\n{}", coord.log()));
        let (get, list) = status_latencies(&url, &job, 100).await;
        println!(
            "{WORKERS} workers: rendezvous {:.0} ms, status p50/p99 {:.2}/{:.2} ms, list p50/p99 {:.2}/{:.2} ms",
            rendezvous.as_secs_f64() * 1e3,
            quantile(&get, 0.5),
            quantile(&get, 0.99),
            quantile(&list, 0.5),
            quantile(&list, 0.99)
        );
        // Generous bounds: this is a correctness test on a shared 2-core machine, not a benchmark.
        assert!(quantile(&get, 0.99) < 200.0 && quantile(&list, 0.99) < 200.0);
        wait_for(&url, &job, Duration::from_secs(60), |s| s.checkpoint_step >= 4)
            .await
            .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", coord.log()));

        coord.kill();
        let addr = coord.addr.clone();
        coord = Coordinator::start(dir.path(), &addr);
        let back = fleet::wait_until(Duration::from_secs(30), || fleet.connected() == WORKERS).await;
        assert!(back, "{} of {WORKERS} reconnected:\n{}", fleet.connected(), coord.log());
        let done = wait_for(&url, &job, Duration::from_secs(90), |s| {
            is(s, JobState::Succeeded) || is(s, JobState::Failed)
        })
        .await;
        let last = fleet::status(&url, &job).await;
        assert!(
            done.is_some() && is(&last, JobState::Succeeded),
            "{last:?}\n{}",
            coord.log()
        );
        assert!(last.generation >= 2, "re-formed after the restart: {last:?}");
        let manifest = dir
            .path()
            .join("runs")
            .join(&job)
            .join("checkpoints/step-12/MANIFEST.json");
        assert!(manifest.is_file(), "{manifest:?}");
    });
}
