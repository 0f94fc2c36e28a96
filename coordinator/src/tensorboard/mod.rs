//! TensorBoard event files per job under `{output}/tensorboard/`, written through the job output's
//! storage (`file://`, `s3://`), from rank 0's progress reports: every loss (`loss/NAME`), the lr of
//! each param group (`lr/groupI`, or `lr` when the trainer reports one), the gradient norm
//! (`grad_norm`), `samples_per_sec` and the evaluation metrics (`eval/SPLIT.METRIC`).
//!
//! Object stores cannot append, so the events are written in segments: every flush puts one new,
//! immutable file `events.out.tfevents.{wall_ms}.{seq}.xvlm-coord` holding the events since the
//! previous one. TensorBoard reads a directory's event files in name order, and the names sort in
//! write order. A generation's first event is a session START at its first step, so TensorBoard drops
//! what an earlier generation wrote for the steps a resume runs again.
//!
//! The files are written on their own thread and runtime: a slow store never holds up heartbeats.
//! Events not yet flushed when the coordinator is killed are lost (at most one flush interval);
//! `serve` flushes on shutdown. A restarted coordinator reads the files back ([`history`]) to
//! restore the dashboard's curves.

mod event;
mod history;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use xvlm_proto::storage::{self, Located};
use xvlm_proto::v1;

use crate::error::CoordError;
use event::{append_record, Event};

/// How often pending events are written when `serve` is not told otherwise.
pub const DEFAULT_FLUSH: Duration = Duration::from_secs(30);

/// Events held per job while its store fails; beyond, the oldest go (with a warning).
const MAX_PENDING_EVENTS: usize = 200_000;

/// The folder under a job's output.
pub const DIR: &str = "tensorboard";

enum Msg {
    Progress {
        output: String,
        progress: Box<v1::RankProgress>,
    },
    Flush(oneshot::Sender<()>),
    Load {
        jobs: Vec<(String, String)>,
        done: HistorySink,
    },
}

/// Receives a job's reports read back from its files: (job, reports in order).
pub type HistorySink = Box<dyn Fn(&str, Vec<v1::RankProgress>) + Send>;

/// A handle to the event-file thread.
pub struct TensorBoard {
    tx: mpsc::UnboundedSender<Msg>,
}

impl TensorBoard {
    /// Starts the thread; pending events are written every `flush_every`.
    pub fn spawn(flush_every: Duration) -> Result<TensorBoard, CoordError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                CoordError::Server(format!("cannot start the TensorBoard runtime: {e}"))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("xvlm-tensorboard".into())
            .spawn(move || runtime.block_on(run(rx, flush_every.max(Duration::from_millis(100)))))
            .map_err(|e| CoordError::Server(format!("cannot start the TensorBoard thread: {e}")))?;
        Ok(TensorBoard { tx })
    }

    /// Records rank 0's progress report of a running generation of the job writing to `output`.
    pub fn record(&self, output: String, progress: v1::RankProgress) {
        let _ = self.tx.send(Msg::Progress {
            output,
            progress: Box::new(progress),
        });
    }

    /// Reads the event files of each (job, output) in the background, one job after another, and
    /// hands each job's reports to `done`; a job with no files is skipped, one whose files cannot be
    /// read is warned about and skipped.
    pub fn load_histories(&self, jobs: Vec<(String, String)>, done: HistorySink) {
        let _ = self.tx.send(Msg::Load { jobs, done });
    }

    /// Writes every pending event now; returns when done or after `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Msg>, flush_every: Duration) {
    let mut outputs: HashMap<String, JobEvents> = HashMap::new();
    let mut tick = tokio::time::interval(flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Progress { output, progress }) => outputs
                    .entry(output.clone())
                    .or_insert_with(|| JobEvents::open(&output))
                    .add(&progress),
                Some(Msg::Flush(done)) => {
                    flush_all(&mut outputs).await;
                    let _ = done.send(());
                }
                Some(Msg::Load { jobs, done }) => {
                    tokio::spawn(load_histories(jobs, done));
                }
                None => {
                    flush_all(&mut outputs).await;
                    return;
                }
            },
            _ = tick.tick() => flush_all(&mut outputs).await,
        }
    }
}

async fn load_histories(jobs: Vec<(String, String)>, done: HistorySink) {
    for (job, output) in jobs {
        let read = match storage::open(&output, &[]) {
            Ok(store) => history::read_history(&store, &job).await,
            Err(e) => Err(CoordError::Server(e.to_string())),
        };
        match read {
            Ok(reports) if reports.is_empty() => {}
            Ok(reports) => {
                info!(
                    job,
                    reports = reports.len(),
                    "dashboard curve restored from the TensorBoard files"
                );
                done(&job, reports);
            }
            Err(e) => warn!(job, error = %e, "dashboard curve not restored"),
        }
    }
}

async fn flush_all(outputs: &mut HashMap<String, JobEvents>) {
    for events in outputs.values_mut() {
        events.flush().await;
    }
}

/// One job output's events not yet written.
struct JobEvents {
    output: String,
    /// The output's store; `None` when its URL cannot be opened (warned once, events dropped).
    store: Option<Located>,
    generation: u64,
    pending: Vec<Event>,
    files: u64,
}

impl JobEvents {
    fn open(output: &str) -> JobEvents {
        let store = match storage::open(output, &[]) {
            Ok(store) => Some(store),
            Err(e) => {
                warn!(error = %e, "no TensorBoard files for this output");
                None
            }
        };
        JobEvents {
            output: output.to_string(),
            store,
            generation: 0,
            pending: Vec::new(),
            files: 0,
        }
    }

    fn add(&mut self, p: &v1::RankProgress) {
        if self.store.is_none() {
            return;
        }
        let now = wall_time();
        if p.generation != self.generation {
            self.generation = p.generation;
            let msg = format!("generation {} from step {}", p.generation, p.step);
            self.pending.push(Event::session_start(now, p.step, msg));
        }
        let values = scalars(p);
        if !values.is_empty() {
            self.pending.push(Event::scalars(now, p.step, values));
        }
        if self.pending.len() > MAX_PENDING_EVENTS {
            let over = self.pending.len() - MAX_PENDING_EVENTS;
            self.pending.drain(..over);
            warn!(
                output = self.output,
                events = over,
                "TensorBoard events dropped: the store keeps failing"
            );
        }
    }

    async fn flush(&mut self) {
        let Some(store) = &self.store else { return };
        if self.pending.is_empty() {
            return;
        }
        let now = wall_time();
        let mut bytes = Vec::new();
        append_record(&mut bytes, &Event::file_version(now));
        for event in &self.pending {
            append_record(&mut bytes, event);
        }
        let name = segment_name((now * 1000.0) as u64, self.files);
        let path =
            ObjectPath::from_iter(store.path.parts().chain([DIR.into(), name.as_str().into()]));
        match store.store.put(&path, PutPayload::from(bytes)).await {
            Ok(_) => {
                if self.files == 0 {
                    info!(output = self.output, "TensorBoard events under {DIR}/");
                }
                self.files += 1;
                self.pending.clear();
            }
            Err(e) => {
                warn!(output = self.output, error = %e, "TensorBoard events not written; retried at the next flush")
            }
        }
    }
}

/// The file name of segment `seq` written at `wall_ms`: names sort in write order (13 digits of
/// milliseconds last until the year 2286).
fn segment_name(wall_ms: u64, seq: u64) -> String {
    format!("events.out.tfevents.{wall_ms:013}.{seq:06}.xvlm-coord")
}

/// The scalars of one progress report.
fn scalars(p: &v1::RankProgress) -> Vec<(String, f32)> {
    let mut values: Vec<(String, f32)> = p
        .losses
        .iter()
        .map(|l| (format!("loss/{}", l.name), l.value as f32))
        .collect();
    if !p.losses.is_empty() {
        if p.lrs.is_empty() {
            values.push(("lr".into(), p.lr as f32));
        }
        values.extend(
            p.lrs
                .iter()
                .enumerate()
                .map(|(i, lr)| (format!("lr/group{i}"), *lr as f32)),
        );
        if let Some(norm) = p.grad_norm {
            values.push(("grad_norm".into(), norm as f32));
        }
        values.push(("samples_per_sec".into(), p.samples_per_sec as f32));
    }
    values.extend(
        p.metrics
            .iter()
            .map(|m| (format!("eval/{}", m.name), m.value as f32)),
    );
    values
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A temporary `file://` job output (`{dir}/job`) and a runtime to write it with.
#[cfg(test)]
fn temp_output() -> (tempfile::TempDir, String, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = format!("file://{}/job", dir.path().display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (dir, output, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(generation: u64, step: u64) -> v1::RankProgress {
        v1::RankProgress {
            job_id: "job-0001".into(),
            generation,
            rank: 0,
            step,
            losses: vec![v1::Loss {
                name: "itc".into(),
                value: 1.0 / step as f64,
            }],
            lr: 1e-4,
            lrs: vec![1e-4, 1e-4, 2e-4, 2e-4],
            grad_norm: Some(3.0),
            samples_per_sec: 8.0,
            ..Default::default()
        }
    }

    /// A training step gives its losses, each group's lr, the grad norm and the throughput; an
    /// evaluation-only report gives just its metrics.
    #[test]
    fn a_report_gives_every_scalar() {
        let tags: Vec<String> = scalars(&progress(1, 2))
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            tags,
            [
                "loss/itc",
                "lr/group0",
                "lr/group1",
                "lr/group2",
                "lr/group3",
                "grad_norm",
                "samples_per_sec"
            ]
        );
        let eval = v1::RankProgress {
            metrics: vec![v1::Metric {
                name: "test.txt_r1".into(),
                value: 40.0,
            }],
            ..Default::default()
        };
        assert_eq!(scalars(&eval), vec![("eval/test.txt_r1".into(), 40.0)]);
    }

    /// Segments land under `{output}/tensorboard/` in name order, each a complete file; a new
    /// generation starts with a session START at its first step.
    #[test]
    fn segments_are_written_in_order_with_a_start_per_generation() {
        let (dir, output, runtime) = temp_output();
        let mut events = JobEvents::open(&output);
        runtime.block_on(async {
            events.add(&progress(1, 1));
            events.add(&progress(1, 2));
            events.flush().await;
            events.flush().await;
            events.add(&progress(2, 2));
            events.flush().await;
        });
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("job").join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "an empty flush writes nothing: {names:?}");
        assert!(
            names[0].ends_with(".000000.xvlm-coord") && names[1].ends_with(".000001.xvlm-coord")
        );
        let second = std::fs::read(dir.path().join("job").join(DIR).join(&names[1])).unwrap();
        let decoded = decode_all(&second);
        assert!(matches!(
            decoded[0].payload,
            Some(event::Payload::FileVersion(_))
        ));
        assert!(
            matches!(decoded[1].payload, Some(event::Payload::SessionLog(_)))
                && decoded[1].step == 2
        );
        assert_eq!(decoded.len(), 3);
    }

    fn decode_all(mut bytes: &[u8]) -> Vec<Event> {
        use prost::Message;
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            out.push(Event::decode(&bytes[12..12 + len]).unwrap());
            bytes = &bytes[12 + len + 4..];
        }
        out
    }

    #[test]
    fn segment_names_sort_in_write_order() {
        assert!(segment_name(999, 9) < segment_name(1000, 10));
        assert!(segment_name(1000, 10).contains("tfevents"));
    }
}
