//! The worker daemon's Prometheus metrics and their HTTP listener (`--http-listen`, `GET /metrics`).
//!
//! The daemon learns what its trainers do only from their progress lines
//! ([`crate::trainer::ProgressLine`]): each line is recorded by [`WorkerMetrics::observe`] as it
//! arrives (step time, all-reduce time, loader queue depth, checkpoint uploads). The trainers'
//! process states are read at scrape time from `/proc` for the ranks the daemon runs
//! ([`WorkerMetrics::trainer_started`] / [`WorkerMetrics::trainer_exited`]).
//!
//! Names start with `xvlm_worker_`; labels are `job`, `rank` and `state`. Protection: the listener
//! defaults to loopback; when the worker has a worker token (`--worker-token-file`,
//! `XVLM_WORKER_TOKEN`) every request must carry it as `authorization: Bearer <token>` (checked by
//! [`Token::check_bearer`], the coordinator's check). There is no TLS on this listener: serve it on
//! a trusted network, or keep it on loopback behind a scraper on the same host.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;
use xvlm_proto::security::Token;

use crate::error::WorkerError;
use crate::process;
use crate::trainer::ProgressLine;

/// How long a rank's series stay after its trainer exited: long enough for its last values to be
/// scraped, short enough that a long-lived worker's scrape does not grow with every job it ran.
pub const ENDED_RETENTION: Duration = Duration::from_secs(10 * 60);

/// The OpenMetrics text format's content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    job: String,
    rank: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    job: String,
    rank: String,
    state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms = Family<RankLabels, Histogram, fn() -> Histogram>;

fn step_seconds() -> Histogram {
    // 5 ms .. ~80 s: a tiny CPU step takes tens of ms, a large GPU step seconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn allreduce_seconds() -> Histogram {
    // 100 us .. ~13 s (0 when the world is one rank: it lands in the first bucket).
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn upload_seconds() -> Histogram {
    // 10 ms .. ~160 s: a local file system takes milliseconds, object stores seconds.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// A trainer the daemon started, as the scrape reports it.
#[derive(Clone, Debug, PartialEq)]
enum Trainer {
    /// Running as this pid (process group).
    Running { pid: u32 },
    /// Exited at this time (kept for [`ENDED_RETENTION`], or until a newer generation of the job
    /// uses the rank).
    Exited { at: Instant },
}

/// The trainers of this daemon by (job, rank): the newest generation's of each.
#[derive(Debug, Default)]
struct TrainerTable {
    by_rank: BTreeMap<(String, u32), (u64, Trainer)>,
}

/// The name of a Linux process state letter (`/proc/PID/stat`).
fn state_name(letter: char) -> &'static str {
    match letter {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk_wait",
        'T' | 't' => "stopped",
        'Z' => "zombie",
        _ => "other",
    }
}

/// Encodes the trainers' states from `/proc` on every scrape.
#[derive(Debug)]
struct TrainerStates {
    table: Arc<Mutex<TrainerTable>>,
}

impl Collector for TrainerStates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let rows: Vec<((String, u32), Trainer)> = {
            let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table
                .by_rank
                .iter()
                .map(|(key, (_, t))| (key.clone(), t.clone()))
                .collect()
        };
        let family = Family::<StateLabels, FloatGauge>::default();
        for ((job, rank), trainer) in rows {
            let state = match trainer {
                // A pid without a /proc entry has just exited; its exit event is on its way.
                Trainer::Running { pid } => process::state(pid).map_or("exited", state_name),
                Trainer::Exited { .. } => "exited",
            };
            let labels = StateLabels {
                job,
                rank: rank.to_string(),
                state: state.to_string(),
            };
            family.get_or_create(&labels).set(1.0);
        }
        let m = encoder.encode_descriptor(
            "xvlm_worker_trainer_state",
            "1 for the process state of each trainer rank this worker runs or ran last (running, \
             sleeping, disk_wait, stopped, zombie, exited).",
            None,
            family.metric_type(),
        )?;
        family.encode(m)
    }
}

/// The worker's metrics: what its trainers' progress lines reported, and their process states.
pub struct WorkerMetrics {
    registry: Registry,
    table: Arc<Mutex<TrainerTable>>,
    step: Family<RankLabels, FloatGauge>,
    step_seconds: Histograms,
    allreduce_seconds: Histograms,
    loader_queue_depth: Family<RankLabels, FloatGauge>,
    upload_bytes: Family<RankLabels, Counter>,
    upload_seconds: Histograms,
}

impl fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// Empty metrics, registered.
    pub fn new() -> WorkerMetrics {
        let mut registry = Registry::default();
        let table = Arc::new(Mutex::new(TrainerTable::default()));
        registry.register_collector(Box::new(TrainerStates {
            table: table.clone(),
        }));
        let step = Family::<RankLabels, FloatGauge>::default();
        let step_seconds = Histograms::new_with_constructor(step_seconds as fn() -> Histogram);
        let allreduce_seconds =
            Histograms::new_with_constructor(allreduce_seconds as fn() -> Histogram);
        let loader_queue_depth = Family::<RankLabels, FloatGauge>::default();
        let upload_bytes = Family::<RankLabels, Counter>::default();
        let upload_seconds = Histograms::new_with_constructor(upload_seconds as fn() -> Histogram);
        registry.register(
            "xvlm_worker_trainer_step",
            "Steps done, as the rank last reported.",
            step.clone(),
        );
        registry.register(
            "xvlm_worker_step_duration_seconds",
            "Wall time of each step on the rank (forward, backward, all-reduce, update).",
            step_seconds.clone(),
        );
        registry.register(
            "xvlm_worker_allreduce_duration_seconds",
            "Time each step spent in all-reduce calls (on NCCL: enqueueing them).",
            allreduce_seconds.clone(),
        );
        registry.register(
            "xvlm_worker_loader_queue_depth",
            "Batches waiting in the rank's data-loader prefetch queue after its last step.",
            loader_queue_depth.clone(),
        );
        registry.register(
            "xvlm_worker_checkpoint_upload_bytes",
            "Bytes of checkpoint parts the rank uploaded.",
            upload_bytes.clone(),
        );
        registry.register(
            "xvlm_worker_checkpoint_upload_duration_seconds",
            "Background time of each checkpoint part upload (serialise, hash, upload).",
            upload_seconds.clone(),
        );
        WorkerMetrics {
            registry,
            table,
            step,
            step_seconds,
            allreduce_seconds,
            loader_queue_depth,
            upload_bytes,
            upload_seconds,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, TrainerTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rank `rank` of generation `generation` of `job` runs as process group `pid`.
    pub fn trainer_started(&self, job: &str, generation: u64, rank: u32, pid: u32) {
        self.table().by_rank.insert(
            (job.to_string(), rank),
            (generation, Trainer::Running { pid }),
        );
    }

    /// That rank exited (an older generation's exit does not hide a newer one's trainer).
    pub fn trainer_exited(&self, job: &str, generation: u64, rank: u32) {
        let mut table = self.table();
        if let Some(entry) = table.by_rank.get_mut(&(job.to_string(), rank)) {
            if entry.0 <= generation {
                *entry = (generation, Trainer::Exited { at: Instant::now() });
            }
        }
    }

    /// Records one progress line of rank `rank` of `job`.
    pub fn observe(&self, job: &str, rank: u32, line: &ProgressLine) {
        let labels = RankLabels {
            job: job.to_string(),
            rank: rank.to_string(),
        };
        self.step.get_or_create(&labels).set(line.step as f64);
        // Lines that are not a step's (the closing evaluation) carry no step time.
        if line.step_time_s > 0.0 {
            self.step_seconds
                .get_or_create(&labels)
                .observe(line.step_time_s);
            self.allreduce_seconds
                .get_or_create(&labels)
                .observe(line.allreduce_s);
        }
        if let Some(depth) = line.loader_queue_depth {
            self.loader_queue_depth
                .get_or_create(&labels)
                .set(depth as f64);
        }
        for upload in &line.uploads {
            self.upload_bytes
                .get_or_create(&labels)
                .inc_by(upload.bytes);
            self.upload_seconds
                .get_or_create(&labels)
                .observe(upload.seconds);
        }
    }

    /// Drops every series of ranks whose trainer exited more than [`ENDED_RETENTION`] before `now`.
    fn prune(&self, now: Instant) {
        let gone: Vec<(String, u32)> = {
            let mut table = self.table();
            let gone: Vec<(String, u32)> = table
                .by_rank
                .iter()
                .filter(|(_, (_, t))| {
                    matches!(t, Trainer::Exited { at } if now.saturating_duration_since(*at) > ENDED_RETENTION)
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in &gone {
                table.by_rank.remove(key);
            }
            gone
        };
        for (job, rank) in gone {
            let labels = RankLabels {
                job,
                rank: rank.to_string(),
            };
            self.step.remove(&labels);
            self.step_seconds.remove(&labels);
            self.allreduce_seconds.remove(&labels);
            self.loader_queue_depth.remove(&labels);
            self.upload_bytes.remove(&labels);
            self.upload_seconds.remove(&labels);
        }
    }

    /// The OpenMetrics text of every series (after dropping those of long-ended ranks).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        self.prune(Instant::now());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Clone)]
struct App {
    metrics: Arc<WorkerMetrics>,
    token: Option<Arc<Token>>,
}

/// Refuses requests without the worker token when the worker has one (401).
async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(reason) = token.check_bearer(authorization) {
            warn!(path = req.uri().path(), %reason, "refused an unauthenticated metrics request");
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{reason}\n"),
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn get_metrics(State(app): State<App>) -> Response {
    match app.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`, requiring `token` when given. A
/// non-loopback address without a token is served with a warning: anyone who can reach it reads
/// job names and progress (nothing it serves can change anything).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<WorkerMetrics>,
    token: Option<Token>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let addr = listener.local_addr().map_err(|e| WorkerError::Metrics {
        addr: "?".into(),
        reason: e.to_string(),
    })?;
    if token.is_none() && !addr.ip().is_loopback() {
        warn!(
            %addr,
            "worker /metrics on a non-loopback address without a worker token: anyone who can \
             reach it can read it"
        );
    }
    let app = App {
        metrics,
        token: token.map(Arc::new),
    };
    let router = Router::new()
        .route("/metrics", get(get_metrics))
        .layer(middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| WorkerError::Metrics {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::PartUpload;

    fn line(step: u64, step_time_s: f64) -> ProgressLine {
        ProgressLine {
            step,
            losses: vec![("itc".into(), 0.5)],
            lr: 1e-4,
            lrs: vec![],
            grad_norm: None,
            samples_per_sec: 10.0,
            parts: vec![],
            metrics: vec![],
            total_steps: 10,
            step_time_s,
            allreduce_s: 0.003,
            loader_queue_depth: Some(2),
            uploads: vec![],
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok())?
        })
    }

    /// Progress lines fill the per-rank series: the step gauge, one step-time and all-reduce sample
    /// per step line (none for a line without a step time), the queue depth, upload bytes and
    /// durations per part.
    #[test]
    fn progress_lines_become_series() {
        let m = WorkerMetrics::new();
        m.observe("job-0001", 1, &line(1, 0.2));
        let mut with_part = line(2, 0.4);
        with_part.uploads = vec![PartUpload {
            step: 2,
            bytes: 4096,
            seconds: 0.05,
        }];
        with_part.loader_queue_depth = Some(1);
        m.observe("job-0001", 1, &with_part);
        m.observe("job-0001", 1, &line(2, 0.0));
        let text = m.encode().unwrap();
        let l = r#"{job="job-0001",rank="1"}"#;
        for (series, want) in [
            (format!("xvlm_worker_trainer_step{l}"), 2.0),
            (format!("xvlm_worker_step_duration_seconds_count{l}"), 2.0),
            (
                format!("xvlm_worker_step_duration_seconds_sum{l}"),
                0.6000000000000001,
            ),
            (
                format!("xvlm_worker_allreduce_duration_seconds_count{l}"),
                2.0,
            ),
            (format!("xvlm_worker_loader_queue_depth{l}"), 2.0),
            (
                format!("xvlm_worker_checkpoint_upload_bytes_total{l}"),
                4096.0,
            ),
            (
                format!("xvlm_worker_checkpoint_upload_duration_seconds_count{l}"),
                1.0,
            ),
        ] {
            assert_eq!(value(&text, &series), Some(want), "{series} in\n{text}");
        }
    }

    /// A started trainer shows its live process state (this test process: running or sleeping),
    /// an exited one `exited`; an older generation's exit does not mark a newer trainer exited.
    #[test]
    fn trainer_states_come_from_proc() {
        let m = WorkerMetrics::new();
        m.trainer_started("job-0001", 2, 0, std::process::id());
        m.trainer_exited("job-0001", 1, 0);
        let text = m.encode().unwrap();
        let live = ["running", "sleeping"].iter().any(|s| {
            let series =
                format!(r#"xvlm_worker_trainer_state{{job="job-0001",rank="0",state="{s}"}}"#);
            value(&text, &series) == Some(1.0)
        });
        assert!(live, "{text}");
        m.trainer_exited("job-0001", 2, 0);
        let text = m.encode().unwrap();
        assert_eq!(
            value(
                &text,
                r#"xvlm_worker_trainer_state{job="job-0001",rank="0",state="exited"}"#
            ),
            Some(1.0),
            "{text}"
        );
    }

    /// A rank's series go once its trainer ended more than [`ENDED_RETENTION`] ago; a running
    /// rank's stay however old.
    #[test]
    fn ended_ranks_are_pruned() {
        let m = WorkerMetrics::new();
        m.trainer_started("job-0001", 1, 0, std::process::id());
        m.observe("job-0001", 0, &line(1, 0.2));
        m.trainer_started("job-0002", 1, 0, std::process::id());
        m.observe("job-0002", 0, &line(1, 0.2));
        m.trainer_exited("job-0001", 1, 0);
        let later = Instant::now() + ENDED_RETENTION + Duration::from_secs(1);
        m.prune(Instant::now());
        assert!(m.encode().unwrap().contains(r#"job="job-0001""#));
        m.prune(later);
        let text = m.encode().unwrap();
        assert!(!text.contains(r#"job="job-0001""#), "{text}");
        assert!(
            text.contains(r#"xvlm_worker_trainer_step{job="job-0002",rank="0"}"#),
            "{text}"
        );
    }
}
