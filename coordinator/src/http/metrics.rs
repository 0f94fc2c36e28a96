//! The coordinator's Prometheus metrics, in two kinds:
//!
//! - **What the state already knows** (jobs by state, each job's step, samples/s, losses, lr,
//!   evaluation results, restarts, each worker's heartbeat age) is read at scrape time: a
//!   [`Snapshot`] copied from the scheduler under the core's lock, encoded after the lock is released
//!   by [`StateCollector`]. Nothing in the state machine knows about metrics.
//! - **Events** the state does not keep (checkpoint commits, their bytes and durations; gRPC request
//!   latencies) are recorded where they happen, in the families of [`Metrics`].
//!
//! Every name starts with `xvlm_`; labels are `job`, `worker`, `state`, `loss`, `metric`, `service`,
//! `method`. Per-job series cover live jobs and jobs that ended within [`ENDED_JOB_RETENTION_MS`], so
//! the store's history does not grow the scrape without bound while a job's last values still reach
//! a scraper.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::state::{JobState, Millis, Scheduler};

/// Per-job series stay this long after the job ended (then they go stale in Prometheus).
pub const ENDED_JOB_RETENTION_MS: Millis = 10 * 60 * 1000;

/// Every job state, in lifecycle order: `xvlm_jobs` reports each one, zeros included, so a query
/// for a state nobody is in returns 0 rather than nothing.
const STATES: [JobState; 7] = [
    JobState::Pending,
    JobState::Rendezvous,
    JobState::Running,
    JobState::Restarting,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// What one job contributes to a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSnapshot {
    /// Job id.
    pub id: String,
    /// Upper-case state name (`RUNNING`).
    pub state: &'static str,
    /// Steps done, as rank 0 last reported (0: none yet).
    pub step: u64,
    /// Steps the job runs (0: not known yet).
    pub total_steps: u64,
    /// Global samples per second of the last reported step.
    pub samples_per_sec: f64,
    /// Learning rate of the last reported step.
    pub lr: f64,
    /// Named losses of the last reported step.
    pub losses: Vec<(String, f64)>,
    /// The latest evaluation results.
    pub evaluation: Vec<(String, f64)>,
    /// Restarts used.
    pub restarts: u32,
    /// Current generation.
    pub generation: u64,
    /// Ranks of the current generation.
    pub world_size: u32,
    /// Step of the newest committed checkpoint (0: none).
    pub checkpoint_step: u64,
}

/// What one registered worker contributes to a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSnapshot {
    /// Worker name.
    pub name: String,
    /// Seconds since its last report.
    pub heartbeat_age_s: f64,
    /// Trainer slots it offers.
    pub slots: u32,
    /// Whether it serves a generation.
    pub busy: bool,
    /// Whether its heartbeat stream is open.
    pub connected: bool,
}

/// The state's part of a scrape, copied under the lock (cheap: a few numbers per job and worker).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Jobs in each state, in [`STATES`] order.
    pub jobs_by_state: Vec<(&'static str, u64)>,
    /// Live jobs and recently ended ones.
    pub jobs: Vec<JobSnapshot>,
    /// Registered workers.
    pub workers: Vec<WorkerSnapshot>,
}

impl Snapshot {
    /// Copies what the metrics report from `sched` at time `now`.
    pub fn of(sched: &Scheduler, now: Millis) -> Snapshot {
        let mut counts = [0u64; STATES.len()];
        let mut jobs = Vec::new();
        for rec in sched.jobs() {
            if let Some(i) = STATES.iter().position(|s| *s == rec.state) {
                counts[i] += 1;
            }
            let ended_long_ago = rec.state.is_terminal()
                && now.saturating_sub(rec.updated_at_ms) > ENDED_JOB_RETENTION_MS;
            if ended_long_ago {
                continue;
            }
            let progress = rec.progress.clone().unwrap_or_default();
            jobs.push(JobSnapshot {
                id: rec.id.clone(),
                state: rec.state.as_str(),
                step: progress.step,
                total_steps: rec.total_steps(),
                samples_per_sec: progress.samples_per_sec,
                lr: progress.lr,
                losses: progress.losses,
                evaluation: rec
                    .evaluation
                    .as_ref()
                    .map(|e| e.metrics.clone())
                    .unwrap_or_default(),
                restarts: rec.restarts,
                generation: rec.generation,
                world_size: rec.world_size(),
                checkpoint_step: rec.checkpoint_step,
            });
        }
        let workers = sched
            .workers()
            .map(|w| WorkerSnapshot {
                name: w.name.clone(),
                heartbeat_age_s: now.saturating_sub(w.last_seen_ms) as f64 / 1000.0,
                slots: w.slots,
                busy: w.busy.is_some(),
                connected: w.connected,
            })
            .collect();
        Snapshot {
            jobs_by_state: STATES
                .iter()
                .zip(counts)
                .map(|(s, n)| (s.as_str(), n))
                .collect(),
            jobs,
            workers,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStateLabels {
    job: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    job: String,
    loss: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    job: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

/// Labels of a gRPC request: `xvlm.v1.Jobs` and `Submit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// The full service name.
    pub service: String,
    /// The method.
    pub method: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Where a scrape's [`Snapshot`] comes from (the core's lock; a test's fixed value).
type SnapshotSource = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// Encodes the state's series from a fresh [`Snapshot`] on every scrape.
pub struct StateCollector {
    source: SnapshotSource,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

/// Adds one metric family to a collector's output.
fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// A gauge family filled from `rows`.
fn gauges<L, T>(rows: impl IntoIterator<Item = (L, T)>) -> Family<L, FloatGauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + fmt::Debug + Send + Sync + 'static,
    T: Into<f64>,
{
    let family = Family::<L, FloatGauge>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).set(value.into());
    }
    family
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = (self.source)();
        let e = &mut encoder;
        let job = |j: &JobSnapshot| JobLabels { job: j.id.clone() };
        let by_state = snap.jobs_by_state.iter().map(|(state, n)| {
            let labels = StateLabels {
                state: state.to_string(),
            };
            (labels, *n as f64)
        });
        emit(
            e,
            "xvlm_jobs",
            "Jobs in the store by state.",
            &gauges(by_state),
        )?;
        let state = snap.jobs.iter().map(|j| {
            let labels = JobStateLabels {
                job: j.id.clone(),
                state: j.state.to_string(),
            };
            (labels, 1.0)
        });
        emit(
            e,
            "xvlm_job_state",
            "1 for the state each job is in (live jobs and recently ended ones).",
            &gauges(state),
        )?;
        let step = snap.jobs.iter().map(|j| (job(j), j.step as f64));
        emit(
            e,
            "xvlm_job_step",
            "Steps done, as rank 0 last reported.",
            &gauges(step),
        )?;
        let total = snap.jobs.iter().map(|j| (job(j), j.total_steps as f64));
        emit(
            e,
            "xvlm_job_total_steps",
            "Steps the job runs (0: not known yet).",
            &gauges(total),
        )?;
        let rate = snap.jobs.iter().map(|j| (job(j), j.samples_per_sec));
        emit(
            e,
            "xvlm_job_samples_per_second",
            "Global samples per second of the last reported step.",
            &gauges(rate),
        )?;
        let lr = snap.jobs.iter().map(|j| (job(j), j.lr));
        emit(
            e,
            "xvlm_job_learning_rate",
            "Learning rate of the last reported step.",
            &gauges(lr),
        )?;
        let losses = snap.jobs.iter().flat_map(|j| {
            j.losses.iter().map(|(name, value)| {
                let labels = LossLabels {
                    job: j.id.clone(),
                    loss: name.clone(),
                };
                (labels, *value)
            })
        });
        emit(
            e,
            "xvlm_job_loss",
            "Named losses of the last reported step.",
            &gauges(losses),
        )?;
        let evaluation = snap.jobs.iter().flat_map(|j| {
            j.evaluation.iter().map(|(name, value)| {
                let labels = MetricLabels {
                    job: j.id.clone(),
                    metric: name.clone(),
                };
                (labels, *value)
            })
        });
        emit(
            e,
            "xvlm_job_eval",
            "Latest evaluation results (val.r_mean, test.txt_r1, ...).",
            &gauges(evaluation),
        )?;
        let restarts = Family::<JobLabels, Counter>::default();
        for j in &snap.jobs {
            restarts
                .get_or_create(&job(j))
                .inc_by(u64::from(j.restarts));
        }
        emit(
            e,
            "xvlm_job_restarts",
            "Restarts the job used (failed generations).",
            &restarts,
        )?;
        let generation = snap.jobs.iter().map(|j| (job(j), j.generation as f64));
        emit(
            e,
            "xvlm_job_generation",
            "Current generation.",
            &gauges(generation),
        )?;
        let world = snap.jobs.iter().map(|j| (job(j), j.world_size));
        emit(
            e,
            "xvlm_job_world_size",
            "Ranks of the current generation.",
            &gauges(world),
        )?;
        let ckpt = snap.jobs.iter().map(|j| (job(j), j.checkpoint_step as f64));
        emit(
            e,
            "xvlm_job_checkpoint_step",
            "Step of the newest committed checkpoint (0: none).",
            &gauges(ckpt),
        )?;
        let worker = |w: &WorkerSnapshot| WorkerLabels {
            worker: w.name.clone(),
        };
        let age = snap.workers.iter().map(|w| (worker(w), w.heartbeat_age_s));
        emit(
            e,
            "xvlm_worker_heartbeat_age_seconds",
            "Seconds since the worker's last report.",
            &gauges(age),
        )?;
        let slots = snap.workers.iter().map(|w| (worker(w), w.slots));
        emit(
            e,
            "xvlm_worker_slots",
            "Trainer slots the worker offers.",
            &gauges(slots),
        )?;
        let busy = snap.workers.iter().map(|w| (worker(w), u8::from(w.busy)));
        emit(
            e,
            "xvlm_worker_busy",
            "1 while the worker serves a generation.",
            &gauges(busy),
        )?;
        let connected = snap
            .workers
            .iter()
            .map(|w| (worker(w), u8::from(w.connected)));
        emit(
            e,
            "xvlm_worker_connected",
            "1 while the worker's heartbeat stream is open.",
            &gauges(connected),
        )?;
        Ok(())
    }
}

fn commit_seconds() -> Histogram {
    // 10 ms .. ~80 s: a local file system commits in milliseconds, a stalled store takes the budget.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

fn grpc_seconds() -> Histogram {
    // 100 us .. ~3 s: a loopback call takes ~100 us, a submit lists the data shards.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The coordinator's metrics: the event families and the registry a scrape encodes.
pub struct Metrics {
    registry: Registry,
    commits: Family<JobLabels, Counter>,
    commit_bytes: Family<JobLabels, Counter>,
    commit_failures: Family<JobLabels, Counter>,
    commit_seconds: Histogram,
    grpc: Family<GrpcLabels, Histogram, fn() -> Histogram>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The registry with the event families and a [`StateCollector`] reading `snapshot`.
    pub fn new(snapshot: impl Fn() -> Snapshot + Send + Sync + 'static) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector {
            source: Box::new(snapshot),
        }));
        let commits = Family::<JobLabels, Counter>::default();
        let commit_bytes = Family::<JobLabels, Counter>::default();
        let commit_failures = Family::<JobLabels, Counter>::default();
        let commit_seconds = commit_seconds();
        let grpc = Family::<GrpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            grpc_seconds as fn() -> Histogram,
        );
        registry.register(
            "xvlm_checkpoint_commits",
            "Checkpoints committed (manifest and latest written).",
            commits.clone(),
        );
        registry.register(
            "xvlm_checkpoint_commit_bytes",
            "Bytes of the checkpoints committed (every rank's files).",
            commit_bytes.clone(),
        );
        registry.register(
            "xvlm_checkpoint_commit_failures",
            "Checkpoint commits abandoned (storage failed or ran out of its budget).",
            commit_failures.clone(),
        );
        registry.register(
            "xvlm_checkpoint_commit_duration_seconds",
            "Storage time of each checkpoint commit, abandoned ones included.",
            commit_seconds.clone(),
        );
        registry.register(
            "xvlm_grpc_request_duration_seconds",
            "gRPC requests until the response headers (a stream's open, not its life).",
            grpc.clone(),
        );
        Metrics {
            registry,
            commits,
            commit_bytes,
            commit_failures,
            commit_seconds,
            grpc,
        }
    }

    /// Records a commit of `job` that wrote a checkpoint of `bytes` in `took`.
    pub fn committed(&self, job: &str, bytes: u64, took: Duration) {
        let labels = JobLabels {
            job: job.to_string(),
        };
        self.commits.get_or_create(&labels).inc();
        self.commit_bytes.get_or_create(&labels).inc_by(bytes);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Records an abandoned commit of `job` after `took`.
    pub fn commit_failed(&self, job: &str, took: Duration) {
        let labels = JobLabels {
            job: job.to_string(),
        };
        self.commit_failures.get_or_create(&labels).inc();
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Records a gRPC request of `service`/`method` that took `took` to its response headers.
    pub fn grpc_request(&self, service: &str, method: &str, took: Duration) {
        let labels = GrpcLabels {
            service: service.to_string(),
            method: method.to_string(),
        };
        self.grpc.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// The OpenMetrics text of every series, as `/metrics` serves it.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            jobs_by_state: STATES.iter().map(|s| (s.as_str(), 0)).collect(),
            jobs: vec![JobSnapshot {
                id: "job-0001".into(),
                state: "RUNNING",
                step: 7,
                total_steps: 20,
                samples_per_sec: 12.5,
                lr: 1e-4,
                losses: vec![("itc".into(), 0.75), ("mlm".into(), 2.5)],
                evaluation: vec![("val.r_mean".into(), 41.5)],
                restarts: 1,
                generation: 2,
                world_size: 2,
                checkpoint_step: 5,
            }],
            workers: vec![WorkerSnapshot {
                name: "w1".into(),
                heartbeat_age_s: 0.25,
                slots: 1,
                busy: true,
                connected: true,
            }],
        }
    }

    /// The line of `series` (name and labels exactly) in `text`, parsed to its value.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok())?
        })
    }

    /// Every state-derived series is encoded with its labels and the snapshot's value, and the
    /// states nobody is in report 0.
    #[test]
    fn state_series_carry_the_snapshot() {
        let mut snap = snapshot();
        snap.jobs_by_state[2].1 = 1;
        let m = Metrics::new(move || snap.clone());
        let text = m.encode().unwrap();
        for (series, want) in [
            (r#"xvlm_jobs{state="RUNNING"}"#, 1.0),
            (r#"xvlm_jobs{state="FAILED"}"#, 0.0),
            (r#"xvlm_job_state{job="job-0001",state="RUNNING"}"#, 1.0),
            (r#"xvlm_job_step{job="job-0001"}"#, 7.0),
            (r#"xvlm_job_total_steps{job="job-0001"}"#, 20.0),
            (r#"xvlm_job_samples_per_second{job="job-0001"}"#, 12.5),
            (r#"xvlm_job_learning_rate{job="job-0001"}"#, 1e-4),
            (r#"xvlm_job_loss{job="job-0001",loss="itc"}"#, 0.75),
            (r#"xvlm_job_loss{job="job-0001",loss="mlm"}"#, 2.5),
            (r#"xvlm_job_eval{job="job-0001",metric="val.r_mean"}"#, 41.5),
            (r#"xvlm_job_restarts_total{job="job-0001"}"#, 1.0),
            (r#"xvlm_job_generation{job="job-0001"}"#, 2.0),
            (r#"xvlm_job_world_size{job="job-0001"}"#, 2.0),
            (r#"xvlm_job_checkpoint_step{job="job-0001"}"#, 5.0),
            (r#"xvlm_worker_heartbeat_age_seconds{worker="w1"}"#, 0.25),
            (r#"xvlm_worker_slots{worker="w1"}"#, 1.0),
            (r#"xvlm_worker_busy{worker="w1"}"#, 1.0),
            (r#"xvlm_worker_connected{worker="w1"}"#, 1.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE xvlm_job_restarts counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The snapshot of a real scheduler: a running job's progress and both workers' heartbeat ages;
    /// an ended job stays for [`ENDED_JOB_RETENTION_MS`], then only counts in `jobs_by_state`.
    #[test]
    fn snapshot_reads_the_scheduler() {
        use crate::state::test_support::{exit_all, ready_all, register, spec, submit};
        use crate::state::{Event, ProgressInfo};
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let job = submit(&mut s, spec(2, 1, 0));
        ready_all(&mut s, &job);
        let generation = s.job(&job).unwrap().generation;
        s.apply(
            500,
            Event::Progress {
                job: job.clone(),
                generation,
                rank: 0,
                progress: ProgressInfo {
                    step: 3,
                    losses: vec![("mse".into(), 0.5)],
                    lr: 0.1,
                    samples_per_sec: 8.0,
                    ..Default::default()
                },
                metrics: vec![],
            },
        )
        .unwrap();
        let snap = Snapshot::of(&s, 2_001);
        let count = |snap: &Snapshot, state: &str| {
            snap.jobs_by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map(|(_, n)| *n)
        };
        assert_eq!(count(&snap, "RUNNING"), Some(1));
        assert_eq!(snap.jobs_by_state.len(), STATES.len());
        let j = &snap.jobs[0];
        assert_eq!(
            (j.id.as_str(), j.state, j.step, j.total_steps, j.world_size),
            (job.as_str(), "RUNNING", 3, 10, 2)
        );
        assert_eq!((j.lr, j.samples_per_sec), (0.1, 8.0));
        assert_eq!(j.losses, vec![("mse".to_string(), 0.5)]);
        let ages: Vec<(&str, f64)> = snap
            .workers
            .iter()
            .map(|w| (w.name.as_str(), w.heartbeat_age_s))
            .collect();
        // The ready reports at t=1 are the workers' last contact.
        assert_eq!(ages, vec![("a", 2.0), ("b", 2.0)]);
        exit_all(&mut s, &job, 0);
        let ended = Snapshot::of(&s, 1_000);
        assert_eq!(ended.jobs[0].state, "SUCCEEDED");
        let later = Snapshot::of(&s, 2 + ENDED_JOB_RETENTION_MS + 1);
        assert!(later.jobs.is_empty(), "{:?}", later.jobs);
        assert_eq!(count(&later, "SUCCEEDED"), Some(1));
    }

    /// Commits and gRPC requests count where they happen: counters by job, histograms by service
    /// and method with their count and sum.
    #[test]
    fn event_series_count() {
        let m = Metrics::new(Snapshot::default);
        m.committed("job-0001", 1000, Duration::from_millis(20));
        m.committed("job-0001", 500, Duration::from_millis(40));
        m.commit_failed("job-0002", Duration::from_secs(60));
        m.grpc_request("xvlm.v1.Jobs", "Get", Duration::from_micros(150));
        m.grpc_request("xvlm.v1.Jobs", "Get", Duration::from_micros(250));
        let text = m.encode().unwrap();
        for (series, want) in [
            (r#"xvlm_checkpoint_commits_total{job="job-0001"}"#, 2.0),
            (
                r#"xvlm_checkpoint_commit_bytes_total{job="job-0001"}"#,
                1500.0,
            ),
            (
                r#"xvlm_checkpoint_commit_failures_total{job="job-0002"}"#,
                1.0,
            ),
            ("xvlm_checkpoint_commit_duration_seconds_count", 3.0),
            (
                r#"xvlm_grpc_request_duration_seconds_count{service="xvlm.v1.Jobs",method="Get"}"#,
                2.0,
            ),
            (
                r#"xvlm_grpc_request_duration_seconds_bucket{le="0.0002",service="xvlm.v1.Jobs",method="Get"}"#,
                1.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        let sum = value(
            &text,
            r#"xvlm_grpc_request_duration_seconds_sum{service="xvlm.v1.Jobs",method="Get"}"#,
        )
        .unwrap();
        assert!((sum - 0.0004).abs() < 1e-9, "{sum}");
    }
}
